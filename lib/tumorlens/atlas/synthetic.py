"""A registration test case with a known answer: a lesion planted in a named Harvard-Oxford
structure of a brain that is *not* the atlas template, moved off MNI space by a known transform.

Why: to check that regions and centroids survive registration, we need ground truth. nilearn's
ICBM152 2009 template (shipped offline) is a different brain average than FSL's MNI152 that the atlas
is drawn on, in MNI coordinates; planting a lesion at a known MNI point and then rotating, scaling,
warping (smooth displacement) and bias-shading it gives an input whose right answer we know.
Used by the tests and ``bench/registration.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor

from tumorlens.atlas.harvard_oxford import max_prob_atlas, structure_mask

LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class SyntheticCase:
    volume: MetaTensor  # (1, X, Y, Z), header is NOT MNI
    mask: MetaTensor  # lesion, same grid
    structure: str  # the Harvard-Oxford label the lesion was planted in
    centroid_mni_mm: np.ndarray  # true lesion centroid (RAS mm)
    params: dict


def _icbm() -> tuple[np.ndarray, np.ndarray]:
    from nilearn.datasets import load_mni152_template

    img = load_mni152_template(resolution=1)
    return np.asarray(img.get_fdata(), dtype=np.float32), np.asarray(img.affine, dtype=float)


def _sitk(arr: np.ndarray, affine_ras: np.ndarray) -> sitk.Image:
    from tumorlens.atlas.registration import to_sitk

    return to_sitk(arr, affine_ras)


def lesion_centre(structure: str) -> np.ndarray:
    """The MNI RAS point deepest inside the structure's max-probability region."""
    from scipy.ndimage import distance_transform_edt

    m = structure_mask(structure)
    dist = distance_transform_edt(m)
    ijk = np.array(np.unravel_index(int(np.argmax(dist)), m.shape), dtype=float)
    aff = max_prob_atlas().affine
    return aff[:3, :3] @ ijk + aff[:3, 3]


