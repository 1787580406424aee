"""TumorLens: run the tumorlens models from 3D Slicer and see masks named by atlas region.

Module, Widget, Logic and Test classes of a scripted Slicer module. The Logic needs only the MRML
scene (no Qt), so it runs in the Slicer application and on the PyPI ``slicer-core`` classes alike;
the Widget is a thin Qt shell over it; everything that needs neither lives in ``TumorLensLib``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import weakref
from typing import Any

import numpy as np
import slicer
import vtk

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # Slicer adds the module folder; plain Python (tests) may not
    sys.path.insert(0, _HERE)

import TumorLensLib as tll  # noqa: E402

try:  # the Slicer application; absent with the PyPI slicer-core package (no Qt there)
    import ctk  # noqa: F401
    import qt
    from slicer.ScriptedLoadableModule import (
        ScriptedLoadableModule,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest,
        ScriptedLoadableModuleWidget,
    )
    from slicer.util import VTKObservationMixin

    HAVE_QT = True
except ImportError:  # Logic stays usable without the application
    HAVE_QT = False

    class ScriptedLoadableModule:  # type: ignore[no-redef]
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleWidget:  # type: ignore[no-redef]
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleLogic:  # type: ignore[no-redef]
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleTest:  # type: ignore[no-redef]
        pass

    class VTKObservationMixin:  # type: ignore[no-redef]
        def __init__(self):
            pass


log = logging.getLogger("TumorLens")

IMAGE_ID_ATTR = "TumorLens.ImageId"
IMAGE_HASH_ATTR = "TumorLens.ImageHash"  # content the id was given for: an edited volume gets a new id
RESULT_OF_ATTR = "TumorLens.ResultOf"  # "<volume node id> <model> <kind>": a re-run replaces its own result
SOURCE_ATTR = "TumorLens.Source"
HEAT_COLOR_NODE = "TumorLensHeat"


# ==================================================================================================
# Module
# ==================================================================================================


class TumorLens(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "TumorLens"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["tumorlens project"]
        self.parent.helpText = (
            "Run the tumorlens models (classification, segmentation, saliency, report) on a MONAI Label "
            "server and see the results: per-class probabilities, masks whose segments are named by "
            "atlas region, a saliency heatmap overlay and a verified report. Research use only."
        )
        self.parent.acknowledgementText = (
            "Built on MONAI Label and 3D Slicer. Atlas: Harvard-Oxford (FSL, non-commercial licence)."
        )


def ensure_requirements(requirements: dict[str, str] | None = None) -> list[str]:
    """Install, on first use, the Python packages the module needs that Slicer lacks.

    ``requirements`` maps import name -> pip spec. Returns the pip specs that were installed.
    """
    import importlib.util

    reqs = tll.REQUIREMENTS if requirements is None else requirements
    missing = [spec for mod, spec in reqs.items() if importlib.util.find_spec(mod) is None]
    if missing:
        slicer.util.pip_install(" ".join(missing))
    return missing


# ==================================================================================================
# Logic
# ==================================================================================================


class TumorLensLogic(ScriptedLoadableModuleLogic):
    """Everything the module does, on an MRML scene, returning plain data.

    Network calls (``remote_*``) touch no MRML node, so the widget can run them in a worker thread;
    ``load_*``/``apply_*`` change the scene and belong on the main thread. ``run_model`` chains both
    for scripts and tests.
    """

    def __init__(self, scene=None, timeout: float = 300.0):
        ScriptedLoadableModuleLogic.__init__(self)
        self.scene = scene if scene is not None else slicer.mrmlScene
        self.timeout = timeout
        self.cancel = threading.Event()
        self.client: tll.MonaiLabelClient | None = None
        self.info: dict = {}
        self.models: dict[str, tll.ModelInfo] = {}
        self.findings: dict[str, dict] = {}  # image id -> last findings record (sent with the report)
        self.work_dir = tempfile.mkdtemp(prefix="tumorlens-slicer-")
        # copies of the user's images, labels and results: removed with the logic (or at exit), never left behind
        self._remove_work_dir = weakref.finalize(self, shutil.rmtree, self.work_dir, ignore_errors=True)

    def cleanup(self) -> None:
        """Remove this logic's temporary copies (uploads, downloaded samples, results, exported labels)."""
        self._remove_work_dir()

    # ---- server ---------------------------------------------------------------------------------

    def connect(self, url: str, username: str | None = None, password: str | None = None,
                token: str | None = None) -> dict:
        """Connect and list models (classification and report included) and strategies. A server with MONAI
        Label's auth on takes a token, or a user name and password (its ``/auth/token`` password grant);
        without them the environment's ``TUMORLENS_SERVER_TOKEN`` or ``TUMORLENS_SERVER_USER`` /
        ``TUMORLENS_SERVER_PASSWORD`` are used."""
        token = token or os.environ.get("TUMORLENS_SERVER_TOKEN") or None
        username = username or os.environ.get("TUMORLENS_SERVER_USER") or None
        password = password if password is not None else os.environ.get("TUMORLENS_SERVER_PASSWORD")
        client = tll.MonaiLabelClient(url, timeout=self.timeout, cancel=self.cancel, token=token)
        if username and not token:
            client.login(username, password or "")
        info = client.info()
        models = tll.parse_models(info)
        self.client, self.info = client, info
        self.models = {m.name: m for m in models}
        return {
            "url": client.url,
            "name": info.get("name", ""),
            "version": info.get("version", ""),
            "models": [{"name": m.name, "type": m.type, "display": m.display, "labels": m.labels,
                        "returns_label": m.returns_label, "description": m.description} for m in models],
            "strategies": tll.parse_strategies(info),
        }

    def _client(self) -> tll.MonaiLabelClient:
        if self.client is None:
            raise tll.ServerError(0, "not connected: connect to a server first")
        return self.client

    # ---- volumes ----------------------------------------------------------------------------------

    def load_volume(self, path: str, name: str | None = None, labelmap: bool = False):
        """Read NIfTI/NRRD/DICOM into a new volume node (Slicer's own reader, geometry kept). A DICOM
        series may be given as its folder: the archetype reader takes the series from its first file."""
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such file")
        if os.path.isdir(path):
            files = sorted(f for f in os.listdir(path) if not f.startswith(".") and f.upper() != "DICOMDIR"
                           and os.path.isfile(os.path.join(path, f)))
            if not files:
                raise ValueError(f"{path}: folder holds no file to read as a volume")
            name = name or os.path.basename(os.path.normpath(path))
            path = os.path.join(path, files[0])
            series = True
        else:
            # one picture or NRRD among numbered ones ("0003.jpg" next to "0004.jpg") is that file alone: the
            # archetype reader stacked the whole numbered run into one volume; a DICOM file stands for its series
            series = tll.is_dicom_file(path)
        cls = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
        node = self.scene.AddNewNodeByClass(cls, name or _stem(path))
        storage = self.scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.SetFileName(path)
        storage.SetSingleFile(0 if series else 1)
        ok = storage.ReadData(node)
        if not ok or node.GetImageData() is None:
            self.scene.RemoveNode(node)
            self.scene.RemoveNode(storage)
            raise ValueError(f"{path}: Slicer could not read this file as a volume")
        node.SetAndObserveStorageNodeID(storage.GetID())
        if not labelmap:
            display = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeDisplayNode")
            grey = self.scene.GetNodeByID("vtkMRMLColorTableNodeGrey")
            if grey is not None:
                display.SetAndObserveColorNodeID(grey.GetID())
            display.AutoWindowLevelOn()
            node.SetAndObserveDisplayNodeID(display.GetID())
        return node

    @staticmethod
    def ijk_to_ras(node) -> np.ndarray:
        m = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(m)
        return slicer.util.arrayFromVTKMatrix(m)

    def check_volume(self, volume_node) -> None:
        """A volume node that is still in this scene (a script may pass None or a removed node; the
        user may delete the volume while its job runs)."""
        if volume_node is None:
            raise ValueError("no volume: select or load a volume first")
        if volume_node.GetScene() is not self.scene or self.scene.GetNodeByID(volume_node.GetID()) is not volume_node:
            raise ValueError(f"volume {volume_node.GetName()!r} is no longer in the scene")
        if volume_node.GetImageData() is None:
            raise ValueError(f"volume {volume_node.GetName()!r} has no voxels")

    def content_hash(self, volume_node) -> str:
        """SHA-1 of the voxels and their geometry (recomputed on every call: voxels edited in place or
        a moved origin must not keep an id whose server copy no longer matches)."""
        arr = slicer.util.arrayFromVolume(volume_node)
        h = hashlib.sha1(np.ascontiguousarray(arr).tobytes())
        h.update(np.round(self.ijk_to_ras(volume_node), 4).tobytes())
        return h.hexdigest()

    def image_id(self, volume_node) -> str:
        """The server id of the volume as it is now: its content hash (no name, no identifier), or the
        server's own id for a sample downloaded from it and not changed since."""
        self.check_volume(volume_node)
        digest = self.content_hash(volume_node)
        existing = volume_node.GetAttribute(IMAGE_ID_ATTR)
        if existing and volume_node.GetAttribute(IMAGE_HASH_ATTR) == digest:
            return existing
        image_id = "img-" + digest[:16]
        volume_node.SetAttribute(IMAGE_ID_ATTR, image_id)
        volume_node.SetAttribute(IMAGE_HASH_ATTR, digest)
        return image_id

    def write_volume(self, node, path: str) -> str:
        """Write a volume (or labelmap) node to a file; the scene's own writer keeps the geometry."""
        storage = self.scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        try:
            storage.SetFileName(path)
            storage.SetUseCompression(True)
            if not storage.WriteData(node):
                raise OSError(f"{path}: could not write volume {node.GetName()!r}")
        finally:
            self.scene.RemoveNode(storage)
        return path

    def picture_source(self, volume_node) -> str | None:
        """The picture file (JPEG, PNG, ...) a volume node was read from, when the node still holds exactly what
        ITK reads from it (same pixels, ITK's own geometry), else None. Sent as the one-slice volume Slicer made
        of it, a picture was measured in Slicer's 1 mm pixels (mm² where the picture gives no spacing) and read as
        stored, its EXIF orientation ignored, where the command line reads it upright (an outside probe)."""
        storage = volume_node.GetStorageNode()
        path = storage.GetFileName() if storage is not None else None
        if not tll.is_picture_file(path):
            return None
        try:
            import SimpleITK as sitk

            ref = sitk.ReadImage(path)
        except Exception:  # noqa: BLE001 - a file ITK cannot read is not the one Slicer shows
            return None
        arr = slicer.util.arrayFromVolume(volume_node)
        want = sitk.GetArrayFromImage(ref)
        if arr.size != want.size or not np.array_equal(arr.reshape(want.shape), want):
            return None
        lps = np.eye(4)
        dim = ref.GetDimension()
        lps[:dim, :dim] = np.asarray(ref.GetDirection()).reshape(dim, dim) * np.asarray(ref.GetSpacing())[None, :]
        lps[:dim, 3] = ref.GetOrigin()
        ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
        return path if np.allclose(self.ijk_to_ras(volume_node), ras, atol=1e-4) else None

    def prepare_upload(self, volume_node) -> tuple[str, str]:
        """(image id, temporary file of the volume) — main thread, before any network call. A picture the node
        still holds unchanged goes up as the picture itself (its spacing unknown, read upright), under the same
        content-hash id; any other volume as the NIfTI the scene writes."""
        image_id = self.image_id(volume_node)
        picture = self.picture_source(volume_node)
        if picture:
            path = os.path.join(self.work_dir, image_id + os.path.splitext(picture)[1].lower())
            if not os.path.exists(path):
                shutil.copyfile(picture, path)
            return image_id, path
        path = os.path.join(self.work_dir, f"{image_id}.nii.gz")
        if not os.path.exists(path):
            self.write_volume(volume_node, path)
            storage = volume_node.GetStorageNode()
            modality = tll.dicom_modality(storage.GetFileName() if storage is not None else None)
            if modality:  # the series' own modality travels with the NIfTI made of it
                tll.stamp_nifti_modality(path, modality)
        return image_id, path

    # ---- network (no MRML here: safe in a worker thread) ------------------------------------------

    def remote_ensure_image(self, image_id: str, path: str | None) -> bool:
        """Upload the image unless the server has it; True when it was uploaded."""
        client = self._client()
        if client.has_image(image_id):
            return False
        if not path:
            raise tll.ServerError(404, f"the server has no image {image_id!r} and there is no file to upload")
        client.upload_image(path, image_id)
        return True

    def remote_infer(self, model: str, image_id: str, path: str | None, params: dict | None = None) -> tll.InferAnswer:
        if not model or (self.models and model not in self.models):
            raise tll.ServerError(404, f"no model {model!r} on the server (models: {', '.join(sorted(self.models))})")
        self.remote_ensure_image(image_id, path)
        out_dir = tempfile.mkdtemp(prefix=f"{model}-", dir=self.work_dir)
        return self._client().infer(model, image_id, params or {}, out_dir=out_dir)

    def remote_next_sample(self, strategy: str) -> dict:
        """Ask for the next image to label and download it; ``{}`` when none is left."""
        client = self._client()
        res = client.next_sample(strategy)
        image_id = res.get("id") if isinstance(res, dict) else None
        if not image_id:
            return {}
        out_dir = tempfile.mkdtemp(prefix="sample-", dir=self.work_dir)
        return {"image_id": image_id, "path": client.download_image(image_id, out_dir), "strategy": strategy}

    def remote_submit_label(self, image_id: str, label_path: str, label_names: dict[str, int],
                            class_name: str | None = None, tag: str = "final") -> dict:
        """Save a label; ``class_name`` (the image's tumour class) goes into the label info, where the
        server's trainer reads it: a label without it is kept but not trained on."""
        self.remote_ensure_image(image_id, None)
        params: dict[str, Any] = {"label_names": label_names}
        if class_name:
            params["class_name"] = class_name
        return self._client().save_label(image_id, label_path, tag=tag, params=params)

    # ---- results into the scene -------------------------------------------------------------------

    def apply_answer(self, answer: tll.InferAnswer, volume_node, model: str, image_id: str | None = None) -> dict:
        """Turn an infer answer into nodes and plain data for the widget. A result replaces the
        earlier result of the same model and kind on the same volume and sits under the volume's
        transform, so it overlays the volume wherever the user has moved it."""
        self.check_volume(volume_node)
        params = answer.params
        findings = tll.findings_of(params)
        heat = bool(answer.label_path) and params.get("heatmap") is True  # saliency asked with {"heatmap": true}
        if heat:  # asked without the atlas step: its findings must not replace the full record
            findings = None
        image_id = image_id or self.image_id(volume_node)  # hashing a volume costs: callers pass what they have
        out: dict[str, Any] = {"model": model, "image_id": image_id, "findings": findings,
                               "heatmap_path" if heat else "label_path": answer.label_path}
        if findings:
            self.findings[out["image_id"]] = findings
        try:
            out["probabilities"] = tll.probabilities_of(params)
        except tll.ResponseError:
            out["probabilities"] = None
        try:
            out["familiarity"] = tll.familiarity_of(params)
        except tll.ResponseError:
            out["familiarity"] = None
        try:
            out["caveats"] = tll.caveats_of(params)
        except tll.ResponseError:
            out["caveats"] = []
        try:
            out["window_opinion"] = tll.window_opinion_line(params)
        except tll.ResponseError:
            out["window_opinion"] = None
        kind = "heatmap" if heat else "segmentation"
        name = f"TumorLens {model}{' heatmap' if heat else ''} - {volume_node.GetName()}"
        if heat:
            node = self.load_heatmap(answer.label_path, name=name)
            out["heatmap_node_id"] = node.GetID()
        elif answer.label_path:
            node, segments = self.load_label_as_segmentation(
                answer.label_path, volume_node, tll.label_names_of(params), findings, name=name)
            out["segmentation_node_id"] = node.GetID()
            out["segments"] = segments
        else:
            return out
        self._replace_result(node, volume_node, f"{volume_node.GetID()} {model} {kind}")
        return out

    def _replace_result(self, node, volume_node, key: str) -> None:
        """Tag ``node`` as the result ``key``, remove the earlier node of that key, follow the
        volume's transform."""
        for old in list(self.scene.GetNodesByClass(node.GetClassName())):
            if old is not node and old.GetAttribute(RESULT_OF_ATTR) == key:
                helpers = [old.GetNthDisplayNode(i) for i in range(old.GetNumberOfDisplayNodes())]
                helpers.append(old.GetStorageNode())
                self.scene.RemoveNode(old)
                for h in helpers:
                    if h is not None and h.GetScene() is self.scene:
                        self.scene.RemoveNode(h)
        node.SetAttribute(RESULT_OF_ATTR, key)
        node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())

    def remote_run(self, model: str, image_id: str, path: str | None, params: dict | None = None,
                   heatmap: bool = False) -> list[tll.InferAnswer]:
        """The label answer, plus the heatmap answer for saliency models when asked (network only). A picture's
        answers come as NIfTI: a PNG (the server's default for pictures) carries no geometry, and the server's
        mask of a picture stored turned (EXIF) lies on the upright grid, which only the NIfTI's affine places."""
        if path and path.lower().endswith(tll.PICTURE_EXTENSIONS):
            params = {"result_extension": ".nii.gz", **(params or {})}
        answers = [self.remote_infer(model, image_id, path, params)]
        if heatmap and model.startswith("saliency"):
            # the heatmap needs no atlas step (registration is the slow part of an explanation)
            answers.append(self.remote_infer(model, image_id, path,
                                             {**(params or {}), "heatmap": True, "with_regions": False}))
        return answers

    def apply_answers(self, answers: list[tll.InferAnswer], volume_node, model: str, image_id: str | None = None) -> dict:
        self.check_volume(volume_node)
        image_id = image_id or self.image_id(volume_node)  # one hash for all answers of a run
        out: dict[str, Any] = {}
        for a in answers:  # the label answer first, then the heatmap: each adds its own keys
            res = self.apply_answer(a, volume_node, model, image_id)
            out.update({k: v for k, v in res.items() if v is not None or k not in out})
        return out

    def run_model(self, volume_node, model: str, params: dict | None = None, heatmap: bool = False) -> dict:
        """Upload if needed, infer, load the result(s): the whole chain on the calling thread."""
        image_id, path = self.prepare_upload(volume_node)
        return self.apply_answers(self.remote_run(model, image_id, path, params, heatmap), volume_node, model, image_id)

    def load_label_as_segmentation(self, label_path: str, reference_volume, label_names: dict[str, int] | None = None,
                                   findings: dict | None = None, name: str = "TumorLens"):
        """Label file -> segmentation node: one segment per label value, named by atlas region.

        The label file's own geometry is used (Slicer reads its affine), and the segmentation takes
        the reference volume's geometry, so a mask on an oblique volume lands in place.
        Returns (node, [plain dicts per segment]).
        """
        labelmap = self.load_volume(label_path, name="__tumorlens_label__", labelmap=True)
        try:
            arr = slicer.util.arrayFromVolume(labelmap)
            if not np.all(np.isfinite(arr)) or np.any(arr < 0) or np.any(arr != np.round(arr)):
                raise ValueError(f"{label_path}: label file holds non-integer or negative values")
            present = {int(v) for v in np.unique(arr) if v > 0}
            names = dict(label_names or {})
            known = set(names.values())
            for v in sorted(present - known):  # a value the answer did not name: keep it, say so
                names[f"label_{v}"] = v
            specs = [s for s in tll.segment_specs(names, findings, tll.region_color) if s.value in present]
            counts = {v: int(np.count_nonzero(arr == v)) for v in present}
            seg = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
            seg.CreateDefaultDisplayNodes()
            seg.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
            if present:
                labelmap_int = labelmap
                if arr.dtype.kind == "f":  # the server may write float32 masks: cast once, exactly
                    slicer.util.updateVolumeFromArray(labelmap, arr.astype(np.uint16))
                if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap_int, seg):
                    raise RuntimeError(f"{label_path}: Slicer could not import the label file")
            segmentation = seg.GetSegmentation()
            by_value = {}
            for i in range(segmentation.GetNumberOfSegments()):
                s = segmentation.GetNthSegment(i)
                by_value[int(s.GetLabelValue())] = (segmentation.GetNthSegmentID(i), s)
            segments = []
            for spec in specs:
                seg_id, s = by_value[spec.value]
                s.SetName(spec.name)
                s.SetNameAutoGenerated(False)
                s.SetColor(*spec.color)
                s.SetColorAutoGenerated(False)
                s.SetTag("TumorLens.AtlasLabel", spec.label)
                s.SetTag("TumorLens.LabelValue", str(spec.value))
                if spec.fraction is not None:
                    s.SetTag("TumorLens.Fraction", f"{spec.fraction:.4f}")
                if spec.extra.get("regions"):
                    s.SetTag("TumorLens.Regions", tll.results.to_ascii(spec.extra["regions"]))
                segments.append({"id": seg_id, "name": spec.name, "label": spec.label, "value": spec.value,
                                 "voxels": counts[spec.value], "color": list(spec.color), "fraction": spec.fraction,
                                 "regions": spec.extra.get("regions")})
            seg.SetAttribute(SOURCE_ATTR, os.path.basename(label_path))
            return seg, segments
        finally:
            storage = labelmap.GetStorageNode()
            self.scene.RemoveNode(labelmap)
            if storage is not None:
                self.scene.RemoveNode(storage)

    def heat_color_node(self):
        node = self.scene.GetFirstNodeByName(HEAT_COLOR_NODE)
        if node is not None:
            return node
        table = tll.heat_table(256)
        node = self.scene.AddNewNodeByClass("vtkMRMLColorTableNode", HEAT_COLOR_NODE)
        node.SetTypeToUser()
        node.SetNumberOfColors(len(table))
        node.SetNamesInitialised(True)
        for i, (r, g, b, a) in enumerate(table):
            node.SetColor(i, f"heat{i}", r, g, b, a)
        return node

    def load_heatmap(self, path: str, name: str = "TumorLens heatmap"):
        """A [0, 1] saliency map as a scalar volume with the heat colour map, window 0-1."""
        node = self.load_volume(path, name=name)
        display = node.GetDisplayNode()
        display.SetAndObserveColorNodeID(self.heat_color_node().GetID())
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(0.0, 1.0)
        display.SetLowerThreshold(0.05)
        display.SetUpperThreshold(1.0)
        display.ApplyThresholdOn()
        return node

    def set_heatmap_opacity(self, opacity: float, heatmap_node=None, background_node=None) -> int:
        """Show the heatmap as foreground over the volume in every slice view; returns views changed."""
        opacity = float(min(1.0, max(0.0, opacity)))
        n = self.scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")
        for i in range(n):
            comp = self.scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
            if heatmap_node is not None:
                comp.SetForegroundVolumeID(heatmap_node.GetID())
            if background_node is not None:
                comp.SetBackgroundVolumeID(background_node.GetID())
            comp.SetForegroundOpacity(opacity)
        return n

    def save_segmentation(self, seg_node, path: str) -> str:
        """Write a .seg.nrrd (segment names, colours and tags travel with it)."""
        storage = self.scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
        try:
            storage.SetFileName(path)
            storage.SetUseCompression(True)
            if not storage.WriteData(seg_node):
                raise OSError(f"{path}: could not write the segmentation")
        finally:
            self.scene.RemoveNode(storage)
        return path

    def _exported(self, seg_node, ids, reference_volume):
        """The segments ``ids`` as one label map on the reference grid (a temporary node the caller removes)."""
        labelmap = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__tumorlens_export__")
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(seg_node, ids, labelmap,
                                                                                    reference_volume):
            self.scene.RemoveNode(labelmap)
            raise RuntimeError("Slicer could not export the segmentation to a label map")
        return labelmap

    def _overlapped(self, seg_node, reference_volume, flat: np.ndarray, names: dict[str, int]) -> list[str]:
        """Segments whose voxels the flat label map lost to a later segment drawn over them."""
        segmentation = seg_node.GetSegmentation()
        lost = []
        for name, value in names.items():
            one = vtk.vtkStringArray()
            one.InsertNextValue(segmentation.GetNthSegmentID(value - 1))
            node = self._exported(seg_node, one, reference_volume)
            try:
                own = int(np.count_nonzero(slicer.util.arrayFromVolume(node))) if node.GetImageData() else 0
            finally:
                self.scene.RemoveNode(node)
            if own > int(np.count_nonzero(flat == value)):
                lost.append(name)
        return lost

    def export_label(self, seg_node, reference_volume, path: str, allow_empty: bool = False) -> tuple[str, dict[str, int]]:
        """Segmentation -> one label file on the reference grid; returns (path, {segment name: value}).
        ``allow_empty``: an empty segmentation (or none) is a label of zeros (a tumour-free image's)."""
        segmentation = seg_node.GetSegmentation() if seg_node is not None else None
        ids = vtk.vtkStringArray()
        names: dict[str, int] = {}
        for i in range(segmentation.GetNumberOfSegments() if segmentation is not None else 0):
            ids.InsertNextValue(segmentation.GetNthSegmentID(i))
            name = segmentation.GetNthSegment(i).GetName()
            if name in names:  # one name for two values: the server would know only one of them
                raise ValueError(f"two segments are named {name!r}: rename one before submitting")
            names[name] = i + 1  # export numbers segments in order
        if ids.GetNumberOfValues() == 0 and not allow_empty:
            raise ValueError("the segmentation has no segments: nothing to submit")
        values = None
        if ids.GetNumberOfValues():
            labelmap = self._exported(seg_node, ids, reference_volume)
            try:
                values = slicer.util.arrayFromVolume(labelmap) if labelmap.GetImageData() is not None else None
                if values is not None and values.any():
                    # a segment drawn over another (a "whole tumour" over its sub-regions) takes its voxels in a
                    # label map of one value per voxel: the sub-regions were lost with no word (session 39 probe)
                    lost = self._overlapped(seg_node, reference_volume, values, names)
                    if lost:
                        raise ValueError(f"segments overlap: a label file holds one value per voxel, so "
                                         f"{', '.join(repr(n) for n in lost)} would lose the voxels drawn over by a later "
                                         "segment; remove the overlap (or the covering segment) before submitting")
                    self.write_volume(labelmap, path)
                    return path, names
            finally:
                self.scene.RemoveNode(labelmap)
        if not allow_empty:
            raise ValueError("the segments hold no voxel inside the volume: nothing to submit (were they drawn "
                             "on another volume?)")
        # a tumour-free image: a label of zeros on the volume's own grid
        empty = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__tumorlens_empty__")
        try:
            empty.CopyOrientation(reference_volume)
            slicer.util.updateVolumeFromArray(empty, np.zeros(slicer.util.arrayFromVolume(reference_volume).shape,
                                                              np.uint8))
            self.write_volume(empty, path)
        finally:
            self.scene.RemoveNode(empty)
        return path, {}

    # ---- report, active learning ---------------------------------------------------------------------

    def report_dir(self) -> str:
        """Next to the scene file when it has one, else the scene's root directory, else ~/TumorLens reports."""
        url = self.scene.GetURL()
        if url:
            return os.path.dirname(os.path.abspath(url))
        # an unsaved scene has no folder of its own: a fixed folder in the user's home, not wherever the
        # application happened to start
        return self.scene.GetRootDirectory() or os.path.join(os.path.expanduser("~"), "TumorLens reports")

    def save_report(self, params: dict, image_id: str, out_dir: str | None = None) -> dict:
        """Format the report answer, write JSON + Markdown, return what the panel shows."""
        view = tll.report_view(params)
        out_dir = out_dir or self.report_dir()
        os.makedirs(out_dir, exist_ok=True)
        base = os.path.join(out_dir, f"tumorlens-report-{image_id}")
        _atomic_text(base + ".json", json.dumps({"report": view.report, "verification": view.verification,
                                                  "status": view.status}, indent=2))
        _atomic_text(base + ".md", view.markdown)
        return {"status": view.status, "verified": view.verified, "markdown": view.markdown,
                "json_path": base + ".json", "markdown_path": base + ".md"}

    def report_params(self, image_id: str, params: dict | None = None) -> dict:
        """Send the findings already shown for this image, so the report describes what the user
        sees (and the server need not explain the image again)."""
        out = dict(params or {})
        if "findings" not in out and image_id in self.findings:
            out["findings"] = self.findings[image_id]
        return out

    def generate_report(self, volume_node, model: str = "report", params: dict | None = None,
                        out_dir: str | None = None) -> dict:
        image_id, path = self.prepare_upload(volume_node)
        answer = self.remote_infer(model, image_id, path, self.report_params(image_id, params))
        return self.save_report(answer.params, image_id, out_dir)

    def apply_sample(self, sample: dict):
        """Load a downloaded sample as a volume that remembers its server id."""
        node = self.load_volume(sample["path"], name=f"sample {sample['image_id']}")
        node.SetAttribute(IMAGE_ID_ATTR, sample["image_id"])
        node.SetAttribute(IMAGE_HASH_ATTR, self.content_hash(node))
        return node

    def next_sample(self, strategy: str = "random"):
        sample = self.remote_next_sample(strategy)
        return self.apply_sample(sample) if sample else None

    def submit_label(self, seg_node, volume_node, class_name: str | None = None, tag: str = "final") -> dict:
        image_id, path = self.prepare_upload(volume_node)
        self.remote_ensure_image(image_id, path)
        label_path, names = self.export_label(seg_node, volume_node,
                                              os.path.join(self.work_dir, f"{image_id}-label.nii.gz"),
                                              allow_empty=class_name == "no_tumor")
        return self.remote_submit_label(image_id, label_path, names, class_name=class_name, tag=tag)


