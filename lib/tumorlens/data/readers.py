"""Readers that turn JPEG/PNG, NIfTI (2D/3D), NRRD/MetaImage and DICOM (file or series folder) into
MONAI MetaTensors.

Conventions (shared by every stage downstream):

* A **2D image** (JPEG, PNG, single-frame DICOM) is ``(1, H, W)`` in display order (rows top to
  bottom, columns left to right), ``meta["kind"] == "image2d"``. Its affine maps ``(row, col, 0)``
  to world millimetres (RAS). JPEG/PNG carry no geometry: 1 mm pixels, ``meta["spacing_known"]`` False.
* A **volume** (NIfTI, NRRD, MetaImage, DICOM series, multi-frame DICOM) is ``(1, X, Y, Z)`` in the file's voxel
  order with its RAS affine, ``meta["kind"] == "volume"``. A 2D NIfTI becomes a one-slice volume.

Every failure is an :class:`~tumorlens.errors.InvalidInputError` naming the file.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from monai.data import MetaTensor

from tumorlens.errors import InvalidInputError

PHOTO_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
NIFTI_EXT = (".nii", ".nii.gz")
DICOM_EXT = (".dcm", ".dicom", "")
ITK_EXT = (".nrrd", ".nhdr", ".mha", ".mhd")  # 3D Slicer's and ITK's own formats, read by SimpleITK
FILE_EXT = PHOTO_EXT + NIFTI_EXT + ITK_EXT  # the one-file formats known by their name (DICOM is sniffed)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# A JPEG/PNG has no geometry; ITK (and so 3D Slicer, and a one-frame DICOM here) puts column i, row j at
# LPS (i, j, 0), i.e. RAS (-i, -j, 0). Our arrays are [row, col], so the row index runs along -y and the
# column index along -x: with this affine a mask written for a JPEG lands on the JPEG in Slicer (with a
# plain identity it came out transposed, and a Slicer label read back transposed too).
PHOTO_AFFINE = np.array([[0.0, -1.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
EXIF_ORIENTATION = 0x0112
MIN_SLICE_SIDE, MAX_SLICE_ASPECT = 8, 8
MAX_PIXELS_2D = 64 * 1024 * 1024  # 8192 x 8192: far above any MRI slice or screenshot of one
MAX_VOXELS = 512 * 1024 * 1024  # 2 GiB as float32: a 0.5 mm whole-body MRI is well below

Expect = Literal["2d", "3d"] | None


def _suffix(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return path.suffix.lower()


def _meta(path: Path, kind: str, affine: np.ndarray, spatial_shape, spacing, spacing_known=True, **extra):
    meta = {
        "filename_or_obj": str(path),
        "kind": kind,
        "spatial_shape": np.asarray(spatial_shape),
        "original_affine": affine.copy(),
        "spacing": np.asarray(spacing, dtype=float),
        "spacing_known": spacing_known,
    }
    meta.update(extra)
    return meta


# what later stages copy from a read image's metadata onto the arrays they derive from it (maps, masks, predictions)
IMAGE_META_KEYS = ("filename_or_obj", "kind", "spatial_shape", "spacing", "original_affine", "spacing_known",
                   "modality", "modality_from", "body_part")


def _image(path: Path, kind: str, arr: np.ndarray, affine: np.ndarray, spacing, **meta) -> MetaTensor:
    """The reader's result: ``arr`` with a leading channel, its affine, and the shared metadata."""
    if kind == "image2d" and (min(arr.shape) < MIN_SLICE_SIDE or max(arr.shape) > MAX_SLICE_ASPECT * min(arr.shape)):
        # a 1 x 256 strip was classified as a glioma (p 0.90) by one command and refused by another
        raise InvalidInputError(path, f"a {arr.shape[0]} x {arr.shape[1]} px picture is no head slice: a slice is at "
                                      f"least {MIN_SLICE_SIDE} px on each side and at most {MAX_SLICE_ASPECT}:1")
    if kind == "volume" and min(sorted(arr.shape)[-2:]) < MIN_SLICE_SIDE:
        # a 2 x 2 x 2 volume was classified (glioma 0.80, a 6-voxel mask) while a 2 x 2 picture is refused
        raise InvalidInputError(path, f"a {' x '.join(map(str, arr.shape))} voxel volume is no head scan: its slices are "
                                      f"at least {MIN_SLICE_SIDE} px on each side")
    return MetaTensor(torch.from_numpy(arr[None].copy()), affine=torch.as_tensor(affine),
                      meta=_meta(path, kind, affine, arr.shape, spacing, **meta))


LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, the weights PIL's convert("L") uses for colour photos


def _grey(arr: np.ndarray, axis: int = -1) -> np.ndarray:
    """Colour pixels -> one grey channel, as colour photos are read: a colour volume (3D Slicer
    writes a colour JPEG it loaded as a NIfTI of RGB24 pixels) is the same picture to the network."""
    if arr.dtype.names:  # RGB24 / RGBA32 NIfTI: one structured value per voxel
        return sum(w * arr[c].astype(np.float32) for w, c in zip(LUMA, ("R", "G", "B"), strict=True))
    rgb = np.moveaxis(arr, axis, -1)[..., :3].astype(np.float32)
    return rgb @ np.asarray(LUMA, dtype=np.float32)


COLOUR_SPREAD = 24  # of 255: R, G and B further apart than JPEG chroma noise on a grey picture


def colour_fraction(rgb: np.ndarray) -> float:
    """Share of 8-bit RGB pixels ``[..., 3+]`` whose channels differ by more than ``COLOUR_SPREAD``: 0 for a grey
    picture saved in colour, most of the picture for a photograph. The network reads grey, so the reader keeps
    this (``meta["colour_fraction"]``) for the caveat that says the input may not be MRI."""
    a = np.asarray(rgb)[..., :3].astype(np.int16)
    return float(((a.max(-1) - a.min(-1)) > COLOUR_SPREAD).mean())


def _check_pixels(path: Path, arr: np.ndarray) -> np.ndarray:
    if arr.size == 0 or 0 in arr.shape:
        raise InvalidInputError(path, "image has no pixels")
    if arr.dtype.names:
        if not {"R", "G", "B"} <= set(arr.dtype.names):
            raise InvalidInputError(path, f"pixels of type {arr.dtype} are neither grey nor RGB")
        arr = _grey(arr)
    arr = np.asarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise InvalidInputError(path, f"image contains {bad} non-finite values (NaN/inf)")
    return arr


def _check_size(path: Path, shape: tuple[int, ...], limit: int) -> None:
    """Refuse an image whose declared size is beyond any MRI before it is decoded: a few hundred
    kilobytes of PNG or gzip can declare gigabytes of pixels."""
    n = int(np.prod([int(s) for s in shape], dtype=np.float64))
    if n > limit:
        unit = "voxels" if len(shape) > 2 else "pixels"
        raise InvalidInputError(path, f"image of {' x '.join(str(int(s)) for s in shape)} = {n:,} {unit} is larger "
                                      f"than the {limit:,} tumorlens reads (no MRI is this large)")


