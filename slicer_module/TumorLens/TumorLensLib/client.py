"""A small client for MONAI Label's standard REST API, standard library only.

Why not ``monailabel.client``: it is not installed inside Slicer, it parses multipart answers with
the ``cgi`` module (gone in Python 3.13), and it cannot be cancelled. This one streams uploads and
downloads in chunks, checks a cancel event between chunks, has a timeout on every call, and turns
every failure into one readable :class:`ServerError` (status + the server's own message).
"""

from __future__ import annotations

import http.client
import json
import os
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import multipart

CHUNK = 256 * 1024


class ServerError(Exception):
    """A call failed: ``status`` is the HTTP status (0 when the server could not be reached)."""

    def __init__(self, status: int, message: str, url: str = ""):
        self.status = status
        self.message = message
        self.url = url
        where = f" ({url})" if url else ""
        head = f"HTTP {status}" if status else "connection failed"
        super().__init__(f"{head}: {message}{where}")


class Cancelled(Exception):
    """The user cancelled the call; nothing half-written is kept."""


def _server_message(body: bytes) -> str:
    """FastAPI answers ``{"detail": ...}``; fall back to the text itself, shortened."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text[:500] or "(empty response)"
    if isinstance(data, dict) and "detail" in data:
        detail = data["detail"]
        if isinstance(detail, list):  # validation errors: [{"loc": [...], "msg": "..."}]
            return "; ".join(
                f"{'.'.join(str(x) for x in d.get('loc', []))}: {d.get('msg', '')}" if isinstance(d, dict) else str(d)
                for d in detail
            )
        return str(detail)
    return text[:500]


@dataclass
class Response:
    """A finished call: status, content type, and either parsed JSON or the multipart parts."""

    status: int
    content_type: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        try:
            return json.loads(self.body.decode("utf-8"))
        except ValueError as e:
            raise ServerError(self.status, f"expected JSON, got {self.body[:200]!r}") from e

    @property
    def is_multipart(self) -> bool:
        return self.content_type.lower().startswith("multipart/")

    def parts(self) -> list[multipart.Part]:
        return multipart.decode(self.body, self.content_type)


class MonaiLabelClient:
    """One server; every method raises :class:`ServerError` or :class:`Cancelled`, nothing else."""

    def __init__(self, url: str, timeout: float = 120.0, cancel: threading.Event | None = None,
                 progress: Callable[[int, int], None] | None = None, token: str | None = None):
        url = url.strip()
        if not url:
            raise ServerError(0, "no server URL given")
        if "://" not in url:
            url = "http://" + url
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ServerError(0, f"not an http(s) URL: {url!r}")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.cancel = cancel or threading.Event()
        self.progress = progress  # called with (bytes done, bytes total or 0)
        # "Authorization" for a server with MONAI Label's auth on: "Bearer <token>" (``login`` sets it); without it
        # such a server answered every request 401 and the module had no way to give one (session 39 probe)
        self.authorization = f"Bearer {token}" if token and " " not in token.strip() else (token or None)
        # a proxy from the environment must never see loopback traffic (or patient images)
        host = (parsed.hostname or "").lower()
        handlers = [urllib.request.ProxyHandler({})] if host in ("127.0.0.1", "localhost", "::1") else []
        self._opener = urllib.request.build_opener(*handlers)

    # ---- plumbing ------------------------------------------------------------------------------

    def check_cancel(self) -> None:
        if self.cancel.is_set():
            raise Cancelled("cancelled by the user")

    def request(self, method: str, path: str, *, query: dict[str, Any] | None = None,
                json_body: Any = None, fields: dict[str, str] | None = None, files: dict[str, str] | None = None,
                timeout: float | None = None) -> Response:
        """Send one request and read the whole answer in chunks (cancellable)."""
        self.check_cancel()
        url = self.url + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        headers = {"Accept": "application/json, multipart/form-data, */*"}
        if self.authorization:
            headers["Authorization"] = self.authorization
        data: Any = None
        if files is not None or fields is not None:
            for p in files.values() if files else ():
                if not os.path.isfile(p):
                    raise ServerError(0, f"{p}: file to upload does not exist")
            boundary = multipart.new_boundary()
            pieces, length = multipart.encode_fields(fields or {}, files or {}, boundary)
            data = multipart.iter_pieces(pieces, CHUNK, self.check_cancel)
            headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
            headers["Content-Length"] = str(length)
        elif json_body is not None:
            data = json.dumps(json_body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            resp = self._opener.open(req, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as e:
            body = e.read() if e.fp else b""
            raise ServerError(e.code, _server_message(body), url) from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, Cancelled):
                raise e.reason from None
            raise ServerError(0, f"cannot reach the server: {e.reason}", url) from None
        except Cancelled:
            raise
        except TimeoutError:
            raise ServerError(0, f"no answer within {timeout or self.timeout:.0f} s", url) from None
        except (ConnectionError, http.client.HTTPException, OSError) as e:
            raise ServerError(0, f"connection broken: {e}", url) from None
        with resp:
            total = int(resp.headers.get("Content-Length") or 0)
            chunks: list[bytes] = []
            done = 0
            try:
                while True:
                    self.check_cancel()
                    chunk = resp.read(CHUNK)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    done += len(chunk)
                    if self.progress:
                        self.progress(done, total)
            except TimeoutError:
                raise ServerError(0, f"answer stalled for {timeout or self.timeout:.0f} s", url) from None
            except (ConnectionError, http.client.HTTPException) as e:
                raise ServerError(0, f"connection broken while reading: {e}", url) from None
            ctype = resp.headers.get("Content-Type", "application/octet-stream")
            return Response(resp.status, ctype, b"".join(chunks), {k.lower(): v for k, v in resp.headers.items()})

    # ---- MONAI Label endpoints -----------------------------------------------------------------

    def auth_enabled(self) -> bool:
        """``GET /auth/``: whether the server asks for a token (MONAI Label's switch)."""
        try:
            return bool(self.request("GET", "/auth/", timeout=min(self.timeout, 30.0)).json().get("enabled"))
        except ServerError:
            return False

    def login(self, username: str, password: str) -> None:
        """Password grant through the server's ``/auth/token``; later requests carry the token."""
        answer = self.request("POST", "/auth/token", fields={"username": username, "password": password,
                                                              "grant_type": "password"}).json()
        if not answer.get("access_token"):
            raise ServerError(0, "the server gave no token (is its auth switched on?)")
        self.authorization = f"{str(answer.get('token_type') or 'bearer').capitalize()} {answer['access_token']}"

    def info(self) -> dict:
        """``GET /info/``: app name, models (with their types and labels), strategies, trainers."""
        return self.request("GET", "/info/", timeout=min(self.timeout, 30.0)).json()

    def datastore(self) -> dict:
        """``GET /datastore/?output=all``: every image id with its labels."""
        return self.request("GET", "/datastore/", query={"output": "all"}).json()

    def has_image(self, image_id: str) -> bool:
        objects = self.datastore().get("objects", {})
        return image_id in objects

    def upload_image(self, path: str, image_id: str, params: dict | None = None) -> str:
        """``PUT /datastore/image?image=ID`` (multipart ``file`` + ``params``); returns the stored id."""
        res = self.request("PUT", "/datastore/image", query={"image": image_id},
                           fields={"params": json.dumps(params or {})}, files={"file": path}).json()
        return str(res.get("image", image_id))

    def download_image(self, image_id: str, out_dir: str) -> str:
        """``GET /datastore/image?image=ID`` into ``out_dir``, keeping the server's file extension."""
        res = self.request("GET", "/datastore/image", query={"image": image_id})
        return _save_body(res, out_dir, default_name=f"{image_id}.nii.gz")

    def infer(self, model: str, image_id: str, params: dict | None = None, out_dir: str | None = None) -> InferAnswer:
        """``POST /infer/{model}?image=ID``: a label file plus JSON params, or JSON only."""
        res = self.request("POST", f"/infer/{urllib.parse.quote(model, safe='')}", query={"image": image_id},
                           fields={"params": json.dumps(params or {})})
        return parse_infer_response(res, out_dir or tempfile.mkdtemp(prefix="tumorlens-"))

    def save_label(self, image_id: str, label_path: str, tag: str = "final", params: dict | None = None) -> dict:
        """``PUT /datastore/label?image=ID&tag=TAG`` (multipart ``label`` + ``params``)."""
        return self.request("PUT", "/datastore/label", query={"image": image_id, "tag": tag},
                            fields={"params": json.dumps(params or {})}, files={"label": label_path}).json()

    def next_sample(self, strategy: str, params: dict | None = None) -> dict:
        """``POST /activelearning/{strategy}`` (JSON body); ``{}`` when nothing is left to label."""
        return self.request("POST", f"/activelearning/{urllib.parse.quote(strategy, safe='')}",
                            json_body=params or {}).json()

    def train_start(self, model: str | None = None, params: dict | None = None) -> Any:
        """``POST /train/{model}``: start a training task (the server runs one at a time)."""
        path = "/train/" + (urllib.parse.quote(model, safe="") if model else "")
        return self.request("POST", path, json_body=params or {}).json()

    def train_status(self) -> Any:
        return self.request("GET", "/train/").json()

    def train_stop(self) -> Any:
        return self.request("DELETE", "/train/").json()


@dataclass
class InferAnswer:
    """What ``/infer`` gave back: ``params`` (JSON) and, for label models, the saved label file."""

    params: dict
    label_path: str | None = None


def _safe_name(name: str) -> str:
    base = os.path.basename(name.replace("\\", "/"))
    return base if base and base not in (".", "..") else "result.bin"


def _save_body(res: Response, out_dir: str, default_name: str) -> str:
    cd = res.headers.get("content-disposition", "")
    name = default_name
    if "filename=" in cd:
        name = cd.split("filename=", 1)[1].split(";", 1)[0].strip().strip('"')
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, _safe_name(name))
    _atomic_write(path, res.body)
    return path


