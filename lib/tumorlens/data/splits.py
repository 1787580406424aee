"""Grouped train/validation splits: a group (≈ patient) never straddles the two parts.

A group is only an approximation of a patient where the data has no patient ids. ``brain-mri-2d``'s groups are
5 % bins of slice position, and its ``run`` column marks consecutive slices of one head in one view: 45 runs
crossed a bin edge, so 163 of the 722 validation images had the neighbouring slices of the same head in
training, and they scored higher (accuracy 0.988 against 0.968, Grad-CAM pointing 0.871 against 0.775; outside
audit, session 36). A validation image whose ``run`` (``LINK_COLUMNS``) also holds a training image is
therefore set aside: it is in neither part. The training part stays as it was, so models trained on it keep
their training set, and validation holds only images no training image shares a run with.
"""

from __future__ import annotations

import random
from collections import defaultdict

from tumorlens.data.manifest import Manifest

# manifest columns whose equal values mark images of one patient beyond their group
LINK_COLUMNS = ("run",)


def grouped_split(manifest: Manifest, val_fraction: float = 0.2, seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices (train, val). Groups are drawn per majority label so every class is in both parts; validation
    images linked to a training image (``LINK_COLUMNS``) are in neither (``set_aside``)."""
    by_group: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(manifest.records):
        by_group[r.group].append(i)
    by_label: dict[str, list[str]] = defaultdict(list)
    for g, idx in sorted(by_group.items()):
        labels = [manifest.records[i].label for i in idx]
        by_label[max(set(labels), key=labels.count)].append(g)
    rng = random.Random(seed)
    val: list[int] = []
    for _label, groups in sorted(by_label.items()):
        rng.shuffle(groups)
        total = sum(len(by_group[g]) for g in groups)
        taken = 0
        for g in groups:
            if taken >= val_fraction * total:
                break
            val.extend(by_group[g])
            taken += len(by_group[g])
    val_set = set(val)
    train = [i for i in range(len(manifest.records)) if i not in val_set]
    linked = _links(manifest, train)
    val = [i for i in val if not (_link_values(manifest, i) & linked)]
    return train, sorted(val)


def _link_values(manifest: Manifest, i: int) -> set[tuple[str, str]]:
    extra = manifest.records[i].extra
    return {(c, v) for c in LINK_COLUMNS if (v := str(extra.get(c) or "").strip())}


def _links(manifest: Manifest, indices: list[int]) -> set[tuple[str, str]]:
    return {link for i in indices for link in _link_values(manifest, i)}


def set_aside(manifest: Manifest, train: list[int], val: list[int]) -> list[int]:
    """The images in neither part: validation draws that share a run with training."""
    used = set(train) | set(val)
    return [i for i in range(len(manifest.records)) if i not in used]


def training_split(manifest: Manifest, val_fraction: float = 0.2, seed: int = 0,
                   max_images: int | None = None) -> tuple[list[int], list[int]]:
    """The (train, val) indices training uses: the grouped split, then optionally a fixed random subset
    of each part (``max_images`` training images, a quarter as many, at least 32, for validation)."""
    train, val = grouped_split(manifest, val_fraction, seed)
    if max_images:
        import numpy as np

        rng = np.random.default_rng(seed)
        k = int(max_images)
        train = sorted(rng.choice(train, size=min(k, len(train)), replace=False).tolist())
        val = sorted(rng.choice(val, size=min(max(k // 4, 32), len(val)), replace=False).tolist())
    return train, val