def _exif_orientation(im) -> int:
    """The EXIF Orientation tag (1-8; 1 when absent or unreadable)."""
    try:
        value = int(im.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block must not make the picture unreadable
        return 1
    return value if 1 <= value <= 8 else 1


# EXIF orientation -> where upright pixel (r', c') lies in the stored grid of H x W pixels:
# ((a, b, rows?), (c, d, cols?)) with r = a r' + b c' (+ H - 1 when rows?), c = c r' + d c' (+ W - 1 when cols?)
_EXIF_INDEX = {1: ((1, 0, 0), (0, 1, 0)), 2: ((1, 0, 0), (0, -1, 1)), 3: ((-1, 0, 1), (0, -1, 1)),
               4: ((-1, 0, 1), (0, 1, 0)), 5: ((0, 1, 0), (1, 0, 0)), 6: ((0, -1, 1), (1, 0, 0)),
               7: ((0, -1, 1), (-1, 0, 1)), 8: ((0, 1, 0), (-1, 0, 1))}


def stored_grid_affine(orientation: int, stored_shape: tuple[int, int]) -> np.ndarray:
    """The affine of a picture turned upright by its EXIF ``orientation`` that keeps every pixel where the
    stored grid (``PHOTO_AFFINE``, as ITK and 3D Slicer read the file, ignoring the tag) puts it: a mask
    written for the upright picture then lands on the same pixels of the stored one in Slicer."""
    h, w = stored_shape
    (a, b, r_end), (c, d, c_end) = _EXIF_INDEX[orientation]
    index = np.eye(4)  # upright (row, col) -> stored (row, col): a permutation and flips
    index[0, :2], index[0, 3] = (a, b), r_end * (h - 1)
    index[1, :2], index[1, 3] = (c, d), c_end * (w - 1)
    return PHOTO_AFFINE @ index


def _read_photo(path: Path, modality: str) -> MetaTensor:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():  # the size is checked here, against a limit of our own
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            _check_size(path, im.size, MAX_PIXELS_2D)
            frames = int(getattr(im, "n_frames", 1) or 1)
            if frames > 1:  # reading frame 0 alone would silently drop the rest of the series
                raise InvalidInputError(path, f"{frames} frames in one file (a multi-page or animated image): tumorlens "
                                              "reads one slice per JPEG/PNG/TIFF file; save the slices as separate files "
                                              "or the stack as a NIfTI volume")
            im.load()
            orientation = _exif_orientation(im)
            if orientation != 1:  # the picture as every viewer shows it, not as its pixels are stored
                im = ImageOps.exif_transpose(im)
            colour = colour_fraction(np.asarray(im.convert("RGB"))) if im.mode in ("RGB", "RGBA", "P", "CMYK") else 0.0
            if im.mode in ("RGB", "RGBA", "P", "CMYK", "LA"):
                im = im.convert("L")
            arr = np.asarray(im)
    except UnidentifiedImageError as e:
        raise InvalidInputError(path, "not a readable image (unknown or corrupt format)") from e
    except InvalidInputError:
        raise
    except Image.DecompressionBombError as e:
        raise InvalidInputError(path, f"image too large: {e}") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise InvalidInputError(path, f"corrupt or truncated image: {e}") from e
    if arr.ndim != 2:
        raise InvalidInputError(path, f"expected a single-channel 2D image, got array of shape {arr.shape}")
    arr = _check_pixels(path, arr)
    extra = {}
    affine = PHOTO_AFFINE.copy()
    if orientation != 1:
        stored = arr.shape if orientation in (1, 2, 3, 4) else arr.shape[::-1]
        affine = stored_grid_affine(orientation, stored)
        extra["exif_orientation"] = orientation
    # ``picture``: no patient geometry; the array is the picture as viewers show it (upright after EXIF)
    return _image(path, "image2d", arr, affine, (1.0, 1.0), spacing_known=False, modality=modality,
                  modality_from="assumed", colour_fraction=colour, picture=True, **extra)


def _spatial_only(path: Path, arr: np.ndarray) -> np.ndarray:
    """NIfTI voxels as ``(X, Y, Z)``, the three axes the affine maps.

    Only the non-spatial axes (4th: time/volumes, 5th+: vectors) may be dropped, and only when they have
    length 1: squeezing a spatial axis of length 1 as well (a coronal slice stored ``(x, 1, z, 1)``)
    would shift the remaining axes under the file's affine and put every voxel at a wrong position.
    """
    if arr.ndim > 3:
        extra = arr.shape[3:]
        if any(n != 1 for n in extra):
            raise InvalidInputError(path, f"expected a 2D or 3D NIfTI, got {arr.ndim}D data of shape {arr.shape} "
                                          f"({int(np.prod(extra))} volumes or values per voxel)")
        arr = arr.reshape(arr.shape[:3])
    while arr.ndim < 3:  # a 2D NIfTI (or a 1D one): the missing axes have length 1
        arr = arr[..., None]
    return arr


def _read_nifti(path: Path) -> MetaTensor:
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises many types for corrupt/truncated files
        raise InvalidInputError(path, f"corrupt or truncated NIfTI: {type(e).__name__}: {e}") from e
    _check_size(path, img.shape, MAX_VOXELS)
    try:
        arr = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises many types for corrupt/truncated files
        raise InvalidInputError(path, f"corrupt or truncated NIfTI: {type(e).__name__}: {e}") from e
    colour = {}  # 8-bit colour (RGB24, or 3D Slicer's vector of a colour JPEG): how much of it is in colour
    if arr.dtype.names and {"R", "G", "B"} <= set(arr.dtype.names) and arr.dtype["R"] == np.uint8:
        colour["colour_fraction"] = colour_fraction(np.stack([arr[c] for c in "RGB"], -1))
    if arr.ndim == 5 and arr.shape[4] in (3, 4) and img.header.get_intent()[0] in ("vector", "rgb vector"):
        if arr.dtype != np.uint8:  # not a colour picture: frames, echoes or directions, one per component
            raise InvalidInputError(path, f"{arr.shape[4]} values of type {arr.dtype} per voxel (a vector image: "
                                          "several frames, echoes or directions?); a grey-level MRI has one value per "
                                          "voxel and a colour picture three 8-bit ones: send one frame")
        colour["colour_fraction"] = colour_fraction(arr[:, :, :, 0, :])
        arr = _grey(arr[:, :, :, 0, :])  # colour stored as a 5th-dimension vector (NIfTI's own convention)
    arr = _spatial_only(path, arr)
    arr = _check_pixels(path, arr)
    affine = np.asarray(img.affine, dtype=float)
    modality = nifti_modality(img)
    part = nifti_body_part(img)
    return _image(path, "volume", arr, affine, np.sqrt((affine[:3, :3] ** 2).sum(0)), modality=modality or "MR",
                  modality_from="file" if modality else "assumed", **colour, **({"body_part": part} if part else {}))


MODALITY_NOTE = re.compile(r"tumorlens modality=([A-Z]{2,8})")
BODY_PART_NOTE = re.compile(r"\bbodypart=(\S{1,40})")


def nifti_modality(img) -> str | None:
    """NIfTI keeps no modality: None (read as MR), unless the file's description gives it in the form
    ``stamp_modality`` writes (a DICOM series converted on the server, e.g. a CT fetched over DICOMweb)."""
    raw = img.header.get("descrip")
    text = (raw.tobytes() if hasattr(raw, "tobytes") else bytes(raw or b"")).decode("ascii", "replace")
    m = MODALITY_NOTE.search(text)
    return m.group(1) if m else None


def nifti_body_part(img) -> str | None:
    """The DICOM body part a converted series recorded (``stamp_modality``), or None."""
    raw = img.header.get("descrip")
    text = (raw.tobytes() if hasattr(raw, "tobytes") else bytes(raw or b"")).decode("ascii", "replace")
    m = BODY_PART_NOTE.search(text.rstrip("\x00"))
    return m.group(1).replace("_", " ") if m else None


def stamp_modality(path: str | Path, modality: str, body_part: str | None = None) -> None:
    """Write ``modality`` (and the DICOM body part, when the series recorded one) into a NIfTI file's description,
    where ``nifti_modality`` and ``nifti_body_part`` read them: a series fetched over DICOMweb is converted to NIfTI,
    and had lost its BodyPartExamined (an ABDOMEN series got no caution; an outside probe, session 40)."""
    import nibabel as nib

    img = nib.load(str(path))
    img = nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, img.header)
    part = re.sub(r"[^A-Za-z0-9^-]+", "_", body_part.strip())[:40] if body_part and body_part.strip() else ""
    img.header["descrip"] = (f"tumorlens modality={modality}" + (f" bodypart={part}" if part else "")).encode("ascii")[:80]
    nib.save(img, str(path))


