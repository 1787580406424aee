"""Files of an explanation: the record, NIfTI mask/heatmap, a Slicer .seg.nrrd, PNG pictures.

Every file is written to a temporary name and renamed, so a reader (the Slicer module, the
server) never sees half a file. PNGs because that is what people open.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tumorlens.atomic import atomic_write, ensure_dir
from tumorlens.inference import volume_to_display
from tumorlens.labels import READABLE

if TYPE_CHECKING:
    from tumorlens.saliency.explain import Explanation

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
LESION_COLOUR = [0.9, 0.15, 0.15]
SEG_COLOUR = [0.1, 0.8, 0.9]


def _grid(meta_tensor) -> tuple[np.ndarray, np.ndarray]:
    """(array in 3D voxel order, RAS affine): a 2D (1, H, W) image becomes (H, W, 1)."""
    arr = meta_tensor.detach().cpu().numpy()[0]
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr, np.asarray(meta_tensor.affine, dtype=float)


def write_nifti(meta_tensor, path: Path, dtype) -> Path:
    import nibabel as nib

    arr, affine = _grid(meta_tensor)
    img = nib.Nifti1Image(np.ascontiguousarray(arr.astype(dtype)), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return atomic_write(path, lambda tmp: nib.save(img, tmp))  # the temp name keeps the .nii.gz suffix


def segment_names(expl: Explanation, top: int = 3) -> str:
    """Name of the lesion segment: the regions it covers, largest share first."""
    regions = expl.findings.regions
    if not regions:
        return "lesion"
    from tumorlens.atlas.regions import sided_name

    parts = [f"{sided_name(r.name, r.hemisphere)} {r.fraction:.0%}" for r in regions[:top]]
    return "lesion: " + ", ".join(parts)


def write_seg_nrrd(expl: Explanation, path: Path) -> Path:
    """Slicer segmentation: one segment per atlas region when a region map exists, else one lesion
    segment named by its regions; the segmentation head's mask as a second (overlapping) segment."""
    import slicerio

    mask, affine = _grid(expl.mask)
    seg, _ = _grid(expl.seg_mask)
    segmentation = slicerio.create_segmentation(mask.shape, LPS_FROM_RAS @ affine)
    if expl.region_map is not None and expl.region_names:
        rmap = np.asarray(expl.region_map).reshape(mask.shape)
        for i, name in enumerate(expl.region_names, start=1):
            sel = (rmap == i) & (mask > 0)
            if sel.any():
                slicerio.add_segment(segmentation, sel, {"id": f"region_{i}", "name": name, "color": LESION_COLOUR})
    else:
        slicerio.add_segment(segmentation, mask > 0, {"id": "lesion", "name": segment_names(expl),
                                                      "color": LESION_COLOUR})
    slicerio.add_segment(segmentation, seg > 0, {"id": "segmentation_head", "name": "segmentation head",
                                                 "color": SEG_COLOUR})
    return atomic_write(path, lambda tmp: slicerio.write_segmentation(tmp, segmentation))


def _display(expl: Explanation) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    """The 2D picture to show: the image itself, or the axial slice with the largest lesion."""
    img = expl.image.detach().cpu().numpy()[0].astype(np.float32)
    heat = expl.heatmap.detach().cpu().numpy()[0]
    mask = expl.mask.detach().cpu().numpy()[0]
    seg = expl.seg_mask.detach().cpu().numpy()[0]
    if img.ndim == 2:
        return img, heat, mask, seg, ""
    aff = np.asarray(expl.image.affine, dtype=float)
    d_img, d_heat, d_mask, d_seg = (volume_to_display(a, aff)[0] for a in (img, heat, mask, seg))
    area = d_mask.reshape(len(d_mask), -1).sum(1)
    z = int(np.argmax(area)) if area.max() > 0 else int(np.argmax(d_heat.reshape(len(d_heat), -1).max(1)))
    return d_img[z], d_heat[z], d_mask[z], d_seg[z], f" (axial slice {z})"


