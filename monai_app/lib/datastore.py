"""The local-folder datastore with the checks MONAI Label leaves to the app.

MONAI Label's ``LocalDatastore`` copies whatever it is sent straight into place. Here every upload
is read with tumorlens' readers first (a non-image or corrupt file is a 400 and nothing is
stored), ids cannot leave the folder, a label must match its image's grid, and every file -
images, labels and ``datastore_v2.json`` - is written to a hidden temporary name and renamed, so a
crash mid-save never leaves a half-written file that would be served afterwards.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag

from lib.errors import bad_request, check_id, conflict, not_found, storage_error
from tumorlens.activelearning.finetune import check_label_class, read_label_like
from tumorlens.data.readers import is_volume, read_image
from tumorlens.errors import InvalidInputError
from tumorlens.findings.identifiers import identifier_kinds_in_name
from tumorlens.labels import canonical_label

EXTENSIONS = ["*.nii.gz", "*.nii", "*.nrrd", "*.jpg", "*.jpeg", "*.png", "*.dcm"]
PARTIAL = ".partial"
INDEX = "datastore_v2.json"
BACKUP = ".copy"  # .datastore_v2.json.copy: a second copy of the index, written before it
VANISHED = "vanished.json"  # info of entries whose files went missing, until they come back
logger = logging.getLogger(__name__)


def atomic_copy(src: str | Path, dest: str | Path) -> None:
    dest = Path(dest)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=PARTIAL, dir=dest.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o644)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def segment_names(info: dict) -> list[str]:
    """The names a label's info gives its segments (``label_names`` keys, ``label_info`` names, as 3D Slicer
    and OHIF send them): stored with the label and sent to every client that lists the datastore."""
    names = list(info.get("label_names") or {}) if isinstance(info.get("label_names"), dict) else []
    if isinstance(info.get("label_info"), list):
        names += [seg.get("name") for seg in info["label_info"] if isinstance(seg, dict)]
    return [n for n in names if isinstance(n, str)]


def refuse_identifiers(text: str, what: str, instead: str) -> None:
    """A name the datastore stores, logs and sends back in every answer (an image id, a label tag, a segment
    name) must not name the patient: a 400 saying ``what`` looked like one and what to use ``instead``."""
    kinds = identifier_kinds_in_name(text)
    if kinds:
        raise bad_request(f"{what} looks like it holds a patient identifier ({', '.join(kinds)}); {instead}")


def check_segment_names(info: dict, what: str) -> dict:
    """Segment names ("Smith_John_19700101", "Mr Smith" refused as an image id is). Returns the info."""
    for name in segment_names(info):
        refuse_identifiers(name, f"{what}: a segment name", "rename the segment (e.g. 'tumour') and submit again")
    return info


def check_class_name(info: dict, what: str) -> dict:
    """A class stored in image or label info must be one the models know (training reads it); other
    spellings of one ("Glioma", "notumor") are stored as the model's own name. Returns the info."""
    from tumorlens.labels import CLASS_NAMES, canonical_label

    for key in ("class_name", "class"):
        if key in info:
            name = canonical_label(info[key]) if isinstance(info[key], str) else None
            if name is None:
                raise bad_request(f"{what}: unknown {key} {info[key]!r}; one of {', '.join(CLASS_NAMES)}")
            info[key] = name
    return info


MAGIC = [(b"\xff\xd8\xff", "a JPEG"), (b"\x89PNG", "a PNG"), (b"\x1f\x8b", "gzip data (.nii.gz?)"),
         (b"NRRD", "an NRRD"), (b"\x5c\x01\x00\x00", "a NIfTI-1 (.nii)")]