def make_case(
    structure: str = "Left_Insular_Cortex",
    radius_mm: float = 5.0,
    rotation_deg: tuple[float, float, float] = (8.0, -6.0, 10.0),
    scale: tuple[float, float, float] = (1.08, 0.94, 1.04),
    translation_mm: tuple[float, float, float] = (12.0, -9.0, 15.0),
    warp_mm: float = 4.0,
    bias: float = 0.3,
    spacing_mm: float = 1.0,
    seed: int = 0,
) -> SyntheticCase:
    """Build the case. Output grid: ``spacing_mm`` voxels, LAS axis order, origin at a corner."""
    rng = np.random.default_rng(seed)
    data, aff = _icbm()
    centre = lesion_centre(structure)
    # plant the lesion (a bright, slightly blurred ball) at the MNI point
    ijk = np.indices(data.shape, dtype=np.float32).reshape(3, -1)
    xyz = (aff[:3, :3] @ ijk + aff[:3, 3:4]).reshape((3,) + data.shape)
    r = np.sqrt(((xyz - centre[:, None, None, None]) ** 2).sum(0))
    ball = np.clip(radius_mm + 0.5 - r, 0.0, 1.0)
    lesion = ball >= 0.5
    true_centroid = xyz[:, lesion].mean(axis=1)
    brain = data > 0
    data = np.where(brain, data * (1.0 + 0.7 * ball), data)

    src_img = _sitk(data, aff)
    src_les = _sitk(lesion.astype(np.float32), aff)

    # output grid (LAS order, origin at a corner: a header that means nothing in MNI terms)
    size = np.array([int(round(200 / spacing_mm)), int(round(236 / spacing_mm)), int(round(200 / spacing_mm))])
    out_aff = np.diag([-spacing_mm, spacing_mm, spacing_mm, 1.0])
    out_aff[:3, 3] = [size[0] * spacing_mm * 0.5, -size[1] * spacing_mm * 0.5 + 40.0, -size[2] * spacing_mm * 0.5 + 30.0]
    ref = _sitk(np.zeros(tuple(size), np.float32), out_aff)
    centre_out = np.array(ref.TransformContinuousIndexToPhysicalPoint([float(s) / 2 for s in size]))

    # S: output point -> ICBM point = affine(p + smooth displacement(p))
    a = sitk.AffineTransform(3)
    rx, ry, rz = np.deg2rad(rotation_deg)
    rot = sitk.Euler3DTransform((0, 0, 0), float(rx), float(ry), float(rz))
    mat = np.array(rot.GetMatrix()).reshape(3, 3) @ np.diag(scale)
    a.SetMatrix(tuple(mat.ravel()))
    a.SetCenter(tuple(centre_out))
    # shift so the output centre lands on the ICBM brain centre, plus the requested offset
    brain_centre = aff[:3, :3] @ np.array(np.nonzero(brain)).mean(1) + aff[:3, 3]
    brain_centre_lps = np.array([-brain_centre[0], -brain_centre[1], brain_centre[2]])
    a.SetTranslation(tuple(brain_centre_lps - centre_out + np.array(translation_mm)))
    comp = sitk.CompositeTransform(3)
    comp.AddTransform(a)
    if warp_mm > 0:
        coarse = sitk.Image([int(s) for s in np.ceil(size * spacing_mm / 8.0).astype(int)], sitk.sitkVectorFloat64, 3)
        coarse.SetSpacing((8.0, 8.0, 8.0))
        coarse.SetOrigin(ref.GetOrigin())
        coarse.SetDirection(ref.GetDirection())
        cs = np.array(coarse.GetSize())
        zz, yy, xx = np.meshgrid(*(np.arange(n) * 8.0 for n in cs[::-1]), indexing="ij")
        disp = np.zeros(tuple(cs[::-1]) + (3,))
        for d in range(3):
            ph = rng.uniform(0, 2 * np.pi, 3)
            disp[..., d] = warp_mm * np.sin(2 * np.pi * xx / 110 + ph[0]) * np.cos(2 * np.pi * yy / 130 + ph[1]) * np.sin(
                2 * np.pi * zz / 100 + ph[2]
            )
        field = sitk.GetImageFromArray(disp, isVector=True)
        field.CopyInformation(coarse)
        dt = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
        dt.SetInterpolator(sitk.sitkLinear)
        comp.AddTransform(dt)
    moved = sitk.Resample(src_img, ref, comp, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    moved_les = sitk.Resample(src_les, ref, comp, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    arr = np.transpose(sitk.GetArrayFromImage(moved), (2, 1, 0))
    les = np.transpose(sitk.GetArrayFromImage(moved_les), (2, 1, 0)) >= 0.5
    # multiplicative smooth bias field (+-bias across the field of view)
    g = np.indices(arr.shape, dtype=np.float32) / np.array(arr.shape, dtype=np.float32)[:, None, None, None]
    field_b = 1.0 + bias * (0.6 * (g[0] - 0.5) * 2 + 0.4 * np.sin(np.pi * g[1]) * (g[2] - 0.5) * 2)
    arr = (arr * field_b * 1000.0).astype(np.float32)
    meta = {"filename_or_obj": f"synthetic_{structure}.nii.gz", "kind": "volume", "spacing_known": True}
    vol = MetaTensor(torch.from_numpy(arr[None]), affine=torch.as_tensor(out_aff), meta=meta)
    msk = MetaTensor(torch.from_numpy(les[None].astype(np.uint8)), affine=torch.as_tensor(out_aff), meta=dict(meta))
    params = {
        "rotation_deg": list(rotation_deg), "scale": list(scale), "translation_mm": list(translation_mm),
        "warp_mm": warp_mm, "bias": bias, "radius_mm": radius_mm, "spacing_mm": spacing_mm,
        "lesion_voxels": int(les.sum()),
    }
    return SyntheticCase(vol, msk, structure, true_centroid, params)
