"""Readers, normalisation, manifests and grouped splits on real files from ../shared/data."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from tumorlens.data import grouped_split, load_manifest, normalize_intensity, read_image, read_mask
from tumorlens.data.splits import set_aside
from tumorlens.errors import InvalidInputError, ManifestError


def test_jpeg_and_png_mask(dev2d, dev_rows):
    row = next(r for r in dev_rows if r["mask"])
    img = read_image(dev2d / row["image"])
    assert img.shape == (1, 256, 256) and img.meta["kind"] == "image2d"
    assert img.affine.shape == (4, 4) and not img.meta["spacing_known"]
    assert 0 <= float(img.min()) and float(img.max()) <= 255
    mask = read_mask(dev2d / row["mask"], like=img)
    assert mask.dtype.is_floating_point is False and set(np.unique(mask.numpy())) <= {0, 1}
    assert 0 < int(mask.sum()) < 256 * 256 // 2


def test_nifti_3d_keeps_affine(brats):
    path = brats / "pat0001" / "T1c_subtrMeanDivStd.nii.gz"
    img = read_image(path, expect="3d")
    ref = nib.load(str(path))
    assert img.shape == (1, 240, 240, 155)
    np.testing.assert_allclose(np.asarray(img.affine), ref.affine)
    np.testing.assert_allclose(img.meta["spacing"], [1, 1, 1])


def test_dicom_series_and_single_file(brats, tmp_path, write_dicom_series):
    vol = nib.load(str(brats / "pat0001" / "T1c_subtrMeanDivStd.nii.gz")).get_fdata()
    sub = np.transpose(vol[40:200:2, 40:200:2, 60:72], (2, 1, 0))  # (z, y, x)
    sub = (sub - sub.min()) * 100
    folder = write_dicom_series(sub, tmp_path / "series")
    img = read_image(folder, expect="3d")
    assert img.shape == (1, 80, 80, 12) and img.meta["kind"] == "volume"
    np.testing.assert_allclose(img.meta["spacing"], [0.9, 0.9, 3.0], atol=1e-4)
    # LPS origin (-100, -120, 30) -> RAS (100, 120, 30)
    np.testing.assert_allclose(np.asarray(img.affine)[:3, 3], [100, 120, 30], atol=1e-3)
    np.testing.assert_allclose(img[0].numpy(), np.transpose(sub, (2, 1, 0)).astype(np.int16), atol=0)
    one = read_image(folder / "slice005.dcm")
    assert one.meta["kind"] == "image2d" and one.shape == (1, 80, 80)
    np.testing.assert_allclose(one[0].numpy(), sub[5].astype(np.int16))
    assert one.meta["modality"] == "MR"


@pytest.mark.parametrize("ext", [".nrrd", ".mha"])
def test_nrrd_and_metaimage_read_like_the_nifti(brats, tmp_path, ext):
    """3D Slicer saves volumes as NRRD: the same voxels and RAS affine as the NIfTI they came from."""
    src = brats / "pat0001" / "T1c_subtrMeanDivStd.nii.gz"
    dest = tmp_path / f"vol{ext}"
    sitk.WriteImage(sitk.ReadImage(str(src)), str(dest))
    a, b = read_image(src), read_image(dest)
    assert b.meta["kind"] == "volume" and b.shape == a.shape
    np.testing.assert_allclose(np.asarray(b.affine), np.asarray(a.affine), atol=1e-4)
    np.testing.assert_allclose(b.numpy(), a.numpy(), atol=1e-5)
    rgb = tmp_path / f"rgb{ext}"
    sitk.WriteImage(sitk.Image([8, 8, 3], sitk.sitkVectorUInt8, 3), str(rgb))
    with pytest.raises(InvalidInputError, match="values per voxel"):
        read_image(rgb)


def test_one_normalisation_serves_jpeg_and_nifti(dev2d, brats, dev_rows):
    jpg = normalize_intensity(read_image(dev2d / dev_rows[0]["image"]))
    vol = normalize_intensity(read_image(brats / "pat0001" / "T1c_subtrMeanDivStd.nii.gz"))
    for x in (jpg, vol):
        a = x.numpy()
        assert a.min() == 0.0 and a.max() == 1.0
        assert a.flat[0] == 0.0  # the corner (background) is black in both
    assert normalize_intensity(np.zeros((32, 32))).max() == 0.0


def test_background_survives_a_padding_frame(brats):
    """A skull-stripped z-scored volume (background about -4.8) padded with a frame of zeros, as
    resampling or cropping tools leave it: the frame must not become the background (which would
    make the whole field of view 'head'), and the foreground stays the brain."""
    from tumorlens.data.normalize import background_value, foreground_mask

    vol = read_image(brats / "pat0001" / "T1c_subtrMeanDivStd.nii.gz").numpy()[0][::2, ::2, ::2]
    brain = np.asarray(read_image(brats / "pat0001" / "brainmask.nii.gz").numpy()[0][::2, ::2, ::2]) > 0
    framed = np.pad(vol, 2, constant_values=0.0)
    assert background_value(framed) == background_value(vol) < -4
    fg = foreground_mask(framed)[2:-2, 2:-2, 2:-2]
    assert (fg & brain).sum() / brain.sum() > 0.9 and (fg & ~brain).sum() < 0.1 * brain.sum()


@pytest.mark.parametrize("kind", ["uint8", "int16", "shifted_halves", "float", "nan"])
def test_most_common_value_counts_like_unique(kind, dev2d, dev_rows):
    """The linear-time count for integer-valued images gives np.unique's answer (smallest value on
    ties), on a real JPEG and on arrays that must take the sorting path."""
    from tumorlens.data.normalize import most_common_value

    rng = np.random.default_rng(0)
    arrays = {
        "uint8": read_image(dev2d / dev_rows[0]["image"]).numpy()[0].astype(np.float32).ravel(),
        "int16": rng.integers(-1000, 3000, 20000).astype(np.int16),
        "shifted_halves": rng.integers(0, 5, 200).astype(np.float32) - 0.5,
        "float": rng.normal(size=5000).astype(np.float32),
        "nan": np.array([np.nan, 2.0, 2.0, 1.0], dtype=np.float32),
    }
    a = arrays[kind]
    values, counts = np.unique(a, return_counts=True)
    top = int(np.argmax(counts))
    assert most_common_value(a) == (float(values[top]), int(counts[top]))


def test_manifest_and_grouped_split(dev2d):
    m = load_manifest(dev2d)
    assert len(m) == 3448 and {r.label for r in m} == {"glioma", "meningioma", "pituitary", "no_tumor"}
    train, val = grouped_split(m, 0.2, seed=0)
    aside = set_aside(m, train, val)
    assert set(train).isdisjoint(val) and len(train) + len(val) + len(aside) == len(m)
    assert {m.records[i].group for i in train}.isdisjoint({m.records[i].group for i in val})
    assert 0.12 < len(val) / len(m) < 0.25
    assert {m.records[i].label for i in val} == {r.label for r in m}
    assert grouped_split(m, 0.2, seed=0) == (train, val)


def test_validation_shares_no_slice_run_with_training(dev2d):
    """A group is a 5 % bin of slice position, not a patient: a run of consecutive slices of one head could
    straddle a bin edge, and 163 of the 722 validation images had their neighbouring slices in training
    (they scored higher). Those are set aside; the training part is the one the shipped model was trained on."""
    m = load_manifest(dev2d)
    train, val = grouped_split(m, 0.2, seed=0)
    run = [str(r.extra.get("run") or "") for r in m.records]
    assert not {run[i] for i in val if run[i]} & {run[i] for i in train if run[i]}
    aside = set_aside(m, train, val)
    assert aside and all(run[i] in {run[j] for j in train} for i in aside)
    assert len(train) == 2726  # unchanged: the shipped model's training part


# ---- bad input -----------------------------------------------------------------------------------

@pytest.fixture
def bad_files(tmp_path, dev2d, dev_rows):
    src = dev2d / dev_rows[0]["image"]
    files = {}
    files["empty"] = tmp_path / "empty.jpg"
    files["empty"].write_bytes(b"")
    files["truncated"] = tmp_path / "truncated.jpg"
    files["truncated"].write_bytes(src.read_bytes()[:600])
    files["garbage"] = tmp_path / "garbage.png"
    files["garbage"].write_bytes(b"this is not an image at all" * 20)
    files["wrong_type"] = tmp_path / "notes.txt"
    files["wrong_type"].write_text("hello")
    files["corrupt_nifti"] = tmp_path / "corrupt.nii.gz"
    files["corrupt_nifti"].write_bytes(b"\x1f\x8b" + b"\x00" * 50)
    files["corrupt_nrrd"] = tmp_path / "corrupt.nrrd"
    files["corrupt_nrrd"].write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 9 9\n\n" + b"\x00" * 20)
    return files


def test_split_command_writes_the_model_cards_validation_part(dev2d, tmp_path, capsys):
    """``tumorlens split`` reproduces the folder every README validation figure was measured on:
    the same manifest bytes as the shipped model's validation.json records, groups disjoint from the
    train part, links into the data (nothing copied), and it refuses to write over a folder."""
    import hashlib
    import json

    from tumorlens.cli import main
    from tumorlens.paths import models_dir

    assert main(["split", str(dev2d), "--out", str(tmp_path / "val")]) == 0
    assert main(["split", str(dev2d), "--out", str(tmp_path / "train"), "--part", "train"]) == 0
    card = json.loads((models_dir() / "tumorlens-densenet121" / "validation.json").read_text())
    digest = hashlib.sha256((tmp_path / "val" / "manifest.csv").read_bytes()).hexdigest()
    assert digest == card["data"]["manifest_sha256"] and card["n"] == 559
    val, train = load_manifest(tmp_path / "val"), load_manifest(tmp_path / "train")
    assert len(val.records) + len(train.records) + 163 == len(load_manifest(dev2d).records)
    assert "163 images are in neither part" in capsys.readouterr().out
    assert not {r.group for r in val.records} & {r.group for r in train.records}
    assert not {r.extra["run"] for r in val.records if r.extra["run"]} & {r.extra["run"] for r in train.records}
    first = tmp_path / "val" / val.records[0].image.relative_to(tmp_path / "val")
    assert first.is_symlink() and read_image(first).shape[0] == 1
    # the folder exists: a clear error, nothing rewritten
    assert main(["split", str(dev2d), "--out", str(tmp_path / "val")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert hashlib.sha256((tmp_path / "val" / "manifest.csv").read_bytes()).hexdigest() == digest


@pytest.mark.parametrize("kind", ["empty", "truncated", "garbage", "wrong_type", "corrupt_nifti", "corrupt_nrrd"])
def test_bad_files_raise_typed_error_naming_file(bad_files, kind):
    with pytest.raises(InvalidInputError) as e:
        read_image(bad_files[kind])
    assert bad_files[kind].name in str(e.value) and e.value.path == str(bad_files[kind])


def test_other_picture_formats_read_like_the_jpeg_and_multi_page_files_are_refused(dev2d, dev_rows, tmp_path):
    """16-bit PNG, 32-bit float TIFF, BMP and grey+alpha PNG hold the same picture as the JPEG: the network
    input is the same. A multi-page TIFF is a stack of slices: reading page 0 alone would silently drop
    the others, so it is refused with a message saying what to do."""
    from PIL import Image

    from tumorlens.inference import prepare_slice

    jpeg = read_image(dev2d / dev_rows[0]["image"])
    a = jpeg.numpy()[0].astype(np.uint8)
    files = {"i16.png": Image.fromarray(a.astype(np.uint16) * 257), "f32.tif": Image.fromarray(a.astype(np.float32) / 255),
             "plain.bmp": Image.fromarray(a), "la.png": Image.fromarray(a).convert("LA")}
    want = prepare_slice(a, 128)
    for name, im in files.items():
        im.save(tmp_path / name)
        got = prepare_slice(read_image(tmp_path / name).numpy()[0], 128)
        assert torch.allclose(got, want, atol=2e-3), name
    Image.fromarray(a).save(tmp_path / "stack.tif", save_all=True, append_images=[Image.fromarray(a[::-1].copy())])
    with pytest.raises(InvalidInputError, match="2 frames in one file") as e:
        read_image(tmp_path / "stack.tif")
    assert "stack.tif" in str(e.value)
    # a folder is read as a DICOM series: one of pictures says which files to give instead
    with pytest.raises(InvalidInputError, match=r"no DICOM series; it holds 5 other image file\(s\)"):
        read_image(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match="no DICOM series$"):
        read_image(tmp_path / "empty")


def test_missing_file_and_3d_where_2d_expected(brats, tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        read_image(tmp_path / "nope.nii.gz")
    (tmp_path / "a.jpg").symlink_to(tmp_path / "b.jpg")
    (tmp_path / "b.jpg").symlink_to(tmp_path / "a.jpg")
    with pytest.raises(InvalidInputError, match="loop of links"):
        read_image(tmp_path / "a.jpg")
    with pytest.raises(InvalidInputError, match="standard input is not read"):
        read_image("-")
    with pytest.raises(InvalidInputError, match="expected a 2D image"):
        read_image(brats / "pat0001" / "T1c_subtrMeanDivStd.nii.gz", expect="2d")


def test_mask_of_another_shape(dev2d, dev_rows, brats):
    img = read_image(dev2d / dev_rows[0]["image"])
    with pytest.raises(InvalidInputError, match="does not match"):
        read_mask(brats / "pat0001" / "brainmask.nii.gz", like=img)


def _manifest(tmp_path, header, rows):
    (tmp_path / "manifest.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    return tmp_path


def test_manifest_errors(tmp_path, dev2d, dev_rows):
    img = tmp_path / "a.jpg"
    shutil.copy(dev2d / dev_rows[0]["image"], img)
    with pytest.raises(ManifestError, match="missing required column"):
        load_manifest(_manifest(tmp_path, "image,group", ["a.jpg,g1"]))
    with pytest.raises(ManifestError, match="unknown label 'astrocytoma'"):
        load_manifest(_manifest(tmp_path, "image,label", ["a.jpg,astrocytoma"]))
    with pytest.raises(ManifestError, match="unknown label '2'.*numeric codes mean different classes"):
        load_manifest(_manifest(tmp_path, "image,label", ["a.jpg,2"]))
    with pytest.raises(ManifestError, match="missing") as e:
        load_manifest(_manifest(tmp_path, "image,label", ["b.jpg,glioma"]))
    assert "b.jpg" in str(e.value)
    with pytest.raises(ManifestError, match="data folder does not exist"):  # not "no manifest.csv" in it
        load_manifest(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="no manifest.csv"):
        load_manifest(tmp_path / "empty")
    m = load_manifest(_manifest(tmp_path, "image,label", ["a.jpg,glioma"]))
    assert m.records[0].group == "img:a.jpg"  # no group column: each image is its own group
    # a short row (a value missing) or values beyond the header: the line is named, no bare traceback
    with pytest.raises(ManifestError, match="line 2: no value for column"):
        load_manifest(_manifest(tmp_path, "image,label,mask,group", ["a.jpg,glioma"]))
    with pytest.raises(ManifestError, match="line 2: more values"):
        load_manifest(_manifest(tmp_path, "image,label", ["a.jpg,glioma,extra"]))
    # spreadsheet spellings of the same manifest: header case and spaces, semicolons, label aliases
    for header, row in ((" Image,LABEL", "a.jpg,Glioma"), ("image;label", "a.jpg;glioma"),
                        ("image,label", "a.jpg,notumor"), ("image,label", "a.jpg,No_Tumour"),
                        ("image,label", "a.jpg,glioma,")):
        label = load_manifest(_manifest(tmp_path, header, [row])).records[0].label
        assert label == ("no_tumor" if "umo" in row.lower() else "glioma"), (header, row)


def test_colour_nifti_reads_as_the_grey_picture(dev2d, dev_rows, tmp_path):
    """3D Slicer writes a colour JPEG it loaded as a NIfTI of RGB24 voxels; NIfTI also stores colour as a
    5th-dimension vector. Both read as the grey picture PIL makes of the same colours (was a bare cast error)."""
    from PIL import Image

    row = next(r for r in dev_rows if r["mask"])
    grey = np.asarray(Image.open(dev2d / row["image"]).convert("L"), dtype=np.uint8)
    rgb = np.stack([grey, (grey * 0.6).astype(np.uint8), 255 - grey], -1)  # a real colour picture of the slice
    expected = np.asarray(Image.fromarray(rgb, "RGB").convert("L"), dtype=np.float32)
    xy = np.transpose(rgb, (1, 0, 2))[:, :, None]  # (x, y, 1, 3)
    structured = np.empty(xy.shape[:3], dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    for i, c in enumerate("RGB"):
        structured[c] = xy[..., i]
    nib.save(nib.Nifti1Image(structured, np.eye(4)), str(tmp_path / "rgb24.nii.gz"))
    vec = nib.Nifti1Image(xy[:, :, :, None, :], np.eye(4))
    vec.header.set_intent("vector")
    nib.save(vec, str(tmp_path / "vector.nii.gz"))
    for name in ("rgb24.nii.gz", "vector.nii.gz"):
        img = read_image(tmp_path / name)
        assert img.shape[-1] == 1, name  # one slice, not three colour planes
        got = np.transpose(img.numpy()[0, :, :, 0])
        assert np.abs(got - expected).max() <= 1.0, name
        assert img.meta["colour_fraction"] > 0.9, name  # what the colour caveat reads (every pixel is coloured)
    # three frames of a series stored as a float vector (as 3D Slicer writes a 3-component volume node) are no
    # colour picture: they were read as one grey picture, silently
    frames = nib.Nifti1Image(np.stack([grey.T, grey.T * 1.1, grey.T * 0.9], -1)[:, :, None, None, :].astype(np.float32),
                             np.eye(4))
    frames.header.set_intent("vector")
    nib.save(frames, str(tmp_path / "frames.nii.gz"))
    with pytest.raises(InvalidInputError, match="frames.nii.gz.*3 values of type float32 per voxel"):
        read_image(tmp_path / "frames.nii.gz")


def _t1c_block(brats) -> np.ndarray:
    vol = nib.load(str(brats / "pat0001" / "T1c_subtrMeanDivStd.nii.gz")).get_fdata()
    sub = np.transpose(vol[40:200:2, 40:200:2, 60:72], (2, 1, 0))  # (z, y, x)
    return (sub - sub.min()) * 100


def test_dicom_series_that_would_be_stacked_wrong_are_refused(brats, tmp_path, write_dicom_series):
    """GDCM stacks a folder's first series whatever else is there, and ITK only warns about gaps: a folder
    with two series and a series with a missing slice are typed errors, not a silently wrong volume."""
    sub = _t1c_block(brats)
    mixed = write_dicom_series(sub, tmp_path / "mixed")
    write_dicom_series(sub[::-1], mixed, series_uid="1.2.826.0.1.3680043.2.1125.1.2", prefix="other")
    with pytest.raises(InvalidInputError, match="2 DICOM series"):
        read_image(mixed)
    gap = write_dicom_series(sub, tmp_path / "gap")
    (gap / "slice006.dcm").unlink()
    with pytest.raises(InvalidInputError, match="not evenly spaced") as e:
        read_image(gap)
    assert "gap" in str(e.value)
    assert read_image(write_dicom_series(sub, tmp_path / "whole"), expect="3d").shape == (1, 80, 80, 12)


def test_dicom_whose_pixel_data_is_short_is_refused(brats, tmp_path, write_dicom_series):
    """A DICOM whose pixel data is shorter than Rows x Columns need (cut short in transfer, a wrong Rows tag) was
    read with the rest filled from uninitialised memory: every read another image, each classified with confidence.
    It is a typed error naming the file and both lengths; a folder holding one (enhanced, multi-frame) file is read
    as that file (the series reader had stacked it into a 4D image and failed with a bare reshape error)."""
    import pydicom

    sub = _t1c_block(brats)
    whole = write_dicom_series(sub, tmp_path / "whole")
    one = tmp_path / "one"
    one.mkdir()
    (one / "only.dcm").write_bytes((whole / "slice000.dcm").read_bytes())
    assert read_image(one).shape == read_image(whole / "slice000.dcm").shape == (1, 80, 80)
    ds = pydicom.dcmread(str(whole / "slice003.dcm"))
    ds.PixelData = ds.PixelData[: len(ds.PixelData) - 10 * 80 * 2]  # ten rows short
    ds.save_as(str(tmp_path / "short.dcm"))
    with pytest.raises(InvalidInputError, match=r"pixel data holds 12800 bytes where .* need 12800|need 12800") as e:
        read_image(tmp_path / "short.dcm")
    assert "short.dcm" in str(e.value) and "11200" in str(e.value)
    ds.save_as(str(whole / "slice003.dcm"))  # one short file in a series
    with pytest.raises(InvalidInputError, match="slice003.dcm"):
        read_image(whole)
    ds = pydicom.dcmread(str(whole / "slice004.dcm"))
    ds.Rows = 96  # a Rows tag that disagrees with the data
    ds.save_as(str(tmp_path / "rows.dcm"))
    with pytest.raises(InvalidInputError, match="need 15360"):
        read_image(tmp_path / "rows.dcm")
    # pixel data longer than the tags describe (Rows 64 for 80 rows) was read cut to the first 64 rows; padding of
    # less than a row is allowed
    ds.Rows = 64
    ds.save_as(str(tmp_path / "long.dcm"))
    with pytest.raises(InvalidInputError, match=r"long.dcm.*12800 bytes where .* need 10240: 2560 bytes more"):
        read_image(tmp_path / "long.dcm")
    ds.Rows = 80
    ds.PixelData = ds.PixelData + b"\0\0"
    ds.save_as(str(tmp_path / "padded.dcm"))
    assert read_image(tmp_path / "padded.dcm").shape == (1, 80, 80)
    from pydicom.data import get_testdata_files  # pydicom's own padded file: one row of padding

    assert read_image(get_testdata_files("MR_small_padded.dcm")[0]).shape == (1, 64, 64)
    # a localizer inside the series (same series, another size): named, not GDCM's bare "Size: [...]"
    loc = write_dicom_series(sub, tmp_path / "loc")
    write_dicom_series(sub[:2, :40, :60], loc, prefix="scout")
    with pytest.raises(InvalidInputError, match=r"2 of 14 files \(scout000.dcm, scout001.dcm\) differ"):
        read_image(loc)


def test_dicom_colour_spacing_and_non_images(dev2d, dev_rows, brats, tmp_path, write_dicom_series):
    """Colour secondary captures read as the grey picture (were a bare numpy error); a file without Pixel
    Spacing says its spacing is unknown (GDCM's 1 mm is a guess); a SEG/RTDOSE object is not an image."""
    from PIL import Image

    row = next(r for r in dev_rows if r["mask"])
    grey = np.asarray(Image.open(dev2d / row["image"]).convert("L"), dtype=np.uint8)
    rgb = np.stack([grey, (grey * 0.6).astype(np.uint8), 255 - grey], -1)
    colour = sitk.GetImageFromArray(rgb, isVector=True)
    sitk.WriteImage(colour, str(tmp_path / "sc_rgb.dcm"))
    img = read_image(tmp_path / "sc_rgb.dcm")
    assert img.shape == (1, 256, 256) and img.meta["kind"] == "image2d"
    expected = np.asarray(Image.fromarray(rgb, "RGB").convert("L"), dtype=np.float32)
    assert np.abs(img[0].numpy() - expected).max() <= 1.0
    import pydicom

    mr = write_dicom_series(_t1c_block(brats)[:1], tmp_path / "mr") / "slice000.dcm"
    assert read_image(mr).meta["spacing_known"]
    ds = pydicom.dcmread(str(mr))
    del ds.PixelSpacing
    ds.save_as(str(tmp_path / "no_spacing.dcm"))
    assert not read_image(tmp_path / "no_spacing.dcm").meta["spacing_known"]
    seg = write_dicom_series(_t1c_block(brats)[:1] > 500, tmp_path / "seg", modality="SEG")
    with pytest.raises(InvalidInputError, match="SEG object"):
        read_image(seg / "slice000.dcm")


def test_colour_pictures_are_read_grey_and_say_how_much_of_them_is_in_colour(dev2d, dev_rows, tmp_path):
    """The network reads grey, so a colour photograph and a grey MRI slice saved as RGB both become one grey
    channel; only the reader sees the colour, and keeps its share for the not-an-MRI caveat."""
    import skimage.data
    from PIL import Image

    from tumorlens.caveats import COLOUR_MIN_FRACTION

    cat = tmp_path / "cat.jpg"
    Image.fromarray(skimage.data.chelsea()).save(cat, quality=90)
    img = read_image(cat)
    assert tuple(img.shape) == (1, 300, 451) and img.meta["colour_fraction"] > 0.9  # measured 0.95
    grey = np.asarray(Image.open(dev2d / dev_rows[0]["image"]).convert("L"))
    assert read_image(dev2d / dev_rows[0]["image"]).meta["colour_fraction"] == 0.0  # a grey JPEG
    rgb = np.repeat(grey[..., None], 3, -1)
    Image.fromarray(rgb).save(tmp_path / "slice_rgb.jpg", quality=90)
    as_rgb = read_image(tmp_path / "slice_rgb.jpg")
    assert as_rgb.meta["colour_fraction"] < 0.001  # JPEG chroma noise is not colour
    assert np.abs(as_rgb[0].numpy().astype(float) - grey).mean() < 2.0  # the same grey picture
    marked = rgb.copy()
    marked[10:30, 10:60] = (255, 0, 0)  # a red annotation box on the slice
    Image.fromarray(marked).save(tmp_path / "slice_marked.png")
    frac = read_image(tmp_path / "slice_marked.png").meta["colour_fraction"]
    assert frac == pytest.approx(1000 / grey.size) and frac < COLOUR_MIN_FRACTION


def test_the_frame_of_an_mri_slice_is_dark_and_that_of_a_frame_filling_picture_is_not(dev2d, dev_rows):
    """An MRI slice shows a head in signal-free air; a texture, a page or a crop inside the head fills its
    frame. Real slices of every class (one with a noisy grey background, 3690.jpg, and a tight crop whose head
    touches the edges, 1477.jpg) stay well above the caveat's floor; their inner half and scikit-image's
    grey textures fall below it."""
    import skimage.data

    from tumorlens.caveats import DARK_BORDER_MIN
    from tumorlens.data.normalize import dark_border_fraction

    names = [r["image"] for r in dev_rows[::170]] + ["images/3690.jpg", "images/1477.jpg"]
    for name in names:
        a = np.squeeze(read_image(dev2d / name).numpy()[0])
        assert dark_border_fraction(a) >= 2 * DARK_BORDER_MIN, name
        h, w = a.shape
        assert dark_border_fraction(a[h // 4:3 * h // 4, w // 4:3 * w // 4]) < DARK_BORDER_MIN, name
    for texture in ("moon", "page", "grass", "text"):
        assert dark_border_fraction(getattr(skimage.data, texture)()) < DARK_BORDER_MIN, texture
    assert dark_border_fraction(np.zeros((32, 32))) == 1.0
    with pytest.raises(ValueError, match="2D"):
        dark_border_fraction(np.zeros((4, 32, 32)))


def test_a_picture_without_its_extension_is_still_read_as_a_picture(tmp_path):
    """An extensionless colour PNG went through SimpleITK and came out grey: the colour caveat was lost (and on
    one photograph the label flipped). Pictures are known by their first bytes; a DICOM whose preamble is a
    TIFF header (pydicom's MR_small) stays a DICOM."""
    from PIL import Image
    from pydicom.data import get_testdata_file

    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[..., 0] = np.arange(64)[None, :] * 4
    rgb[16:48, 16:48, 2] = 200
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    shutil.copy(tmp_path / "photo.png", tmp_path / "photo")
    a, b = read_image(tmp_path / "photo.png"), read_image(tmp_path / "photo")
    assert b.meta["kind"] == "image2d" and b.meta["colour_fraction"] == a.meta["colour_fraction"] > 0.05
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    shutil.copy(get_testdata_file("MR_small.dcm"), tmp_path / "mr")
    mr = read_image(tmp_path / "mr")
    assert mr.meta["modality"] == "MR" and tuple(mr.shape) == (1, 64, 64) and "colour_fraction" not in mr.meta


def test_a_dicomdir_says_where_its_series_are(tmp_path, write_dicom_series):
    """A DICOM disc: its DICOMDIR was "not DICOM" and its folder "holds no DICOM series", with no word that
    the series lie in the subfolders the index lists."""
    import pydicom
    from pydicom.fileset import FileSet

    src = write_dicom_series(np.random.default_rng(0).integers(0, 500, (3, 32, 32)), tmp_path / "src")
    fs = FileSet()
    for f in sorted(src.iterdir()):
        ds = pydicom.dcmread(f)
        ds.PatientID, ds.StudyDate, ds.StudyTime, ds.StudyID, ds.SeriesNumber = "ANON", "20200101", "000000", "1", 1
        fs.add(ds)
    fs.write(tmp_path / "disc")
    for given in (tmp_path / "disc", tmp_path / "disc" / "DICOMDIR"):
        with pytest.raises(InvalidInputError, match="index of a DICOM disc") as ei:
            read_image(given)
        assert str(given) in str(ei.value)


def test_the_record_says_whether_the_modality_was_read_or_assumed(tmp_path, write_dicom_series, dev2d, dev_rows):
    """A JPEG, NIfTI or NRRD file keeps no modality, yet every record and report stated "MR" as if read from the
    file (an outside probe, session 38: a synthetic abdomen PNG was "a single 2D MR image")."""
    from tumorlens.data.readers import stamp_modality

    vol = np.random.default_rng(0).integers(0, 500, (3, 32, 32))
    series = write_dicom_series(vol, tmp_path / "ct", modality="CT")
    nib.save(nib.Nifti1Image(vol.astype(np.float32), np.eye(4)), tmp_path / "plain.nii.gz")
    nib.save(nib.Nifti1Image(vol.astype(np.float32), np.eye(4)), tmp_path / "stamped.nii.gz")
    stamp_modality(tmp_path / "stamped.nii.gz", "MR")
    sitk.WriteImage(sitk.GetImageFromArray(vol.astype(np.int16)), str(tmp_path / "vol.nrrd"))
    seen = {name: (img.meta["modality"], img.meta["modality_from"]) for name, img in
            (("picture", read_image(dev2d / dev_rows[0]["image"])), ("dicom", read_image(series)),
             ("nifti", read_image(tmp_path / "plain.nii.gz")), ("stamped", read_image(tmp_path / "stamped.nii.gz")),
             ("nrrd", read_image(tmp_path / "vol.nrrd")))}
    assert seen == {"picture": ("MR", "assumed"), "dicom": ("CT", "file"), "nifti": ("MR", "assumed"),
                    "stamped": ("MR", "file"), "nrrd": ("MR", "assumed")}


def test_a_ct_saved_as_nifti_is_known_by_its_hounsfield_units(brats, tmp_path):
    """NIfTI and NRRD keep no modality: a head CT saved so was read as MR and reported as "a 3D MR volume",
    while the same voxels as DICOM got the CT caveat. Air at -1000 and bone above 200 say CT."""
    from tumorlens.inference import modality_caveat

    ref = nib.load(brats / "pat0001" / "T1c_subtrMeanDivStd.nii.gz")
    mr = np.asanyarray(ref.dataobj).astype(np.float32)
    brain = mr != mr.flat[0]
    from scipy import ndimage

    ct = np.where(brain, 35.0 + 5.0 * mr, -1000.0).astype(np.float32)
    ct[ndimage.binary_dilation(brain, iterations=4) & ~brain] = 1200.0  # a skull around it
    nib.save(nib.Nifti1Image(ct, ref.affine), tmp_path / "head_ct.nii.gz")
    img = read_image(tmp_path / "head_ct.nii.gz")
    assert img.meta["modality"] == "CT" and img.meta["modality_from"] == "intensities"
    assert "Hounsfield" in modality_caveat("CT", guessed=True)
    for f in (brats / "pat0001" / "T1c_subtrMeanDivStd.nii.gz", brats / "pat0001" / "Flair_subtrMeanDivStd.nii.gz"):
        assert read_image(f).meta["modality"] == "MR"  # z-scored MR goes negative too, but not to -1000


def test_an_install_that_is_not_a_checkout_says_so_and_data_follows_tumorlens_shared_data(tmp_path, monkeypatch,
                                                                                            capsys):
    """A non-editable install (session 35 probe): its project root is site-packages/.., and predict said only
    ".../configs/defaults.yaml: config file does not exist"; a missing package was a traceback; the commands that
    read a model's training data (retrieve, align) ignored TUMORLENS_SHARED_DATA."""
    from tumorlens import cli
    from tumorlens.paths import config_data_root, project_root

    monkeypatch.setenv("TUMORLENS_HOME", str(tmp_path))
    assert cli.main(["predict", str(project_root() / "samples" / "studies" / "mri2d_0102.jpg")]) == 2
    err = capsys.readouterr().err
    assert "config file does not exist" in err and "is not a checkout" in err and "TUMORLENS_HOME" in err
    monkeypatch.delenv("TUMORLENS_HOME")

    def needs_a_package(args):
        raise ModuleNotFoundError("No module named 'langchain_core'", name="langchain_core")

    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_func(parser(), needs_a_package))
    assert cli.main(["predict", "x.jpg"]) == 2
    assert "package 'langchain_core' is not installed" in capsys.readouterr().err

    monkeypatch.setenv("TUMORLENS_SHARED_DATA", str(tmp_path / "data"))
    assert config_data_root("../shared/data/brain-mri-2d") == (tmp_path / "data").resolve() / "brain-mri-2d"
    assert config_data_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("TUMORLENS_SHARED_DATA")
    assert config_data_root("../shared/data/brain-mri-2d") == (project_root() / "../shared/data/brain-mri-2d").resolve()


def _with_func(parser, func):
    real = parser.parse_args

    def parse(argv=None):
        args = real(argv)
        args.func = func
        return args

    parser.parse_args = parse
    return parser


def test_a_tiny_volume_and_a_dicom_dose_grid_are_refused_by_name(tmp_path):
    """An outside probe (session 38): a 2 x 2 x 2 volume was classified (glioma 0.80) while a 2 x 2 picture is
    refused, and a DICOM RT dose grid got GDCM's assertion text instead of what it is."""
    import nibabel as nib
    from pydicom.data import get_testdata_file

    from tumorlens.data import read_image
    from tumorlens.errors import InvalidInputError

    tiny = tmp_path / "tiny.nii.gz"
    nib.save(nib.Nifti1Image(np.arange(8, dtype=np.float32).reshape(2, 2, 2), np.eye(4)), str(tiny))
    with pytest.raises(InvalidInputError, match="no head scan") as e:
        read_image(tiny)
    assert "tiny.nii.gz" in str(e.value)
    with pytest.raises(InvalidInputError, match="RTDOSE object, not an image"):
        read_image(get_testdata_file("rtdose_1frame.dcm"))


def test_a_series_converted_to_nifti_keeps_its_body_part(tmp_path):
    """A series fetched over DICOMweb is converted to NIfTI on the server and had lost its BodyPartExamined: an ABDOMEN
    series got no "not of the head" caution (an outside probe, session 40)."""
    from tumorlens.caveats import body_part_note
    from tumorlens.data.readers import stamp_modality

    vol = np.random.default_rng(0).integers(0, 500, (3, 32, 32)).astype(np.float32)
    for name, part in (("abdomen", "ABDOMEN"), ("neck", "HEAD^NECK"), ("none", None)):
        nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / f"{name}.nii.gz")
        stamp_modality(tmp_path / f"{name}.nii.gz", "MR", part)
    parts = {n: read_image(tmp_path / f"{n}.nii.gz").meta.get("body_part") for n in ("abdomen", "neck", "none")}
    assert parts == {"abdomen": "ABDOMEN", "neck": "HEAD^NECK", "none": None}
    assert body_part_note(parts["abdomen"]) and not body_part_note(parts["neck"])
    assert read_image(tmp_path / "abdomen.nii.gz").meta["modality_from"] == "file"