def _stem(path: str) -> str:
    base = os.path.basename(path.rstrip("/"))
    for ext in (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".dcm"):
        if base.lower().endswith(ext):
            return base[: -len(ext)]
    return base


def _atomic_text(path: str, text: str) -> None:
    tmp = path + ".part"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


# ==================================================================================================
# Widget (Qt; runs inside the Slicer application only)
# ==================================================================================================


class TumorLensWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Thin panel over the Logic: network work in a thread, scene changes back on the main thread."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: TumorLensLogic | None = None
        self._job: dict | None = None
        self._last: dict = {}

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        ui_widget = slicer.util.loadUI(self.resourcePath("UI/TumorLens.ui"))
        self.layout.addWidget(ui_widget)
        self.ui = slicer.util.childWidgetVariables(ui_widget)
        ui_widget.setMRMLScene(slicer.mrmlScene)
        self.logic = TumorLensLogic()
        settings = qt.QSettings()
        self.ui.serverUrl.text = settings.value("TumorLens/serverUrl", "http://127.0.0.1:8000")
        self.ui.connectButton.connect("clicked(bool)", self.onConnect)
        self.ui.runButton.connect("clicked(bool)", self.onRun)
        self.ui.reportButton.connect("clicked(bool)", self.onReport)
        self.ui.nextSampleButton.connect("clicked(bool)", self.onNextSample)
        self.ui.submitLabelButton.connect("clicked(bool)", self.onSubmitLabel)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.opacitySlider.connect("valueChanged(double)", self.onOpacity)
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.connect("timeout()", self._poll)
        self._set_busy(False)

    def cleanup(self):
        self.onCancel()
        self.removeObservers()
        if self.logic is not None:
            self.logic.cleanup()

    # -- background jobs --
    def _start(self, what: str, work, done):
        if self._job is not None:
            slicer.util.warningDisplay("TumorLens is still busy; cancel the running call first.")
            return
        self.logic.cancel.clear()
        job: dict = {"what": what, "done": done, "result": None, "error": None}

        def target():
            try:
                job["result"] = work()
            except Exception as e:  # shown to the user in _poll, never as a traceback
                job["error"] = e

        job["thread"] = threading.Thread(target=target, daemon=True)
        self._job = job
        self._set_busy(True, f"{what}…")
        job["thread"].start()
        self._timer.start()

    def _main_thread(self, what: str, step):
        """Run a step that must touch the scene (writing the volume or label to upload); a failure is a message
        box, as a worker's is, never a traceback. Returns the step's result, or None when it failed."""
        try:
            return step()
        except Exception as e:  # e.g. a volume Slicer cannot write, an empty segmentation
            self.ui.statusLabel.text = f"{what}: failed"
            slicer.util.errorDisplay(f"{what} failed:\n{e}")
            return None

    def _poll(self):
        job = self._job
        if job is None:
            return
        alive = job["thread"].is_alive()
        if alive and not self.logic.cancel.is_set():
            return
        # cancelled while the server is still computing: stop waiting now; the worker stops at its next
        # chunk (or its timeout) and its result is dropped, the scene is never touched by it
        self._timer.stop()
        self._job = None
        self._set_busy(False)
        err = tll.Cancelled("cancelled by the user") if alive else job["error"]
        if isinstance(err, tll.Cancelled):
            self.ui.statusLabel.text = f"{job['what']}: cancelled"
            return
        if err is not None:
            self.ui.statusLabel.text = f"{job['what']}: failed"
            slicer.util.errorDisplay(f"{job['what']} failed:\n{err}")
            return
        try:
            job["done"](job["result"])
        except Exception as e:
            slicer.util.errorDisplay(f"{job['what']}: could not show the result:\n{e}")

    def _set_busy(self, busy: bool, text: str = "ready"):
        self.ui.cancelButton.enabled = busy
        for b in (self.ui.connectButton, self.ui.runButton, self.ui.reportButton, self.ui.nextSampleButton,
                  self.ui.submitLabelButton):
            b.enabled = not busy
        self.ui.statusLabel.text = text

    def onCancel(self):
        if self.logic is not None:
            self.logic.cancel.set()

    # -- actions --
    def onConnect(self):
        url = self.ui.serverUrl.text
        qt.QSettings().setValue("TumorLens/serverUrl", url)

        def done(res):
            self.ui.modelCombo.clear()
            for m in res["models"]:
                self.ui.modelCombo.addItem(m["display"], m["name"])
            self.ui.strategyCombo.clear()
            for s in res["strategies"]:
                self.ui.strategyCombo.addItem(s)
            self.ui.statusLabel.text = f"connected: {res['name']} ({len(res['models'])} models)"

        self._start("Connect", lambda: self.logic.connect(url), done)

    def _volume(self):
        node = self.ui.volumeSelector.currentNode()
        if node is None:
            slicer.util.errorDisplay("Select a volume first.")
        return node

    def onRun(self):
        volume = self._volume()
        model = self.ui.modelCombo.currentData
        if volume is None or not model:
            return
        prepared = self._main_thread("Run", lambda: self.logic.prepare_upload(volume))
        if prepared is None:
            return
        image_id, path = prepared

        def done(answers):
            res = self.logic.apply_answers(answers, volume, model, image_id)
            self._last = res
            lines = []
            if not res.get("findings"):  # with findings the same cautions are among its notes
                warning = tll.familiarity_warning(res.get("familiarity"))
                # the server's caveats include the familiarity note; an older server sent the score alone
                lines += [f"**Caution:** {c}" for c in res.get("caveats", [])] or ([f"**{warning}**"] if warning else [])
            if res.get("probabilities"):
                lines.append(tll.probabilities_table(res["probabilities"]))
            if res.get("window_opinion"):
                lines.append(f"- {res['window_opinion']}")
            src = str(((res.get("findings") or {}).get("lesion") or {}).get("mask_source") or "")
            of = "the salient area" if src.startswith("saliency") else "the lesion"  # whose regions they are
            for s in res.get("segments", []):
                # the share is the findings' (counted on the atlas after registration), the voxels this image's:
                # side by side without saying so, "18275 voxels, 21%" read as a miscount (session 39 probe)
                frac = (f"; {100 * s['fraction']:.0f}% of {of} as mapped onto the atlas"
                        if s.get("fraction") is not None else "")
                lines.append(f"- {s['name']}: {s['voxels']} voxels on this image{frac}")
                if s.get("regions"):
                    lines.append(f"  - regions: {s['regions']}")
            if res.get("findings"):
                for line in tll.matched_descriptions(res["findings"]):
                    lines.append(f"- {line}")
                for note in res["findings"].get("notes", []):
                    lines.append(f"- note: {note}")
            self.ui.resultsText.setMarkdown("\n".join(lines) or "(no result)")
            if res.get("probabilities"):  # pre-set the class saved with a label to the prediction
                probs = res["probabilities"]
                idx = self.ui.classSelector.findText(max(probs, key=probs.get))
                if idx >= 0:
                    self.ui.classSelector.currentIndex = idx
            if res.get("heatmap_node_id"):
                heat = slicer.mrmlScene.GetNodeByID(res["heatmap_node_id"])
                self.logic.set_heatmap_opacity(self.ui.opacitySlider.value, heat, volume)
            self.ui.statusLabel.text = f"{model}: done"

        with_heat = bool(self.ui.heatmapCheck.checked)
        self._start(f"Run {model}", lambda: self.logic.remote_run(model, image_id, path, heatmap=with_heat), done)

    def onOpacity(self, value):
        self.logic.set_heatmap_opacity(value)

    def onReport(self):
        volume = self._volume()
        if volume is None:
            return
        prepared = self._main_thread("Generate report", lambda: self.logic.prepare_upload(volume))
        if prepared is None:
            return
        image_id, path = prepared

        def done(answer):
            res = self.logic.save_report(answer.params, image_id)
            self.ui.reportStatus.text = res["status"]
            self.ui.reportStatus.styleSheet = "color: green" if res["verified"] else "color: #b00"
            self.ui.reportText.setMarkdown(res["markdown"])
            self.ui.statusLabel.text = f"report saved: {res['markdown_path']}"

        params = self.logic.report_params(image_id)
        self._start("Generate report", lambda: self.logic.remote_infer("report", image_id, path, params), done)

    def onNextSample(self):
        strategy = self.ui.strategyCombo.currentText or "random"

        def done(sample):
            if not sample:
                slicer.util.infoDisplay("The server has no unlabelled image left.")
                return
            node = self.logic.apply_sample(sample)
            self.ui.volumeSelector.setCurrentNode(node)
            slicer.util.setSliceViewerLayers(background=node, fit=True)

        self._start("Next sample", lambda: self.logic.remote_next_sample(strategy), done)

    def onSubmitLabel(self):
        volume = self._volume()
        seg = self.ui.segmentationSelector.currentNode()
        class_name = self.ui.classSelector.currentText
        tumour_free = class_name == "no_tumor"  # an empty mask is its label (refused before: session 39 probe)
        if volume is None or (seg is None and not tumour_free):
            slicer.util.errorDisplay("Select the volume and the segmentation to submit (a no_tumor image needs none).")
            return
        def prepare():
            image_id, path = self.logic.prepare_upload(volume)
            return (image_id, path, *self.logic.export_label(
                seg, volume, os.path.join(self.logic.work_dir, f"{image_id}-label.nii.gz"), allow_empty=tumour_free))

        prepared = self._main_thread("Submit label", prepare)
        if prepared is None:
            return
        image_id, path, label_path, names = prepared

        def work():
            self.logic.remote_ensure_image(image_id, path)
            return self.logic.remote_submit_label(image_id, label_path, names, class_name=class_name)

        self._start("Submit label", work, lambda res: setattr(self.ui.statusLabel, "text", f"label saved: {res}"))


