"""Grouped train/validation splits: a group (≈ patient) never straddles the two parts."""

from __future__ import annotations

import random
from collections import defaultdict

from tumorlens.data.manifest import Manifest


def grouped_split(manifest: Manifest, val_fraction: float = 0.2, seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices (train, val). Groups are drawn per majority label so every class is in both parts."""
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
    return train, sorted(val)


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