def _sitk_to_volume(path: Path, image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(voxels ``[X, Y, Z]``, RAS affine, spacing) of a SimpleITK image (LPS in ITK)."""
    import SimpleITK as sitk

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arr = sitk.GetArrayFromImage(image)  # (z, y, x), or (z, y, x, c) for colour
        ncomp = image.GetNumberOfComponentsPerPixel()
        if ncomp > 1:  # colour DICOM (secondary captures; GDCM hands YBR over as RGB): the grey picture
            if ncomp not in (3, 4):
                raise InvalidInputError(path, f"{ncomp} values per pixel; a grey-level or colour image has 1, 3 or 4")
            arr = _grey(arr)
        if arr.ndim == 2:
            arr = arr[None]
        arr = _check_pixels(path, np.transpose(arr, (2, 1, 0)))  # -> (x, y, z)
    dim = image.GetDimension()
    direction = np.eye(3)
    direction[:dim, :dim] = np.asarray(image.GetDirection()).reshape(dim, dim)
    spacing = np.ones(3)
    spacing[:dim] = image.GetSpacing()
    origin = np.zeros(3)
    origin[:dim] = image.GetOrigin()
    lps = np.eye(4)
    lps[:3, :3] = direction * spacing[None, :]
    lps[:3, 3] = origin
    return arr, LPS_TO_RAS @ lps, spacing


def _read_itk(path: Path) -> MetaTensor:
    """NRRD / MetaImage volumes (what 3D Slicer saves and its MONAI Label module may send)."""
    import SimpleITK as sitk

    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        _check_size(path, reader.GetSize(), MAX_VOXELS)
        image = reader.Execute()
    except RuntimeError as e:
        raise InvalidInputError(path, f"corrupt or unreadable {_suffix(path)} file: "
                                      f"{str(e).strip().splitlines()[-1]}") from e
    if image.GetNumberOfComponentsPerPixel() > 1:
        raise InvalidInputError(path, f"{image.GetNumberOfComponentsPerPixel()} values per voxel (colour or vector "
                                      "image); a grey-level MRI has one")
    if image.GetDimension() not in (2, 3):
        raise InvalidInputError(path, f"expected a 2D or 3D image, got {image.GetDimension()}D")
    arr, affine, spacing = _sitk_to_volume(path, image)
    return _image(path, "volume", arr, affine, spacing, modality="MR", modality_from="assumed")


NOT_IMAGES = {"SEG", "RTSTRUCT", "RTDOSE", "RTPLAN", "RTRECORD", "SR", "PR", "KO", "REG", "RWV", "FID", "DOC"}


def _tag(source, key: str, index: int | None = None) -> str | None:
    """A DICOM tag of a SimpleITK image or (``index``) of one slice of a series reader, or None."""
    try:
        if index is None:
            return source.GetMetaData(key).strip() if source.HasMetaDataKey(key) else None
        return source.GetMetaData(index, key).strip() if source.HasMetaDataKey(index, key) else None
    except RuntimeError:
        return None


def _floats(text: str | None) -> np.ndarray | None:
    try:
        return np.array([float(v) for v in text.split("\\")]) if text else None
    except ValueError:
        return None


def _functional_spacing(path: Path) -> bool:
    """An enhanced (multi-frame) DICOM file keeps Pixel Spacing in its functional groups, out of
    SimpleITK's tag list."""
    if path.is_dir():
        return False
    try:
        import pydicom

        ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
        groups = list(ds.get("SharedFunctionalGroupsSequence", [])) + list(ds.get("PerFrameFunctionalGroupsSequence", [])[:1])
        return any("PixelSpacing" in m for g in groups for m in g.get("PixelMeasuresSequence", []))
    except Exception:  # noqa: BLE001 - unreadable here means "not declared"
        return False


def _declared_modality(path: Path) -> str | None:
    """The Modality a DICOM file (or a series folder's first file) declares, read without its pixels."""
    try:
        import pydicom

        first = path if path.is_file() else next(p for p in sorted(path.iterdir()) if p.is_file())
        return str(pydicom.dcmread(str(first), stop_before_pixels=True, force=True).get("Modality", "")) or None
    except Exception:  # noqa: BLE001 - nothing declared that can be read
        return None


def _check_slice_positions(path: Path, reader, n: int, direction: np.ndarray) -> None:
    """Refuse a series whose slices are not evenly spaced (a missing slice, a mixed acquisition):
    ITK only warns and stacks them as if they were, which shifts every slice after the gap."""
    normal = direction[:, 2]
    pos = [_floats(_tag(reader, "0020|0032", i)) for i in range(n)]
    if n < 3 or any(p is None or p.size != 3 for p in pos):
        return
    along = np.sort([float(p @ normal) for p in pos])
    gaps = np.diff(along)
    med = float(np.median(gaps))
    if med <= 1e-3 or np.any(gaps < 1e-3):
        raise InvalidInputError(path, "two slices of the series lie at the same position: a series of series, "
                                      "or duplicated files")
    if np.any(np.abs(gaps - med) > 0.1 * med + 0.01):
        raise InvalidInputError(path, f"slices are not evenly spaced ({gaps.min():.2f} to {gaps.max():.2f} mm between "
                                      "neighbours: a missing slice or a mixed acquisition), so the volume's geometry "
                                      "would be wrong")


def _check_pixel_data(path: Path, files: list[str]) -> None:
    """Refuse a DICOM whose uncompressed pixel data is shorter than its Rows x Columns (x frames) need (a
    transfer cut short, a wrong Rows tag): GDCM reads it anyway and fills the rest from uninitialised
    memory, so every read gave another image, classified with confidence."""
    try:
        import pydicom
    except ImportError:  # pragma: no cover - pydicom comes with the package
        return
    shapes: dict[tuple, list[str]] = {}
    for f in files:
        try:
            ds = pydicom.dcmread(f, force=True, defer_size=1024)
            if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
                raise InvalidInputError(path, f"{Path(f).name}: float pixel data (Float Pixel Data) is not supported; "
                                              "convert it to integer pixels or to NIfTI")
            iop = tuple(float(v) for v in ds.get("ImageOrientationPatient", []) or [])
            kind = "\\".join(str(v) for v in (ds.get("ImageType") or []))
            key = next((k for k in shapes if k[:2] == (ds.get("Rows"), ds.get("Columns")) and len(k[2]) == len(iop)
                        and np.allclose(k[2], iop, atol=0.01)), (ds.get("Rows"), ds.get("Columns"), iop))
            shapes.setdefault(key, []).append(f"{Path(f).name}" + (f" ({kind})" if "LOCALIZER" in kind.upper() else ""))
            syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
            if syntax is None or syntax.is_compressed or "PixelData" not in ds:
                continue
            raw = ds.get_item("PixelData")
            length = int(getattr(raw, "length", None) or len(ds.PixelData))
            frames = int(str(ds.get("NumberOfFrames", 1) or 1))
            need = (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1)
                    * int(ds.BitsAllocated) * frames + 7) // 8
            on_disk = Path(f).stat().st_size
        except InvalidInputError:
            raise
        except Exception:  # noqa: BLE001 - what pydicom cannot tell is left to the image reader's own checks
            continue
        if length == 0xFFFFFFFF:
            continue
        name = Path(f).name
        where = "" if Path(f) == path else f" ({name})"
        described = (f"Rows x Columns ({int(ds.Rows)} x {int(ds.Columns)}, {frames} frame(s), "
                     f"{int(ds.BitsAllocated)} bits) need {need}")
        if length < need or length > on_disk:
            have = min(length, on_disk)
            raise InvalidInputError(path, f"pixel data{where} holds {have} bytes where {described}: a truncated or "
                                          "mis-described file, whose missing pixels would be invented")
        # an eighth or more beyond what the tags describe (a Rows, Columns or Number of Frames tag smaller than the
        # data): the pixels would be read on the wrong grid, cut or sheared. Less is taken as padding, as pydicom
        # does (its own MR_small_padded.dcm carries one row of it)
        if length - need >= max(need // 8, 2):
            raise InvalidInputError(path, f"pixel data{where} holds {length} bytes where {described}: {length - need} "
                                          "bytes more than its tags describe (a wrong Rows, Columns or Number of "
                                          "Frames tag), so its pixels would be read on the wrong grid")
    if len(shapes) > 1:  # GDCM failed on these with a bare "Size: [120, 78, 1]"
        groups = sorted(shapes.values(), key=len, reverse=True)
        odd = [name for g in groups[1:] for name in g]
        raise InvalidInputError(path, f"the series mixes images of another size or orientation: {len(odd)} of "
                                      f"{len(files)} files ({', '.join(odd[:3])}{', ...' if len(odd) > 3 else ''}) differ "
                                      "from the rest, e.g. a localizer; remove them and give the folder again")


DICOMDIR_HINT = ("; it is the index of a DICOM disc, whose series lie in its subfolders (e.g. PT000000/ST000000/"
                 "SE000000): give the folder of one series")


def _read_dicom(path: Path) -> MetaTensor:
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's raw warnings; the problems become typed errors
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(path))
            if not series:
                others = sorted(p.name for p in path.iterdir() if p.is_file() and p.name.lower().endswith(FILE_EXT))
                hint = (f"; it holds {len(others)} other image file(s) ({', '.join(others[:3])}"
                        f"{', ...' if len(others) > 3 else ''}): give those files themselves, one path each"
                        if others else "")
                if (path / "DICOMDIR").is_file():
                    hint = DICOMDIR_HINT
                raise InvalidInputError(path, f"folder holds no DICOM series{hint}")
            if len(series) > 1:
                sizes = ", ".join(f"{len(reader.GetGDCMSeriesFileNames(str(path), s))} files" for s in series)
                raise InvalidInputError(path, f"folder holds {len(series)} DICOM series ({sizes}); put each series in "
                                              "its own folder and give that folder")
            files = reader.GetGDCMSeriesFileNames(str(path), series[0])
            if len(files) == 1:  # one file (an enhanced multi-frame object): read as that file, whose frames
                return _read_dicom(Path(files[0]))  # the series reader stacked as a 4D image
            _check_pixel_data(path, list(files))
            reader.SetFileNames(files)
            reader.MetaDataDictionaryArrayUpdateOn()
            image = reader.Execute()
            first = (reader, 0)
        else:
            _check_pixel_data(path, [str(path)])
            image = sitk.ReadImage(str(path))
            first = (image, None)
    except InvalidInputError:
        raise
    except RuntimeError as e:
        last = str(e).strip().splitlines()[-1]
        if "Unable to determine ImageIO reader" in last and path.name.upper() == "DICOMDIR":
            raise InvalidInputError(path, f"a DICOMDIR holds no image{DICOMDIR_HINT}") from e
        modality = _declared_modality(path)
        if modality and modality.upper() in NOT_IMAGES:  # an RT dose grid failed in GDCM with an assertion text
            raise InvalidInputError(path, f"a DICOM {modality} object, not an image to classify") from e
        if "Unable to determine ImageIO reader" in last:
            raise InvalidInputError(path, "no readable image in this file (not DICOM, no pixel data, a non-image "
                                          "object such as a structured report, or a truncated file)") from e
        raise InvalidInputError(path, f"not a readable DICOM: {last}") from e
    src, idx = first
    declared = _tag(src, "0008|0060", idx)
    modality, modality_from = (declared, "file") if declared else ("MR", "assumed")
    part = _tag(src, "0018|0015", idx)  # Body Part Examined: a file of the abdomen says so (the caveat's evidence)
    where = {"body_part": part.strip().upper()} if part and part.strip() else {}
    if modality.upper() in NOT_IMAGES:
        raise InvalidInputError(path, f"a DICOM {modality} object, not an image to classify")
    if path.is_dir():
        _check_slice_positions(path, reader, len(files), np.asarray(image.GetDirection()).reshape(3, 3))
    # without Pixel Spacing anywhere GDCM's 1 mm is a guess (areas in mm2 would be invented)
    spacing_known = (any(_tag(src, k, idx) for k in ("0028|0030", "0018|1164"))
                     or not np.allclose(image.GetSpacing()[:2], 1.0) or _functional_spacing(path))
    arr, affine, spacing = _sitk_to_volume(path, image)
    if arr.shape[2] == 1:  # one frame: a 2D image in (row, col) display order
        img2d = arr[:, :, 0].T  # (x, y) -> (row=y, col=x)
        aff = np.eye(4)
        aff[:, 0] = affine[:, 1]  # row index moves along the image's y axis
        aff[:, 1] = affine[:, 0]  # col index moves along x
        aff[:, 3] = affine[:, 3]
        aff[:3, 2] = affine[:3, 2]
        return _image(path, "image2d", img2d, aff, (spacing[1], spacing[0]), modality=modality,
                      modality_from=modality_from, spacing_known=spacing_known, **where)
    return _image(path, "volume", arr, affine, spacing, modality=modality, modality_from=modality_from,
                  spacing_known=spacing_known, **where)


