"""Files of an explanation: the record, NIfTI mask/heatmap, a Slicer .seg.nrrd, PNG pictures.

Every file is written to a temporary name and renamed, so a reader (the Slicer module, the
server) never sees half a file. PNGs because that is what people open.
"""

from __future__ import annotations

from dataclasses import dataclass
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


SALIENT_AREA = "salient area"  # the saliency mask: where the classifier looked, not the lesion outline


def region_colour(i: int) -> list[float]:
    """A distinct colour for the i-th region segment (matplotlib's tab20, then golden-ratio hues)."""
    if i < 20:
        from matplotlib import colormaps

        return [round(float(c), 3) for c in colormaps["tab20"](i)[:3]]
    import colorsys

    return [round(c, 3) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 0.9)]


def segment_names(expl: Explanation, top: int = 3) -> str:
    """Name of the saliency mask's segment: the regions it covers, largest share first."""
    regions = expl.findings.regions
    if not regions:
        return SALIENT_AREA
    from tumorlens.atlas.regions import sided_name

    parts = [f"{sided_name(r.name, r.hemisphere)} {r.fraction:.0%}" for r in regions[:top]]
    return f"{SALIENT_AREA}: " + ", ".join(parts)


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
            if sel.any():  # a colour of its own, so regions can be told apart in the viewer
                slicerio.add_segment(segmentation, sel, {"id": f"region_{i}", "name": name,
                                                         "color": region_colour(i - 1)})
    else:
        slicerio.add_segment(segmentation, mask > 0, {"id": "salient_area", "name": segment_names(expl),
                                                      "color": LESION_COLOUR})
    slicerio.add_segment(segmentation, seg > 0, {"id": "segmentation_head", "name": "segmentation head",
                                                 "color": SEG_COLOUR})
    return atomic_write(path, lambda tmp: slicerio.write_segmentation(tmp, segmentation))


# the display's edges: volume_to_display shows rows anterior (or superior) first and the patient's right on the left
DISPLAY_EDGES = {"axial": (("A", "P"), ("R", "L")), "coronal": (("S", "I"), ("R", "L")),
                 "sagittal": (("S", "I"), ("A", "P"))}
METHOD_NAMES = {"gradcam": "Grad-CAM", "gradcampp": "Grad-CAM++", "scorecam": "ScoreCAM"}


@dataclass
class Display:
    """What the overlay shows: the slice, its maps, which way the patient lies and its pixel shape."""

    img: np.ndarray
    heat: np.ndarray
    mask: np.ndarray
    seg: np.ndarray
    where: str = ""
    edges: tuple[tuple[str, str], tuple[str, str]] | None = None  # ((top, bottom), (left, right)); None: unknown
    aspect: float = 1.0  # row spacing / column spacing


def edge_letters(direction_ras) -> tuple[str, str]:
    """(letter at index 0, letter at the last index) of an array axis running along ``direction_ras``."""
    v = np.asarray(direction_ras, dtype=float)[:3]
    k = int(np.argmax(np.abs(v)))
    return ("LPI"[k], "RAS"[k]) if v[k] > 0 else ("RAS"[k], "LPI"[k])