# ==================================================================================================
# Test (inside the Slicer application: Developer mode -> Reload and Test)
# ==================================================================================================


class TumorLensTest(ScriptedLoadableModuleTest):
    """The pytest scenario inside Slicer: needs a running server and a volume.

    ``TUMORLENS_SERVER_URL`` (default http://127.0.0.1:8000) and ``TUMORLENS_TEST_VOLUME`` (a NIfTI
    brain volume, e.g. ../shared/data/brats-3d/pat0001/T1c_subtrMeanDivStd.nii.gz).
    """

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_saliency_to_named_segments()

    def test_saliency_to_named_segments(self):
        url = os.environ.get("TUMORLENS_SERVER_URL", "http://127.0.0.1:8000")
        volume_path = os.environ.get("TUMORLENS_TEST_VOLUME")
        if not volume_path:
            raise RuntimeError("set TUMORLENS_TEST_VOLUME to a NIfTI brain volume")
        self.delayDisplay("Connecting")
        logic = TumorLensLogic()
        info = logic.connect(url)
        names = {m["name"] for m in info["models"]}
        assert "classification" in names and "saliency_gradcampp" in names, names
        volume = logic.load_volume(volume_path)
        res = logic.run_model(volume, "saliency_gradcampp")
        seg = slicer.mrmlScene.GetNodeByID(res["segmentation_node_id"])
        out = os.path.join(slicer.app.temporaryPath, "tumorlens-test.seg.nrrd")
        logic.save_segmentation(seg, out)
        back = slicer.util.loadSegmentation(out)
        got = sorted(back.GetSegmentation().GetNthSegment(i).GetName()
                     for i in range(back.GetSegmentation().GetNumberOfSegments()))
        assert got == sorted(s["name"] for s in res["segments"]), got
        for s in res["segments"]:
            arr = slicer.util.arrayFromSegmentBinaryLabelmap(seg, s["id"], volume)
            assert int(arr.sum()) == s["voxels"], (s, int(arr.sum()))
        probs = logic.run_model(volume, "classification")["probabilities"]
        assert abs(sum(probs.values()) - 1.0) < 1e-3, probs
        self.delayDisplay("TumorLens test passed")