def _sniff_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
        return len(head) == 132 and head[128:132] == b"DICM"
    except OSError:
        return False


# a picture's first bytes (PNG, JPEG, BMP, TIFF): a picture without its extension is still read as one (through
# SimpleITK it lost its colour, and with it the colour caveat)
PICTURE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"II*\x00", b"MM\x00*")


def _sniff_picture(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        head = f.read(132)
    return head.startswith(PICTURE_MAGIC) and head[128:132] != b"DICM"  # a DICOM preamble may be a TIFF header


def read_image(path: str | Path, expect: Expect = None, modality: str = "MR") -> MetaTensor:
    """Read one image as a float32 MetaTensor (see the module docstring for the conventions).

    ``expect="2d"`` rejects volumes with more than one slice; ``expect="3d"`` rejects 2D images.
    """
    path = Path(path)
    if not path.exists():
        if str(path) == "-":
            raise InvalidInputError(path, "standard input is not read: save the image to a file and give its path")
        if path.is_symlink():
            raise InvalidInputError(path, "a link that leads to no file (dangling, or a loop of links)")
        raise InvalidInputError(path, "file does not exist")
    if path.is_file() and path.stat().st_size == 0:
        raise InvalidInputError(path, "file is empty (0 bytes)")
    ext = _suffix(path)
    if path.is_dir():
        img = _read_dicom(path)
    elif ext in PHOTO_EXT or (ext not in FILE_EXT + (".dcm", ".dicom") and _sniff_picture(path)):
        img = _read_photo(path, modality)
    elif ext in NIFTI_EXT + ITK_EXT:
        img = _read_nifti(path) if ext in NIFTI_EXT else _read_itk(path)
        if img.meta.get("modality") == "MR" and looks_like_ct(img.numpy()[0]):
            # NIfTI and NRRD keep no modality: a CT saved so was read as MR and reported as "a 3D MR volume"
            img.meta.update(modality="CT", modality_from="intensities")
    elif ext in DICOM_EXT or _sniff_dicom(path):
        img = _read_dicom(path)
    else:
        raise InvalidInputError(
            path, f"unsupported file type {ext!r}; expected JPEG/PNG/BMP/TIFF, NIfTI (.nii/.nii.gz), NRRD, MetaImage (.mha) or DICOM"
        )
    if expect == "2d" and is_volume(img) and img.shape[-1] > 1:
        raise InvalidInputError(path, f"expected a 2D image, got a 3D volume of shape {tuple(img.shape[1:])}")
    if expect == "3d" and not is_volume(img):
        raise InvalidInputError(path, f"expected a 3D volume, got a 2D image of shape {tuple(img.shape[1:])}")
    return img


def looks_like_ct(arr: np.ndarray) -> bool:
    """Intensities in Hounsfield units: a share of the voxels at air's -1000 (at least 3 % within 50 of it, 5 %
    at or below -900) and bone above 200. MR values are not negative, or z-scores (BraTS: about -2 to 10)."""
    a = np.asarray(arr, dtype=np.float32).ravel()
    if a.size > 2_000_000:
        a = a[:: a.size // 2_000_000]
    if a.size == 0 or float(a.min()) > -900:
        return False
    return (float(np.mean(np.abs(a + 1000) <= 50)) >= 0.03 and float(np.mean(a <= -900)) >= 0.05
            and float(np.percentile(a, 99.5)) >= 200)


def reorient_like(arr: np.ndarray, affine: np.ndarray, target_affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``arr`` [X, Y, Z] (stored under ``affine``) in the axis order and directions of
    ``target_affine``, and its affine after that: the same voxels, so a mask saved with flipped or
    permuted axes lands on the same anatomy. Only axis permutations and flips, no resampling."""
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

    ornt = ornt_transform(io_orientation(affine), io_orientation(target_affine))
    return apply_orientation(arr, ornt), np.asarray(affine, dtype=float) @ inv_ornt_aff(ornt, arr.shape)


def same_grid(affine: np.ndarray, target_affine: np.ndarray) -> bool:
    """The two affines put every voxel at the same point, within 1 % of the target's smallest voxel
    (float32 header rounding, not a shift)."""
    t = np.asarray(target_affine, dtype=float)
    tol = max(1e-4, 0.01 * float(np.sqrt((t[:3, :3] ** 2).sum(0)).min()))
    return bool(np.allclose(np.asarray(affine, dtype=float), t, rtol=0, atol=tol))


def image_array(img: MetaTensor, purpose: str) -> np.ndarray:
    """The pixels of an image as ``read_image`` returns it ([1, H, W] or [1, X, Y, Z]), checked as the reader
    checks a file's, for callers that build the MetaTensor themselves: a wrong layout would otherwise be
    misread (a [H, W] array's first row taken as the image) or fail deep inside torch. ``purpose``: what the
    image is for, to end the message of a constant image."""
    if not isinstance(img, MetaTensor):
        raise TypeError(f"expected a MetaTensor as tumorlens.data.read_image returns, got {type(img).__name__}")
    src = img.meta.get("filename_or_obj")
    shape = tuple(img.shape)
    if len(shape) not in (3, 4) or shape[0] != 1:
        hint = (" (a colour picture? read it with tumorlens.data.read_image, which makes it grey)"
                if shape and shape[-1] in (3, 4) else "")
        raise InvalidInputError(src, f"expected one channel first, [1, H, W] or [1, X, Y, Z], got shape {shape}{hint}")
    arr = img.detach().cpu().numpy()[0]
    if not np.isfinite(arr).all():
        raise InvalidInputError(src, f"image contains {int((~np.isfinite(arr)).sum())} non-finite values (NaN/inf)")
    if not np.any(arr != arr.flat[0]):
        raise InvalidInputError(src, f"image is constant (empty or all-zero): {purpose}")
    return arr


def is_volume(img: MetaTensor) -> bool:
    """As the reader recorded it; a MetaTensor built elsewhere ([C, X, Y, Z], no ``kind``) by its shape."""
    kind = img.meta.get("kind") if hasattr(img, "meta") else None
    return kind == "volume" if kind else img.ndim == 4


def read_mask(path: str | Path, like: MetaTensor | None = None) -> MetaTensor:
    """Read a binary/label mask (PNG 0/255, NIfTI labels) as uint8 0/1.

    A picture mask (JPEG/PNG/...) is tumour above half its maximum value: JPEG compression leaves
    faint non-zero pixels around every outline, and counting them (> 0) inflated masks by 20-40 %;
    0/1, 0/255 and boolean pictures come out the same either way. A label volume (NIfTI, NRRD, DICOM)
    keeps values > 0 as tumour, so every label of a multi-label map (BraTS 1, 2, 4) counts.

    With ``like``, the mask must have the same spatial shape, otherwise a typed error.
    """
    m = read_image(path)
    cut = 0.0
    if _suffix(Path(path)) in PHOTO_EXT:
        peak = float(m.max()) if m.numel() else 0.0
        cut = peak / 2 if peak > 0 else 0.0
    out = (m > cut).to(torch.uint8)
    out = MetaTensor(out, meta=dict(m.meta))
    if like is not None and tuple(out.shape[1:]) != tuple(like.shape[1:]):
        raise InvalidInputError(
            path, f"mask shape {tuple(out.shape[1:])} does not match image shape {tuple(like.shape[1:])}"
        )
    return out
