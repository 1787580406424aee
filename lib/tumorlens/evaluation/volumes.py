"""3D volumes through the 2D network (slice-wise): volume Dice against tumour labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from tumorlens.data.readers import read_image, read_mask
from tumorlens.errors import InvalidInputError
from tumorlens.evaluation.metrics import dice_score
from tumorlens.inference import Predictor


def evaluate_volumes(data_dir: str | Path, image_glob: str, label_glob: str, model: str | None = None,
                     core_labels: tuple[int, ...] = ()) -> dict:
    """Dice of the slice-wise seg head against labels > 0 (whole tumour, incl. oedema for BraTS) and,
    with ``core_labels``, against those labels only (BraTS tumour core 1, 3, 4 is what CE-T1 masks outline)."""
    data_dir = Path(data_dir)
    cases = sorted(p for p in data_dir.iterdir() if p.is_dir())
    if not cases:
        raise InvalidInputError(data_dir, "no case folders")
    pred = Predictor(model)
    out = []
    for case in tqdm(cases, desc="volumes"):
        imgs, labs = sorted(case.glob(image_glob)), sorted(case.glob(label_glob))
        if not imgs or not labs:
            raise InvalidInputError(case, f"needs one {image_glob!r} and one {label_glob!r}")
        img = read_image(imgs[0], expect="3d")
        truth = read_mask(labs[0], like=img)[0].numpy() > 0
        r = pred.predict(img)
        m = r.mask[0].numpy() > 0
        case_res = {"case": case.name, "dice": dice_score(m, truth), "pred_voxels": int(m.sum()),
                    "true_voxels": int(truth.sum()), "label": r.label, "probabilities": r.probabilities}
        if core_labels:
            raw = read_image(labs[0])[0].numpy()
            core = np.isin(np.rint(raw), core_labels)
            case_res["core_dice"] = dice_score(m, core)
            case_res["core_voxels"] = int(core.sum())
        out.append(case_res)
    res = {"cases": out, "mean_dice": float(np.mean([c["dice"] for c in out])),
           "model": {"name": pred.model.name, "version": pred.model.version}}
    if core_labels:
        res["core_labels"] = list(core_labels)
        res["mean_core_dice"] = float(np.mean([c["core_dice"] for c in out]))
    return res