def content_hint(path: str, ext: str) -> str:
    """What the bytes of an upload look like, when that disagrees with its file name's extension
    (a client that sends no file name gets MONAI Label's default, .nii.gz)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return ""
    if head[128:132] == b"DICM":
        kind = "a DICOM"
    else:
        kind = next((k for magic, k in MAGIC if head.startswith(magic)), "")
    expected = {".jpg": "a JPEG", ".jpeg": "a JPEG", ".png": "a PNG", ".nii.gz": "gzip data (.nii.gz?)",
                ".nrrd": "an NRRD", ".nii": "a NIfTI-1 (.nii)", ".dcm": "a DICOM"}.get(ext)
    if kind and kind != expected:
        return f" (the name says {ext} but the content looks like {kind}: send the file with its own name)"
    return ""


def in_temp_folder(path: str | Path) -> bool:
    """Whether ``path`` lies directly in the temporary folder, where MONAI Label puts every upload."""
    return Path(path).parent.resolve() == Path(tempfile.gettempdir()).resolve()


@contextmanager
def _dropped_if_refused(upload: str):
    """MONAI Label removes an uploaded temporary file only after a successful answer: a refused upload
    (patient data, up to the size limit) stayed in the temporary folder for good."""
    try:
        yield
    except BaseException:
        if in_temp_folder(upload):
            Path(upload).unlink(missing_ok=True)
        raise


def class_from_segments(label_file: str, label_info) -> str | None:
    """The class a label names through its segments, as 3D Slicer's MONAI Label module saves it:
    ``label_info`` = ``[{"name": ..., "idx": ...}]`` with one segment per label of ``/info/`` (the four
    classes among them). The class is the one class-named segment painted in the label, if exactly one."""
    from tumorlens.labels import canonical_label

    painted = _painted_seg_nrrd_segments(label_file)
    if painted is not None:  # a .seg.nrrd names its own segments, layers and values (overlapping ones in layers)
        found = {canonical_label(n) for n in painted} - {None}
        if len(found) > 1:
            raise InvalidInputError(label_file, f"segments of {len(found)} classes are painted ({', '.join(sorted(found))})"
                                                ": an image holds one tumour type; paint the tumour in one class segment")
        return found.pop() if found else None
    if not isinstance(label_info, list):
        return None
    names = {}
    for seg in label_info:
        if isinstance(seg, dict) and isinstance(seg.get("name"), str):
            idx = seg.get("idx", seg.get("label", seg.get("value")))
            if isinstance(idx, int | float) and not isinstance(idx, bool) and canonical_label(seg["name"]):
                names[int(idx)] = canonical_label(seg["name"])
    if not names:
        return None
    try:
        import numpy as np

        values = set(np.unique(read_image(label_file).detach().cpu().numpy()).astype(int).tolist())
    except (InvalidInputError, ValueError):
        return None
    found = {names[v] for v in values if v in names}
    if len(found) > 1:  # the one kept by chance would have trained the classifier with it
        raise InvalidInputError(label_file, f"segments of {len(found)} classes are painted ({', '.join(sorted(found))}): "
                                            "an image holds one tumour type; paint the tumour in one class segment")
    return found.pop() if found else None


def _painted_seg_nrrd_segments(label_file: str) -> list[str] | None:
    """Names of the painted segments of a 3D Slicer ``.seg.nrrd`` (read from its own header, each segment by its
    layer and label value), or None for any other file. A two-layer file (overlapping segments) had been read as
    values alone, and its painted class was lost (an outside probe, session 38)."""
    try:
        with open(label_file, "rb") as fh:
            head = fh.read(65536)
    except OSError:
        return None
    if not head.startswith(b"NRRD") or b"Segment0_" not in head:
        return None
    import numpy as np
    import slicerio

    try:
        seg = slicerio.read_segmentation(str(label_file))
    except Exception as e:  # noqa: BLE001 - any reader failure is the file's problem, said as such
        raise InvalidInputError(label_file, f"not a readable segmentation: {e}") from e
    vox = np.asarray(seg["voxels"])
    layers = vox if vox.ndim == 4 else vox[None]
    out = []
    for s in seg.get("segments", []):
        layer, value = int(s.get("layer", 0) or 0), s.get("labelValue")
        if value is not None and layer < len(layers) and np.any(layers[layer] == int(value)):
            out.append(str(s.get("name", "")))
    return out


def bin_label_as_nifti(image_uri: str, label_file: str, what: str) -> str:
    """A NIfTI of a raw label buffer (``label.bin``: one uint8 per voxel, x fastest, as the OHIF MONAI Label plugin
    saves a labelmap) on the image's geometry, converted as MONAI Label's own DICOMweb datastore converts it. It
    had been refused with a 400, so OHIF could not save a label here (an outside probe, session 38)."""
    import numpy as np
    from monai.transforms import LoadImage
    from monailabel.datastore.utils.convert import binary_to_image

    try:
        shape = LoadImage(image_only=True)(image_uri).shape
    except Exception as e:  # noqa: BLE001 - a picture or an unreadable image has no voxel order to fill
        raise bad_request(f"{what}: a raw label buffer (.bin) needs a volume to take its geometry from ({e})") from e
    size = os.path.getsize(label_file)
    if len(shape) != 3 or size != int(np.prod(shape)):
        raise bad_request(f"{what}: label.bin holds {size} bytes; the image has {int(np.prod(shape))} voxels "
                          f"({' x '.join(map(str, shape))}): send one uint8 per voxel, x fastest, or a NIfTI/NRRD label")
    return binary_to_image(image_uri, label_file)


def final_label_class(datastore, image_id: str) -> str | None:
    """The class an image's final label trains the classifier with: the label's ``class_name`` (or
    ``class``), else the image's own ``class_name``; None when neither names one (a mask alone)."""
    info = datastore.get_label_info(image_id, DefaultLabelTag.FINAL) or {}
    cls = info.get("class_name") or info.get("class") or (datastore.get_image_info(image_id) or {}).get("class_name")
    return (canonical_label(cls) or cls) if isinstance(cls, str) else cls  # stored before names were normalised


def training_gaps(datastore) -> dict[str, str]:
    """Images the classifier cannot train on yet, each with what it lacks: ``label`` (no final label)
    or ``class_name`` (a final label that names no class). The second kind stays a candidate for the
    active-learning strategies: fine-tuning skips it, so leaving the pool would lose it for good."""
    gaps = {image_id: "label" for image_id in datastore.get_unlabeled_images(DefaultLabelTag.FINAL)}
    for image_id in datastore.get_labeled_images(DefaultLabelTag.FINAL):
        if not final_label_class(datastore, image_id):
            gaps[image_id] = "class_name"
    return gaps