def _atomic_write(path: str, data: bytes) -> None:
    tmp = path + ".part"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def parse_infer_response(res: Response, out_dir: str) -> InferAnswer:
    """Turn an infer answer into params + a label file on disk.

    MONAI Label sends ``multipart/form-data`` (a ``params`` part and the file part) when the task
    wrote a label, plain JSON when it did not (classification, report), and the file alone when asked
    for ``output=image``.
    """
    if res.is_multipart:
        params: dict = {}
        label_path = None
        for part in res.parts():
            if part.filename:
                os.makedirs(out_dir, exist_ok=True)
                label_path = os.path.join(out_dir, _safe_name(part.filename))
                _atomic_write(label_path, part.data)
            elif part.name == "params":
                try:
                    loaded = json.loads(part.data.decode("utf-8") or "{}")
                except ValueError as e:
                    raise ServerError(res.status, f"params part is not JSON: {part.data[:200]!r}") from e
                params = loaded if isinstance(loaded, dict) else {"result": loaded}
        return InferAnswer(params=params, label_path=label_path)
    if "json" in res.content_type.lower():
        data = res.json()
        return InferAnswer(params=data if isinstance(data, dict) else {"result": data})
    # a bare file (output=image)
    return InferAnswer(params={}, label_path=_save_body(res, out_dir, "label.nii.gz"))