def _display(expl: Explanation) -> Display:
    """The 2D picture to show: the image itself as stored, or the axial slice of a volume with the largest
    lesion, as a radiologist sees it; with the patient's directions at its edges where the file gives them."""
    import nibabel as nib

    from tumorlens.inference import DISPLAY_AXES

    img = expl.image.detach().cpu().numpy()[0].astype(np.float32)
    heat = expl.heatmap.detach().cpu().numpy()[0]
    mask = expl.mask.detach().cpu().numpy()[0]
    seg = expl.seg_mask.detach().cpu().numpy()[0]
    aff = np.asarray(expl.image.affine, dtype=float)
    f = expl.findings
    if img.ndim == 2:
        sp = f.input.spacing_mm
        # a slice of rectangular pixels (0.5 x 1.0 mm) is drawn at its true shape, not stretched to its pixel grid
        aspect = float(sp[0] / sp[1]) if f.input.spacing_known and len(sp) == 2 else 1.0
        picture = bool((getattr(expl.image, "meta", {}) or {}).get("picture"))
        edges = None if picture else (edge_letters(aff[:3, 0]), edge_letters(aff[:3, 1]))
        return Display(img, heat, mask, seg, "", edges, aspect)
    shown = [volume_to_display(a, aff) for a in (img, heat, mask, seg)]
    (d_img, back), (d_heat, _), (d_mask, _), (d_seg, _) = shown
    plane = back.get("plane", "axial")
    area = d_mask.reshape(len(d_mask), -1).sum(1)
    z = int(np.argmax(area)) if area.max() > 0 else int(np.argmax(d_heat.reshape(len(d_heat), -1).max(1)))
    # spacing of the display's rows and columns, and the slice's position in world millimetres
    ornt = back["ornt"]
    ras_aff = aff @ nib.orientations.inv_ornt_aff(ornt, img.shape)
    sizes = np.sqrt((ras_aff[:3, :3] ** 2).sum(0))
    _, rows, cols = DISPLAY_AXES[plane]
    where = ""
    if plane == "axial":
        s_mm = float((ras_aff @ np.array([0.0, 0.0, z, 1.0]))[2])
        where = f" (axial slice {z + 1} of {len(d_img)}, S {s_mm:+.0f} mm)"
    return Display(d_img[z], d_heat[z], d_mask[z], d_seg[z], where, DISPLAY_EDGES[plane],
                   float(sizes[rows] / sizes[cols]))


def overlay_caveats(expl: Explanation) -> list[str]:
    """The cautions a reader of the picture must not miss (the findings' own, shortened)."""
    from tumorlens.report.facts import build_facts

    facts = build_facts(expl.findings)
    out = list(facts.out_of_scope())
    if facts.unfamiliar:
        out.append("the image is unlike the training images")
    if facts.kind == "volume" and not facts.single_slice:
        out.append("a volume read slice by slice: class and outlines unconfirmed")
    return out


def _mark_edges(ax, edges) -> None:
    (top, bottom), (left, right) = edges
    style = {"color": "white", "fontsize": 9, "fontweight": "bold", "ha": "center", "va": "center",
             "transform": ax.transAxes, "bbox": {"facecolor": "black", "alpha": 0.6, "pad": 1, "linewidth": 0}}
    for x, y, letter in ((0.5, 0.97, top), (0.5, 0.03, bottom), (0.03, 0.5, left), (0.97, 0.5, right)):
        ax.text(x, y, letter, **style)