def file_digest(path: str | Path, algo: str = "sha256") -> str:
    import hashlib

    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _same_voxels(a: str | Path, b: str | Path) -> bool:
    """Same image content in different bytes (a re-exported NIfTI differs in its gzip header's time)."""
    try:
        x, y = read_image(a), read_image(b)
    except InvalidInputError:
        return False
    import numpy as np

    xa, ya = np.asarray(x.affine, dtype=float), np.asarray(y.affine, dtype=float)
    if x.shape == y.shape and np.array_equal(x.numpy(), y.numpy()) and np.allclose(xa, ya, atol=1e-4):
        return True
    # a picture and the one-slice volume a viewer saved of it: 3D Slicer writes a JPEG as column x row with
    # its own geometry, and sends that file back under the picture's id before saving a label
    pics = [(v, a) for v, a in ((x, xa), (y, ya)) if v.meta.get("kind") == "image2d"]
    if len(pics) != 1:
        return False
    (pic, pic_aff), (vol, vol_aff) = pics[0], next((v, a) for v, a in ((x, xa), (y, ya)) if v is not pics[0][0])
    arr = vol.numpy()[0]
    if arr.ndim != 3 or 1 not in arr.shape:
        return False
    from tumorlens.data.readers import reorient_like

    arr, _ = reorient_like(arr, vol_aff, pic_aff)
    return arr.shape[-1] == 1 and np.array_equal(arr[..., 0], pic.numpy()[0])


def file_ext(name: str) -> str:
    """The extension the datastore files a name under (``.nii.gz`` whole, not ``.gz``)."""
    low = name.lower()
    for e in (x.replace("*", "") for x in EXTENSIONS):
        if low.endswith(e):
            return e
    return Path(name).suffix.lower()


def nested_images_hint(root: Path, listed: int) -> str | None:
    """Why an empty datastore is empty, when its images lie in subfolders (a Kaggle-style folder of class
    subfolders): MONAI Label lists the studies folder's top level only, so the server would start with no
    image and say nothing."""
    if listed or not root.is_dir():
        return None
    where: dict[str, int] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "labels"):
        n = sum(1 for f in d.rglob("*") if f.is_file() and any(fnmatch(f.name.lower(), e) for e in EXTENSIONS))
        if n:
            where[d.name] = n
    if not where:
        return None
    folders = ", ".join(f"{name}/ ({n})" for name, n in list(where.items())[:6]) + (" ..." if len(where) > 6 else "")
    return (f"the studies folder lists no image at its top level, but {sum(where.values())} image files lie in its "
            f"subfolders: {folders}. MONAI Label reads the top level only: start the server on the folder that "
            "holds the images, or put them in one folder (an image's class can go in its info as class_name)")


DELETION_MEMORY_S = 86400  # how long a deletion on request is remembered for other processes' folder watchers


def _deleted_at(rec: dict, tag: str | None = None) -> float:
    """When the image (or its label ``tag``) of a ``vanished.json`` record was deleted on request (0: never)."""
    t = rec.get("deleted") if tag is None else rec.get("deleted_labels", {}).get(tag)
    return float(t) if isinstance(t, int | float) and not isinstance(t, bool) else 0.0


def _saved_before(info: dict, deleted_at: float) -> bool:
    """Whether an entry with this info was saved before a deletion at ``deleted_at`` (the deleted one itself)."""
    ts = info.get("ts") if isinstance(info, dict) else None
    return deleted_at > 0 and isinstance(ts, int | float) and ts <= deleted_at


def _live(data: dict) -> dict:
    """Records still holding info to give back, or a deletion recent enough to matter."""
    now = time.time()
    out = {}
    for image_id, rec in data.items():
        marks = {t: v for t, v in rec.get("deleted_labels", {}).items() if now - float(v) < DELETION_MEMORY_S}
        rec = {k: v for k, v in rec.items() if k != "deleted_labels"} | ({"deleted_labels": marks} if marks else {})
        if "deleted" in rec and now - _deleted_at(rec) >= DELETION_MEMORY_S:
            rec.pop("deleted")
        if rec.get("image") or rec.get("labels") or rec.get("deleted") or rec.get("deleted_labels"):
            out[image_id] = rec
    return out


def _forgotten(data: dict, image_id: str, tag: str | None, deleted: bool) -> dict:
    """``vanished.json`` without the info of an image (``tag`` None) or one label, marked deleted if it was."""
    rec = dict(data.get(image_id, {}))
    if tag is None:
        rec = {"deleted": time.time()} if deleted else {}
    else:
        rec["labels"] = {t: v for t, v in rec.get("labels", {}).items() if t != tag}
        marks = {t: v for t, v in rec.get("deleted_labels", {}).items() if t != tag}
        rec["deleted_labels"] = {**marks, tag: time.time()} if deleted else marks
    return _live({**data, image_id: rec})


