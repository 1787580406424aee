"""Rebuild ``samples/studies`` from ../shared/data (run once by a maintainer; the output is committed).

Six 2D slices of brain-mri-2d (two gliomas, a meningioma, a pituitary tumour, two tumour-free) and
one BraTS T1c volume cropped to the brain and resampled to 2 mm (int16), so the demo stays small.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.processing import resample_to_output

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
OUT = Path(__file__).resolve().parent / "studies"
PICK = {"1941": "glioma", "2301": "glioma", "0102": "meningioma", "1064": "pituitary", "3187": "no_tumor",
        "3300": "no_tumor"}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    rows = {Path(r["image"]).stem: r for r in csv.DictReader(open(SHARED / "brain-mri-2d" / "manifest.csv"))}
    truth = []
    for idx, label in PICK.items():
        r = rows[idx]
        assert r["label"] == label, (idx, r["label"])
        shutil.copy(SHARED / "brain-mri-2d" / r["image"], OUT / f"mri2d_{idx}.jpg")
        truth.append({"image": f"mri2d_{idx}", "label": label, "source": r["source"]})
    src = nib.load(SHARED / "brats-3d" / "pat0001" / "T1c_subtrMeanDivStd.nii.gz")
    brain = np.asanyarray(nib.load(SHARED / "brats-3d" / "pat0001" / "brainmask.nii.gz").dataobj) > 0
    idx = np.argwhere(brain)
    lo, hi = np.maximum(idx.min(0) - 4, 0), np.minimum(idx.max(0) + 5, brain.shape)
    crop = src.slicer[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    small = resample_to_output(crop, voxel_sizes=(2.0, 2.0, 2.0), order=1)
    data = np.asanyarray(small.dataobj).astype(np.float32)
    out = nib.Nifti1Image(np.round(data * 100).clip(-32000, 32000).astype(np.int16), small.affine)
    out.header.set_xyzt_units("mm")
    nib.save(out, OUT / "brats_t1c_0001.nii.gz")
    truth.append({"image": "brats_t1c_0001", "label": "glioma", "source": "brats-3d pat0001"})
    with open(OUT.parent / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "label", "source"])
        w.writeheader()
        w.writerows(truth)


if __name__ == "__main__":
    main()