def write_overlay(expl: Explanation, path: Path) -> Path:
    """Image | heatmap overlay with the saliency mask (red) and the segmentation head (cyan), the patient's
    directions at the edges, the class the map explains, and the findings' cautions."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tumorlens.data.normalize import normalize_intensity

    d = _display(expl)
    f = expl.findings
    fig, axes = plt.subplots(1, 2, figsize=(9, 5.4))
    base = normalize_intensity(d.img)
    for ax in axes:
        ax.imshow(base, cmap="gray", vmin=0, vmax=1, aspect=d.aspect)
        ax.axis("off")
        if d.edges is not None:
            _mark_edges(ax, d.edges)
    hm = axes[1].imshow(np.ma.masked_less(d.heat, 0.05), cmap="jet", alpha=0.45, vmin=0, vmax=1, aspect=d.aspect)
    bar = fig.colorbar(hm, ax=axes[1], fraction=0.04, pad=0.02)
    bar.set_label("saliency, scaled to this map's maximum", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    for ax in axes:
        if d.mask.any():
            ax.contour(d.mask.astype(float), levels=[0.5], colors=["red"], linewidths=1.2)
        if d.seg.any():
            ax.contour(d.seg.astype(float), levels=[0.5], colors=["cyan"], linewidths=1.0, linestyles="dashed")
    c = f.classification
    axes[0].set_title(f"{READABLE.get(c.label, c.label)} p={c.probabilities[c.label]:.2f}{d.where}", fontsize=10)
    sal = f.saliency
    method = METHOD_NAMES.get(expl.method, expl.method)
    target = expl.target or c.label
    title = f"{method} of {READABLE.get(target, target)}"
    if target != c.label:
        title += " (not the predicted class)"
    axes[1].set_title(title, fontsize=9.5)
    of = "salient area's regions" if (f.lesion.mask_source or "").startswith("saliency") else "regions"
    regions = ", ".join(f"{r.hemisphere} {r.name}" if r.hemisphere in ("left", "right") else r.name
                        for r in f.regions[:3])
    cut = f", the map above its {sal.percentile:.1f}th percentile" if sal and d.mask.any() else ""
    lines = [f"red: salient area (where the classifier looked{cut}); cyan dashed: segmentation head (lesion outline)",
             f"{of}: {regions}" if regions else (f.notes[-1] if f.notes else "no regions named")]
    if d.edges is None:
        lines.append("a picture without patient geometry: shown as viewers show it (radiological convention assumed: "
                     "the patient's right on the left)")
    caveats = overlay_caveats(expl)
    if caveats:
        lines.append("Caution: " + "; ".join(caveats))
    wrapped = [w for line in lines for w in textwrap.wrap(line, 130)]
    fig.suptitle("\n".join(wrapped), fontsize=8.5, y=0.995)
    fig.subplots_adjust(left=0.01, right=0.95, bottom=0.01, top=0.955 - 0.03 * len(wrapped), wspace=0.04)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def write_mni_picture(expl: Explanation, path: Path) -> Path | None:
    """The mapped mask (the salient area, when a saliency map made it) outlined on the MNI152 template, its centroid
    marked, with the named regions (volumes with a placement)."""
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
    salient = (f.lesion.mask_source or "").startswith("saliency")
    what = "salient area (where the classifier looked)" if salient else "lesion"
    note = ("; it lies on both sides, so its centroid may fall between them"
            if f.lesion.laterality == "bilateral" or f.lesion.crosses_midline else "")  # a centroid of two blobs
    regions = "; ".join(f"{r.hemisphere} {r.name} {r.fraction:.0%}" if r.hemisphere in ("left", "right")
                        else f"{r.name} {r.fraction:.0%}" for r in f.regions[:3])
    fig = plt.figure(figsize=(10, 4.4), facecolor="black")
    # the title above the panels, not over them (nilearn's box hid the coronal panel's side letters)
    disp = plotting.plot_anat(tpl, cut_coords=tuple(centroid), display_mode="ortho", figure=fig,
                              axes=[0.0, 0.07, 1.0, 0.78], draw_cross=False, annotate=True)
    fig.suptitle(f"{what}: red outline; its centroid (yellow) at MNI {centroid[0]:.0f}, {centroid[1]:.0f}, "
                 f"{centroid[2]:.0f}\n{note.lstrip('; ')}", color="white", fontsize=10, y=0.98, va="top")
    pts = (expl.atlas or {}).get("mni_points")
    if pts is not None and len(pts):  # the lesion itself, not only its centroid (a dot had stood for 198 ml)
        grid = np.zeros(tpl.shape[:3], np.uint8)
        ijk = np.rint(np.linalg.inv(tpl.affine)[:3] @ np.c_[np.asarray(pts, float), np.ones(len(pts))].T).astype(int)
        inside = np.all((ijk >= 0) & (ijk < np.asarray(grid.shape)[:, None]), axis=0)
        grid[tuple(ijk[:, inside])] = 1
        disp.add_contours(nib.Nifti1Image(grid, tpl.affine), levels=[0.5], colors="red", linewidths=1.2)
    disp.add_markers([centroid], marker_color="yellow", marker_size=80)
    fig.text(0.01, 0.02, f"{'salient area' if salient else 'regions'}: {regions}  (neurological view: the "
             "patient's left on the left)", fontsize=9, color="white", backgroundcolor="black")
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