class TumorlensDatastore(LocalDatastore):
    """``LocalDatastore`` + validation + atomic writes (see the module docstring)."""

    hint_nested_images = True  # a folder datastore whose images lie in subfolders says so at start
    # the app's active-learning score store (``<state>/scores.json``), shown in an image's info: a client saw the
    # scores only in a scoring run's log line (an outside probe, session 39). Never written into the index: a scoring
    # subprocess rewriting it from its own copy had dropped what the server saved meanwhile
    scores_file: Path | None = None
    _scores_cache: tuple[tuple, dict] | None = None

    def __init__(self, datastore_path: str, **kwargs):
        self._sweep(Path(datastore_path))
        self._recover_index(Path(datastore_path) / kwargs.get("datastore_config", INDEX))
        self._vanished_file = Path(datastore_path) / ".tumorlens" / VANISHED
        # LocalDatastore's by name: a subclass may also derive from another LocalDatastore (DICOMweb)
        LocalDatastore.__init__(self, datastore_path, extensions=EXTENSIONS, **kwargs)
        handler = getattr(self, "_handler", None)
        if handler is not None:
            handler.on_moved = self._on_index_replaced
        hint = nested_images_hint(Path(datastore_path), len(self.list_images())) if self.hint_nested_images else None
        if hint:
            logger.warning(hint)

    @staticmethod
    def _recover_index(index: Path) -> None:
        """A damaged index (truncated, emptied, ``{}``) stopped the server at start with a bare validation
        traceback, and it is the only record of every label's class and annotator. It is set aside
        (``*.damaged-<time>``, never deleted) and the second copy written with it takes its place; without a
        readable one, MONAI Label rebuilds the index from the files (their info is then in the set-aside file)."""
        from monailabel.datastore.local import LocalDatastoreModel

        if not index.is_file():
            return
        try:
            LocalDatastoreModel.model_validate_json(index.read_text())
            return
        except (ValueError, OSError) as e:
            problem = str(e).splitlines()[0][:200]

        aside = index.with_name(f"{index.name}.damaged-{int(time.time())}")
        os.replace(index, aside)
        backup = index.with_name(f".{index.name}{BACKUP}")
        try:
            LocalDatastoreModel.model_validate_json(backup.read_text())
            shutil.copyfile(backup, index)
            logger.error(f"{index.name} could not be read ({problem}); set aside as {aside.name}, and the second copy "
                         "written with it restored")
        except (ValueError, OSError):
            logger.error(f"{index.name} could not be read ({problem}) and no readable copy was kept; set aside as "
                         f"{aside.name} (labels' classes and annotators are in it) and the index rebuilt from the files")

    @staticmethod
    def _sweep(root: Path) -> None:
        """Remove temporary files a killed save left behind (they were never renamed into place)."""
        if not root.is_dir():
            return
        for p in list(root.glob(f".*{PARTIAL}")) + list(root.glob(f"labels/*/.*{PARTIAL}")) + \
                list(root.glob(".datastore_v2.json.*.tmp")):
            logger.warning(f"removing half-written file left by an interrupted save: {p.name}")
            p.unlink(missing_ok=True)

    # ---- writes ----------------------------------------------------------------------------------
    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        with _dropped_if_refused(image_filename):
            return self._add_image(image_id, image_filename, image_info)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        with _dropped_if_refused(label_filename):
            if file_ext(label_filename) != ".bin":
                return self._save_label(image_id, label_filename, label_tag, label_info)
            check_id(image_id)
            if image_id not in self._datastore.objects:
                raise not_found(f"unknown image id {image_id!r}: upload the image first")
            converted = bin_label_as_nifti(self.get_image_uri(image_id), label_filename, f"label for {image_id}")
            try:
                return self._save_label(image_id, converted, label_tag, label_info)
            finally:
                Path(converted).unlink(missing_ok=True)

    def _add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        ext = file_ext(image_filename)
        if f"*{ext}" not in EXTENSIONS:
            series = (" (an archived DICOM series: convert it to one NIfTI or NRRD volume, or send it as a session with "
                      "PUT /session/?uncompress=true)" if ext in (".zip", ".tar", ".gz", ".tgz") else "")
            raise bad_request(f"upload {image_id or ''}{ext}: unsupported file type {ext!r}; "
                              f"send JPEG/PNG, NIfTI (.nii/.nii.gz), NRRD or DICOM (.dcm){series}")
        image_id = image_id or self._to_id(os.path.basename(image_filename))[0]
        check_id(image_id)
        refuse_identifiers(image_id, f"upload{ext}: the image id", "upload it under another id (a study or case code)")
        try:
            img = read_image(image_filename)
        except InvalidInputError as e:
            raise bad_request(f"upload {image_id}{ext}: {e.problem}{content_hint(image_filename, ext)}") from e
        info = check_class_name(dict(image_info or {}), f"upload {image_id}{ext}")
        info.update(kind=img.meta.get("kind"), dims=[int(s) for s in img.shape[1:]])
        dest = Path(self._datastore.image_path()) / self._filename(image_id, ext)
        with self._lock():
            if self._same_image_stored(image_id, image_filename):
                return image_id  # the same bytes again (a client retrying an upload): nothing changes

            from monailabel.datastore.local import DataModel, ImageLabelModel

            before = self._datastore.objects
            try:
                if image_id not in before:  # label files left by an earlier image of this id are not this one's
                    for folder in Path(self._datastore_path, "labels").glob("*/"):
                        for old in folder.glob(f"{glob.escape(image_id)}.*"):
                            if self._to_id(old.name)[0] == image_id:
                                self._keep_in_history(folder.name, image_id, old, None, move=True)
                atomic_copy(image_filename, dest)
                info.update(ts=int(time.time()), name=dest.name)
                # a new dict, not one changed in place: MONAI Label's folder watcher may be iterating the old one
                self._datastore.objects = {**self._datastore.objects,
                                           image_id: ImageLabelModel(image=DataModel(info=info, ext=ext), labels={})}
                self._update_datastore_file(lock=False)
            except OSError as e:
                self._datastore.objects = before
                if image_id not in before:
                    dest.unlink(missing_ok=True)
                raise storage_error(e, f"upload {image_id}{ext}") from e
        self._forget_vanished(image_id)  # a new image under this id: the info of one that went missing is not its
        return image_id

    def _same_image_stored(self, image_id: str, upload: str) -> bool:
        """True when ``image_id`` already holds exactly ``upload``; a 409 when it holds another image:
        replacing it would leave its labels (and their classes) on an image they do not describe."""
        obj = self._datastore.objects.get(image_id)
        if obj is None:
            return False
        stored = Path(self._datastore.image_path()) / self._filename(image_id, obj.image.ext)
        if not stored.is_file():  # an index entry whose file is gone: the upload restores it
            return False
        if file_digest(stored) == file_digest(upload) or _same_voxels(stored, upload):
            return True
        raise conflict(f"image id {image_id!r} already holds another image ({obj.image.info.get('name', stored.name)}, "
                       f"{len(obj.labels)} label(s)); upload under a new id, or DELETE /datastore/image?id={image_id} "
                       "first")

    def _save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        check_id(image_id)
        # "Final", "FINAL " are the standard tags mistyped: stored apart, they left the image unlabelled (a probe)
        if isinstance(label_tag, str) and label_tag.strip().lower() in (DefaultLabelTag.FINAL.value,
                                                                        DefaultLabelTag.ORIGINAL.value):
            label_tag = label_tag.strip().lower()
        check_id(label_tag or DefaultLabelTag.FINAL.value, "label tag")
        refuse_identifiers(label_tag or "", f"label for {image_id}: the label tag", "use another tag")
        obj = self._datastore.objects.get(image_id)
        if not obj:
            raise not_found(f"unknown image id {image_id!r}: upload the image first")
        ext = file_ext(label_filename)
        if ext not in (".nii.gz", ".nii", ".nrrd", ".png"):
            raise bad_request(f"label for {image_id}: unsupported label type {ext!r}; send PNG (2D), NIfTI or NRRD (or a raw uint8 label.bin on a volume)")
        try:
            img = read_image(self.get_image_uri(image_id))
            mask = read_label_like(label_filename, img)
        except InvalidInputError as e:
            raise bad_request(f"label for {image_id}: {e.problem}") from e
        info = check_segment_names(check_class_name(dict(label_info or {}), f"label for {image_id}"), f"label for {image_id}")
        if not (info.get("class_name") or info.get("class")):
            try:
                cls = class_from_segments(label_filename, info.get("label_info"))
            except InvalidInputError as e:
                raise bad_request(f"label for {image_id}: {e.problem}") from e
            if cls:
                info["class_name"] = cls
        earlier = obj.labels.get(label_tag or DefaultLabelTag.FINAL.value)
        if not (info.get("class_name") or info.get("class")) and earlier is not None and earlier.info.get("class_name") \
                and "model" not in info:
            # a corrected mask sent without its class (Slicer's submit leaves it out unless chosen again)
            # keeps the class given before: dropping it silently put the image back in the pool. Not a model's
            # prediction saved over it (MONAI Label's info {"model", "params"}): its class is in its params, and
            # the annotator's class had been kept on the model's mask
            info["class_name"] = earlier.info["class_name"]
        cls = info.get("class_name") or info.get("class")
        if isinstance(cls, str):
            try:
                check_label_class(mask, cls, None, is_volume(img))
            except InvalidInputError as e:
                raise bad_request(f"label for {image_id}: {e.problem}") from e
        tag = label_tag or DefaultLabelTag.FINAL.value
        label_path = Path(self._datastore.label_path(tag))
        label_path.mkdir(parents=True, exist_ok=True)

        from monailabel.datastore.local import DataModel

        with self._lock():
            # all of the save or none of it: the label it replaces (in any format) is kept in the label
            # history first, and put back if the new file or the index cannot be written (a full disk had
            # left the new mask under the old annotator's class, the old mask gone). The old file stays in place
            # until the new one has replaced it: moved away first, a server killed between the two had lost the
            # label an earlier save had acknowledged (the restarted server dropped it from the index)
            before = obj.labels
            dest = label_path / self._filename(image_id, ext)
            kept: list[tuple[Path, Path]] = []
            try:
                for old_file in sorted(label_path.glob(f"{glob.escape(image_id)}.*")):
                    if self._to_id(old_file.name)[0] == image_id:
                        kept.append((old_file, self._keep_in_history(tag, image_id, old_file, earlier)))
                atomic_copy(label_filename, dest)
                for old_file, _ in kept:  # the same label in another format goes once the new one is in place
                    if old_file != dest:
                        old_file.unlink(missing_ok=True)
                info.update(ts=int(time.time()), name=dest.name)
                obj.labels = {**obj.labels, tag: DataModel(info=info, ext=ext)}
                self._update_datastore_file(lock=False)
            except OSError as e:
                obj.labels = before
                if dest.exists() and all(dest != old for old, _ in kept):
                    dest.unlink(missing_ok=True)
                for old, copy in kept:
                    os.replace(copy, old)
                raise storage_error(e, f"label for {image_id}") from e
        self._forget_vanished(image_id, tag)
        return image_id

    HISTORY_KEEP = 5  # earlier labels kept per image and tag

    def _keep_in_history(self, tag: str, image_id: str, label_file: Path, earlier, move: bool = False) -> Path:
        """Keep a label about to be replaced in ``.tumorlens/label-history/<tag>/<id>/`` with its info (an
        older mask re-saved over a newer one had left no copy of it), as a second link to the file (a copy where
        links are not possible), so the label itself stays in place until its replacement is (``move``: the label
        goes, as when its image is replaced); the oldest beyond ``HISTORY_KEEP`` go."""
        folder = Path(self._datastore_path) / ".tumorlens" / "label-history" / tag / image_id
        folder.mkdir(parents=True, exist_ok=True)
        # named by when it was replaced, in ns (unique; the order of the names is the order of replacement): names
        # from the replaced label's save time in seconds collided for saves within one second and overwrote each
        # other, and an older copy was kept instead
        stamp = f"{time.time_ns()}-{os.getpid()}"
        copy = folder / f"{stamp}{file_ext(label_file.name)}"
        if move:
            os.replace(label_file, copy)
        else:
            try:
                os.link(label_file, copy)
            except OSError:  # another file system, or links not allowed
                shutil.copy2(label_file, copy)
        if earlier is not None:
            (folder / f"{stamp}.json").write_text(json.dumps(earlier.info, indent=2, default=str))
        entries = sorted(p.name for p in folder.iterdir() if p.suffix != ".json")
        entries = [folder / n for n in entries]
        for old in entries[:-self.HISTORY_KEEP]:
            old.unlink(missing_ok=True)
            (folder / (old.name[: -len(file_ext(old.name))] + ".json")).unlink(missing_ok=True)
        return copy

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        try:
            super().update_image_info(image_id, check_class_name(dict(info), f"image {image_id}"))
        except OSError as e:
            raise storage_error(e, f"info of image {image_id}") from e

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        what = f"label of {label_id}"
        info = check_segment_names(check_class_name(dict(info), what), what)
        self._check_class_of_stored_label(label_id, label_tag, info.get("class_name") or info.get("class"))
        try:
            super().update_label_info(label_id, label_tag, info)
        except OSError as e:
            raise storage_error(e, f"info of the {what}") from e

    def _check_class_of_stored_label(self, image_id: str, tag: str, cls) -> None:
        """The class set on a stored label must agree with its mask, as when the label is saved: ``no_tumor`` on a
        mask with a tumour drawn was accepted here (a 400 on save), and the image then counted as labelled while
        training skipped it (an outside probe, session 40)."""
        if not isinstance(cls, str):
            return
        uri = self.get_label_uri(image_id, tag) if image_id in self._datastore.objects else ""
        if not uri or not Path(uri).is_file():
            return  # no such label: MONAI Label's own answer follows
        try:
            img = read_image(self.get_image_uri(image_id))
            check_label_class(read_label_like(uri, img), cls, None, is_volume(img))
        except InvalidInputError as e:
            raise bad_request(f"label of {image_id}: {e.problem}") from e

    def remove_image(self, image_id: str) -> None:
        check_id(image_id)
        if image_id not in self._datastore.objects:
            raise not_found(f"unknown image id {image_id!r}")
        super().remove_image(image_id)
        self._forget_vanished(image_id, deleted=True)
        with self._lock():  # listed no more at once, not when the folder watcher catches up
            self._datastore.objects = {k: v for k, v in self._datastore.objects.items() if k != image_id}
            self._update_datastore_file(lock=False)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        check_id(label_id)
        check_id(label_tag, "label tag")
        super().remove_label(label_id, label_tag)
        self._forget_vanished(label_id, label_tag, deleted=True)
        obj = self._datastore.objects.get(label_id)
        if obj is not None and label_tag in obj.labels:
            with self._lock():
                obj.labels = {k: v for k, v in obj.labels.items() if k != label_tag}
                self._update_datastore_file(lock=False)

    def current_image_ids(self) -> set[str]:
        """The images this process lists and those the index file lists now: a scoring run's datastore does not
        watch the folder, and the server may have added images to the index since the run read it."""
        from monailabel.datastore.local import LocalDatastoreModel

        ids = set(self.list_images())
        try:
            ids |= set(LocalDatastoreModel.model_validate_json(Path(self._datastore_config_path).read_text()).objects)
        except (OSError, ValueError):
            pass
        return ids

    def _current_scores(self) -> dict:
        """The score store, parsed again only when its file changed: the strategies ask every candidate's info
        (1,200 images, each request), and the store can hold megabytes."""
        if self.scores_file is None:
            return {}
        try:
            st = os.stat(self.scores_file)
        except OSError:
            return {}
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._scores_cache is None or self._scores_cache[0] != key:
            try:
                data = json.loads(Path(self.scores_file).read_text())
            except (OSError, ValueError):
                return {}
            self._scores_cache = (key, data if isinstance(data, dict) else {})
        return self._scores_cache[1]

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        if image_id not in self._datastore.objects:  # MONAI Label answers {} with 200
            raise not_found(f"unknown image id {image_id!r}")
        info = dict(super().get_image_info(image_id))  # a copy: the scores are shown, not stored
        entries = self._current_scores().get(image_id, {})
        shown = {kind: {k: e[k] for k in ("value", "model_version", "unusable") if k in e}
                 for kind, e in entries.items() if isinstance(e, dict) and ("value" in e or "unusable" in e)}
        if shown:
            info["scores"] = shown
        return info

    def get_dataset_archive(self, limit_cases: int | None) -> str:
        """``GET /datastore/dataset``: MONAI Label asserts that some image has a final label (a 500)."""
        if not self.datalist():
            raise not_found("no image has a final label yet: the dataset archive holds labelled cases only")
        return super().get_dataset_archive(limit_cases)

    def _remove_non_existing(self):
        """MONAI Label's folder watcher drops index entries whose files are gone; when a request changes the
        index at the same moment its loop fails ("dictionary changed size during iteration") and the
        watcher's thread dies for good: new files in the folder were never seen again. It tries again.

        The info of what it drops (a label's class and annotator, an image's picks) is kept aside and given
        back when the same file returns (see ``_vanished``): a label file moved out for a second, or an image
        re-written by a sync tool, had come back as a new entry with no class, out of training."""
        for attempt in range(5):
            try:
                before = {i: (o.image, dict(o.labels)) for i, o in dict(self._datastore.objects).items()}
                n = super()._remove_non_existing()
                break
            except RuntimeError as e:
                if "changed size during iteration" not in str(e) or attempt == 4:
                    raise
                logger.info("datastore index changed while checking for removed files: checking again")
        if n:
            self._keep_vanished(before)
        return n

    # ---- entries whose files went missing ----------------------------------------------------------
    def _vanished(self) -> dict:
        try:
            data = json.loads(self._vanished_file.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write_vanished(self, data: dict) -> None:
        from tumorlens.atomic import atomic_write_text

        try:
            atomic_write_text(self._vanished_file, json.dumps(data, indent=2, default=str))
        except (OSError, InvalidInputError) as e:
            logger.warning(f"could not keep the info of missing files aside: {e}")

    def _keep_vanished(self, before: dict) -> None:
        """Record the info of the entries the watcher just dropped: ``{id: {"image": {ext, info}, "labels":
        {tag: {ext, info}}}}`` (an image's record holds its labels' too, which go with it). Not of what was deleted
        on request: another process's watcher (a scoring run's) sees those files go too, and had kept a deleted
        label's class, which a later file of that name then took."""
        now = self._datastore.objects
        with self._vanished_lock():
            self._record_vanished(before, now)

    def _record_vanished(self, before: dict, now: dict) -> None:
        data = self._vanished()
        for image_id, (image, labels) in before.items():
            gone_labels = {t: lab for t, lab in labels.items() if image_id not in now or t not in now[image_id].labels}
            if image_id in now and not gone_labels:
                continue
            rec = data.setdefault(image_id, {})
            gone = _deleted_at(rec)
            if image_id not in now and not _saved_before(image.info, gone):
                rec["image"] = {"ext": image.ext, "info": dict(image.info)}
            kept = {t: {"ext": lab.ext, "info": dict(lab.info)} for t, lab in gone_labels.items()
                    if not _saved_before(lab.info, max(gone, _deleted_at(rec, t)))}
            if kept:
                rec.setdefault("labels", {}).update(kept)
        self._write_vanished(_live(data))

    def _forget_vanished(self, image_id: str, tag: str | None = None, deleted: bool = False) -> None:
        """An image or label deleted on request does not come back with the old info if a file of that name does;
        ``deleted``: it was deleted on request, and is marked so for other processes' watchers (``_keep_vanished``)."""
        with self._vanished_lock():
            data = self._vanished()
            if image_id not in data and not deleted:
                return
            self._write_vanished(_forgotten(data, image_id, tag, deleted))

    def _vanished_lock(self):
        """One process at a time reads and rewrites ``vanished.json`` (the server and its scoring runs)."""
        from contextlib import nullcontext

        from filelock import FileLock

        try:
            self._vanished_file.parent.mkdir(parents=True, exist_ok=True)
        except OSError:  # a read-only studies folder: nothing is written there, so nothing to order
            return nullcontext()
        if not os.access(self._vanished_file.parent, os.W_OK):
            return nullcontext()
        return FileLock(str(self._vanished_file.with_name(f".{VANISHED}.lock")))

    def _add_non_existing_images(self) -> int:
        n = super()._add_non_existing_images()
        with self._vanished_lock():
            self._restore_images()
        return n

    def _restore_images(self) -> None:
        data = self._vanished()
        back = {i: r for i, r in data.items() if "image" in r and i in self._datastore.objects}
        for image_id, rec in back.items():
            obj = self._datastore.objects[image_id]
            if obj.image.ext == rec["image"]["ext"]:  # the same file name: its info back (another file of that
                obj.image.info = {**rec["image"]["info"], "name": obj.image.info.get("name")}  # stem does not get it)
                logger.info(f"image {image_id} is back: its earlier info restored")
            rec.pop("image")
        if back:
            self._write_vanished(_live(data))

    def _add_non_existing_labels(self, tag) -> int:
        n = super()._add_non_existing_labels(tag)
        with self._vanished_lock():
            self._restore_labels(tag)
        return n

    def _restore_labels(self, tag) -> None:
        data = self._vanished()
        changed = False
        for image_id, rec in data.items():
            lab = rec.get("labels", {}).get(tag)
            obj = self._datastore.objects.get(image_id)
            if lab is None or obj is None or tag not in obj.labels or "image" in rec:
                continue
            current = obj.labels[tag]
            if current.ext == lab["ext"] and self._label_fits(image_id, tag, current.ext):
                current.info = {**lab["info"], "name": current.info.get("name")}
                logger.info(f"label {tag} of {image_id} is back: its class and annotator restored")
            rec["labels"].pop(tag)
            changed = True
        if changed:
            self._write_vanished(_live(data))

    def _label_fits(self, image_id: str, tag: str, ext: str) -> bool:
        """The label file on the image's grid (a label left behind must not give its class to another image
        that took its id)."""
        try:
            img = read_image(self.get_image_uri(image_id))
            read_label_like(Path(self._datastore.label_path(tag)) / self._filename(image_id, ext), img)
            return True
        except (InvalidInputError, OSError, ValueError):
            return False

    def _lock(self):
        from filelock import FileLock

        return FileLock(self._lock_file)

    def _merge_from_disk(self) -> None:
        """Before this process writes the index: take in what another process wrote to it since this one last
        read or wrote it. A batch inference runs in a subprocess that saves its masks (tag ``original``) with their
        info into the index; the server, which never re-read it, wrote its own copy at the next label save and
        erased them (an outside probe, session 40). Only entries whose files exist are taken, so nothing this
        process removed (file and entry together) comes back, and a label the other process removed is not written
        back; an entry both hold keeps this process's version."""
        from monailabel.datastore.local import LocalDatastoreModel

        path = Path(self._datastore_config_path)
        try:
            if os.stat(path).st_mtime == self._config_ts:
                return
            disk = LocalDatastoreModel.model_validate_json(path.read_text())
        except (OSError, ValueError):
            return
        mine = dict(self._datastore.objects)  # replaced, not changed in place: the folder watcher may be reading it
        taken = 0
        for image_id, here in mine.items():  # removed by the other process (its file gone): not written back
            there = disk.objects.get(image_id)
            for tag in [t for t in here.labels if there is None or t not in there.labels]:
                if not Path(self._datastore.label_path(tag), self._filename(image_id, here.labels[tag].ext)).exists():
                    here.labels = {k: v for k, v in here.labels.items() if k != tag}
        for image_id, obj in disk.objects.items():
            here = mine.get(image_id)
            if here is None:
                if Path(self._datastore.image_path(), self._filename(image_id, obj.image.ext)).exists():
                    mine[image_id] = obj
                    taken += 1 + len(obj.labels)
                continue
            for tag, lab in obj.labels.items():
                if tag not in here.labels and Path(self._datastore.label_path(tag), self._filename(image_id, lab.ext)).exists():
                    here.labels = {**here.labels, tag: lab}
                    taken += 1
        self._datastore.objects = mine
        if taken:
            logger.info(f"index: {taken} entries another process saved were taken in before writing it")

    def _on_index_replaced(self, event) -> None:
        """The watcher's answer to another process renaming a new index into place (as every write here is made):
        MONAI Label reloads the index on a modification only, so the server never saw a subprocess's writes."""
        if getattr(event, "dest_path", None) == self._datastore_config_path:
            self._init_from_datastore_file()  # re-reads only when the file is not the one this process wrote

    def _update_datastore_file(self, lock=True):
        """Same content as MONAI Label writes, but via a temporary file and a rename, after taking in what another
        process saved meanwhile (``_merge_from_disk``)."""

        def _write():
            self._merge_from_disk()
            self._ignore_event_config = True
            text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
            path = Path(self._datastore_config_path)
            # a second copy first, in a file of its own (not a link: a truncated index would take it along),
            # for a start after the index is damaged (_recover_index)
            for target in (path.with_name(f".{path.name}{BACKUP}"), path):
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
                try:
                    with os.fdopen(fd, "w") as f:
                        f.write(text)
                        f.flush()
                        os.fsync(f.fileno())
                    os.chmod(tmp, 0o644)  # as MONAI Label writes it (mkstemp makes it private)
                    os.replace(tmp, target)
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
            self._config_ts = os.stat(path).st_mtime

        if lock:
            with self._lock():
                _write()
        else:
            _write()
