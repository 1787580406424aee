"""MONAI Label's DICOMweb datastore with what the local folder datastore already does (a PACS such as Orthanc
behind OHIF or 3D Slicer).

Why: MONAI Label's ``DICOMWebDatastore`` copies the series' PatientID (and study date and time) into the
image info, which every datastore listing and next-sample answer then sends to clients; it converts a series
to NIfTI without looking at it, so a CT or a DICOM SEG was analysed as an MR and a series with a missing slice
was stacked at an even spacing; it saves a final label as a DICOM SEG through dcmqi, which cannot be fetched
offline (a bare 500), and stores labels under other tags without any check; and an unknown or malformed
SeriesInstanceUID was a 500. Here:

- image info keeps the series' Modality and UIDs, never the patient's ID or the study's date and time
  (older cache entries are cleaned when read);
- a series is read by tumorlens' own DICOM reader first (the checks of a local DICOM folder: a SEG or
  RT object, several series, a missing slice or uneven spacing are refused with a 400), then converted,
  its modality written into the NIfTI so that a CT gets its caveat;
- labels go through the local datastore's checks and are kept in the server's cache folder (training
  and the strategies read them there), not uploaded to the PACS;
- a malformed UID is a 400, a series the PACS does not hold a 404, a PACS that cannot be reached a 503.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.utils.convert import dicom_to_nifti
from monailabel.datastore.utils.dicom import dicom_web_download_series
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.utils.others.generic import md5_digest

from lib.datastore import TumorlensDatastore
from lib.errors import bad_request, not_found, service_unavailable
from tumorlens.data.readers import read_image, stamp_modality
from tumorlens.errors import InvalidInputError, unreachable

logger = logging.getLogger(__name__)

UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")
# DICOM attributes MONAI Label copies into image info that identify the patient or the visit
PERSONAL_KEYS = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "PatientAge", "StudyDate",
                 "StudyTime", "AccessionNumber", "InstitutionName", "ReferringPhysicianName")


def check_uid(uid: str) -> str:
    """A SeriesInstanceUID as DICOM writes it (digits and dots, at most 64 characters), else a 400."""
    if not isinstance(uid, str) or len(uid) > 64 or not UID.fullmatch(uid):
        raise bad_request(f"{str(uid)[:80]!r} is not a DICOM SeriesInstanceUID (digits and dots, at most 64 characters)")
    return uid


def scrubbed(info: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (info or {}).items() if k not in PERSONAL_KEYS}


class PacsUnreachable(Exception):
    pass


class TumorlensDicomWeb(TumorlensDatastore, DICOMWebDatastore):
    """See the module docstring. Local-datastore behaviour comes from ``TumorlensDatastore``, listing the
    PACS' series from ``DICOMWebDatastore``."""

    hint_nested_images = False

    def __init__(self, client, search_filter: dict, cache_path: str | None = None, fetch_by_frame: bool = False):
        # dicomweb-client retries any failure five times with waits of 2 to 16 s: a PACS that is down held every
        # request that lists series (and MONAI Label's event loop with it) for 30 s; one quick retry is enough
        client.set_http_retry_params(retry=True, max_attempts=2, wait_exponential_multiplier=250)
        self._client = client
        self._last_listed: list[str] | None = None
        self._search_filter = search_filter
        self._fetch_by_frame = fetch_by_frame
        self._convert_to_nifti = True
        base = cache_path or os.path.join(Path.home(), ".cache", "monailabel", "dicom")
        super().__init__(os.path.join(base, md5_digest(client.base_url)), auto_reload=True)

    # ---- what clients see -------------------------------------------------------------------------
    def _dicom_info(self, series_id: str) -> dict[str, Any]:
        return scrubbed(super()._dicom_info(series_id))

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        if image_id not in self._datastore.objects:
            check_uid(image_id)
            if image_id not in self.list_images():
                raise not_found(f"unknown image id {image_id!r}: the DICOMweb server lists no such series")
            return {"SeriesInstanceUID": image_id}  # listed, not fetched yet
        return scrubbed(super().get_image_info(image_id))

    def json(self):
        data = super().json()
        for obj in (data.get("objects") or {}).values():
            image = obj.get("image") or {}
            image["info"] = scrubbed(image.get("info"))
            for label in (obj.get("labels") or {}).values():
                label["info"] = scrubbed(label.get("info"))
        return data

    # ---- listing the PACS' series ------------------------------------------------------------------
    def list_images(self) -> list[str]:
        """The PACS' series; while it cannot be reached, the last list it gave (with a warning), so the server
        keeps answering for the series it has fetched. A 503 when it was never reached."""
        try:
            series = DICOMWebDatastore.list_images(self)
        except Exception as e:
            if not unreachable(e):
                raise
            if self._last_listed is None:
                raise service_unavailable(f"the DICOMweb server {self._client.base_url} cannot be reached") from e
            logger.warning(f"DICOMweb server unreachable ({type(e).__name__}): using its last list of "
                           f"{len(self._last_listed)} series")
            return list(self._last_listed)
        self._last_listed = list(series)
        return series

    def _pacs_labelled(self) -> set[str]:
        """Series a DICOM SEG on the PACS labels (none while the PACS cannot be reached)."""
        try:
            return set(DICOMWebDatastore.get_labeled_images(self))
        except Exception as e:
            if not unreachable(e):
                raise
            return set()

    # ---- reading a series ---------------------------------------------------------------------------
    def get_image_uri(self, image_id: str) -> str:
        check_uid(image_id)
        nii = Path(self._datastore.image_path()) / f"{image_id}.nii.gz"
        if nii.is_file() and image_id in self._datastore.objects:
            return str(nii)
        series_dir = Path(self._datastore.image_path()) / image_id
        if not series_dir.is_dir() or not any(series_dir.iterdir()):
            self._download(image_id, series_dir)
        try:
            img = read_image(series_dir)  # tumorlens' DICOM checks; patient tags are never read into meta
        except InvalidInputError as e:
            raise bad_request(f"series {image_id}: {e.problem}") from e
        converted = dicom_to_nifti(str(series_dir))
        stamp_modality(converted, str(img.meta.get("modality") or "MR"), img.meta.get("body_part"))
        info = self._dicom_info(image_id)
        self._add_image(image_id, converted, info)  # copied into place atomically, with the datastore's checks
        if os.path.abspath(converted) != str(nii):
            Path(converted).unlink(missing_ok=True)
        return str(nii)

    def _download(self, series_id: str, dest: Path) -> None:
        try:
            dicom_web_download_series(None, series_id, str(dest), self._client, self._fetch_by_frame)
        except IndexError as e:  # MONAI Label's lookup of the series' study found nothing
            shutil.rmtree(dest, ignore_errors=True)
            raise not_found(f"the DICOMweb server holds no series {series_id}") from e
        except Exception as e:
            shutil.rmtree(dest, ignore_errors=True)
            if unreachable(e):
                raise service_unavailable(f"the DICOMweb server {self._client.base_url} cannot be reached: "
                                          f"{type(e).__name__}") from e
            raise

    # ---- labels ------------------------------------------------------------------------------------
    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any],
                   label_id: str = "") -> str:
        """Checked and kept in the cache folder like a local label (no DICOM SEG upload: dcmqi is not here)."""
        self.get_image_uri(image_id)  # fetched and registered first
        return super().save_label(image_id, label_filename, label_tag, scrubbed(label_info))

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        local = self._datastore.objects.get(label_id)
        if local is not None and label_tag in local.labels:
            return super(DICOMWebDatastore, self).get_label_uri(label_id, label_tag)
        return super().get_label_uri(label_id, label_tag, image_id)

    def get_labeled_images(self, label_tag: str | None = None, labels=None) -> list[str]:
        tag = label_tag or DefaultLabelTag.FINAL.value
        listed = set(self.list_images())
        local = {i for i, o in self._datastore.objects.items() if tag in o.labels}
        return sorted(((self._pacs_labelled() if tag == DefaultLabelTag.FINAL.value else set()) | local) & listed)

    def get_unlabeled_images(self, label_tag: str | None = None, labels=None) -> list[str]:
        return sorted(set(self.list_images()) - set(self.get_labeled_images(label_tag)))