def write_overlay(expl: Explanation, path: Path) -> Path:
    """Image | heatmap overlay with the saliency mask (red) and the segmentation head (cyan)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tumorlens.data.normalize import normalize_intensity

    img, heat, mask, seg, where = _display(expl)
    f = expl.findings
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.8))
    base = normalize_intensity(img)
    sp = f.input.spacing_mm
    # a slice of rectangular pixels (0.5 x 1.0 mm) is drawn at its true shape, not stretched to its pixel grid
    aspect = float(sp[0] / sp[1]) if f.input.kind == "image2d" and f.input.spacing_known and len(sp) == 2 else 1.0
    for ax in axes:
        ax.imshow(base, cmap="gray", vmin=0, vmax=1, aspect=aspect)
        ax.axis("off")
    axes[1].imshow(np.ma.masked_less(heat, 0.05), cmap="jet", alpha=0.45, vmin=0, vmax=1, aspect=aspect)
    for ax in axes:
        if mask.any():
            ax.contour(mask.astype(float), levels=[0.5], colors=["red"], linewidths=1.2)
        if seg.any():
            ax.contour(seg.astype(float), levels=[0.5], colors=["cyan"], linewidths=1.0, linestyles="dashed")
    c = f.classification
    axes[0].set_title(f"{READABLE.get(c.label, c.label)} p={c.probabilities[c.label]:.2f}{where}", fontsize=10)
    sal = f.saliency
    axes[1].set_title(f"{expl.method} (percentile {sal.percentile:.1f})" if sal else expl.method, fontsize=10)
    regions = ", ".join(f"{r.hemisphere} {r.name}" if r.hemisphere in ("left", "right") else r.name
                        for r in f.regions[:3]) or (f.notes[-1][:110] if f.notes else "no regions")
    fig.suptitle(f"red: saliency mask, cyan dashed: segmentation head\n{regions}", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def write_mni_picture(expl: Explanation, path: Path) -> Path | None:
    """The lesion centroid on the MNI152 template with the named regions (volumes with a placement)."""
    f = expl.findings
    centroid = f.lesion.centroid_mni_mm
    if f.input.kind != "volume" or centroid is None or not f.regions:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib
    from nilearn import plotting

    try:
        from tumorlens.atlas.harvard_oxford import template

        t = template()
        tpl = nib.Nifti1Image(np.asarray(t.data, dtype=np.float32), t.affine)
    except Exception:  # noqa: BLE001 - the picture falls back to nilearn's offline template
        from nilearn.datasets import load_mni152_template

        tpl = load_mni152_template(resolution=1)
    regions = "; ".join(f"{r.hemisphere} {r.name} {r.fraction:.0%}" if r.hemisphere in ("left", "right")
                        else f"{r.name} {r.fraction:.0%}" for r in f.regions[:3])
    fig = plt.figure(figsize=(10, 3.8))
    disp = plotting.plot_anat(tpl, cut_coords=tuple(centroid), display_mode="ortho", figure=fig,
                              title=f"lesion centroid (MNI {centroid[0]:.0f}, {centroid[1]:.0f}, {centroid[2]:.0f})",
                              draw_cross=False, annotate=True)
    disp.add_markers([centroid], marker_color="red", marker_size=120)
    fig.text(0.01, 0.02, f"regions: {regions}", fontsize=10, color="white", backgroundcolor="black")
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    disp.close()
    plt.close(fig)
    return path


def _output_names() -> list[str]:
    """Every file name ``write_explanation`` can write, and the report ``tumorlens report`` writes beside it (made
    from an earlier explanation's findings, it had stayed beside a new explanation of another image)."""
    from tumorlens.saliency.cam import METHODS

    per_method = [f"{kind}_{m}.nii.gz" for m in METHODS for kind in ("heatmap", "mask")]
    return ["findings.json", "mask.nii.gz", "heatmap.nii.gz", "mask.seg.nrrd", "overlay.png", "mni.png", *per_method,
            "report.json", "report.md"]


def write_explanation(expl: Explanation, out_dir: str | Path) -> dict[str, Path]:
    """The explanation's files in ``out_dir``. Refused (nothing written) when one would replace the input
    image itself; files of an earlier explanation there that this one does not write (another method's maps,
    a volume's MNI picture) are removed, so the folder never mixes two explanations."""
    from tumorlens.errors import InvalidInputError

    src = (getattr(expl.image, "meta", {}) or {}).get("filename_or_obj")
    out = Path(out_dir)
    if src and Path(str(src)).exists():
        for name in _output_names():
            if (out / name).exists() and (out / name).resolve() == Path(str(src)).resolve():
                raise InvalidInputError(src, f"explain would overwrite this input with its own {name}: "
                                             "choose another --out folder")
    out = ensure_dir(out_dir)
    files = {"findings": expl.findings.save(out / "findings.json")}
    files["mask"] = write_nifti(expl.mask, out / "mask.nii.gz", np.uint8)
    files["heatmap"] = write_nifti(expl.heatmap, out / "heatmap.nii.gz", np.float32)
    if len(expl.heatmaps) > 1:
        for m, h in expl.heatmaps.items():
            files[f"heatmap_{m}"] = write_nifti(h, out / f"heatmap_{m}.nii.gz", np.float32)
            files[f"mask_{m}"] = write_nifti(expl.masks[m], out / f"mask_{m}.nii.gz", np.uint8)
    files["seg_nrrd"] = write_seg_nrrd(expl, out / "mask.seg.nrrd")
    files["overlay"] = write_overlay(expl, out / "overlay.png")
    mni = write_mni_picture(expl, out / "mni.png")
    if mni is not None:
        files["mni"] = mni
    written = {Path(f).name for f in files.values()}
    for name in _output_names():
        if name not in written:
            (out / name).unlink(missing_ok=True)
    return files
