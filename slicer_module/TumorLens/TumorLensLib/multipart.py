"""multipart/form-data in both directions, with the standard library only.

Slicer's Python has no ``requests_toolbelt`` and ``cgi`` is gone from Python 3.13, so the client
encodes its uploads and decodes MONAI Label's infer responses (a ``params`` JSON part plus the label
file) itself.
"""

from __future__ import annotations

import mimetypes
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class Part:
    """One decoded part: its form name, the file name when it is a file, and the raw bytes."""

    name: str
    filename: str | None
    content_type: str
    data: bytes


def new_boundary() -> str:
    return "tumorlens-" + uuid.uuid4().hex


def encode_fields(fields: dict[str, str], files: dict[str, str], boundary: str) -> tuple[list[bytes | str], int]:
    """Return the body as pieces (bytes, or a file path to stream) and its total length.

    Files are not read into memory here: the client streams them in chunks so that an upload can be
    cancelled between chunks.
    """
    pieces: list[bytes | str] = []
    for key, value in fields.items():
        pieces.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n'.encode() + value.encode() + b"\r\n"
        )
    for key, path in files.items():
        fname = os.path.basename(path)
        ctype = mimetypes.guess_type(fname)[0] or "application/octet-stream"
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"; filename="{fname}"\r\n'
            f"Content-Type: {ctype}\r\n\r\n"
        ).encode()
        pieces.extend([head, path, b"\r\n"])
    pieces.append(f"--{boundary}--\r\n".encode())
    length = sum(len(p) if isinstance(p, bytes) else os.path.getsize(p) for p in pieces)
    return pieces, length


def iter_pieces(pieces: list[bytes | str], chunk_size: int, check) -> Iterator[bytes]:
    """Yield the body chunk by chunk, calling ``check()`` (which raises on cancel) between chunks."""
    for p in pieces:
        check()
        if isinstance(p, bytes):
            yield p
            continue
        with open(p, "rb") as f:
            while True:
                check()
                chunk = f.read(chunk_size)
                if not chunk:
                    break
                yield chunk


def _boundary_of(content_type: str) -> str:
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        raise ValueError(f"multipart response without a boundary: {content_type!r}")
    return m.group(1)


def _header_params(value: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in value.split(";")[1:]:
        if "=" in item:
            k, v = item.split("=", 1)
            out[k.strip().lower()] = v.strip().strip('"')
    return out


def decode(body: bytes, content_type: str) -> list[Part]:
    """Split a multipart body (whole bytes plus its Content-Type header) into parts.

    Done by hand on the boundary (not with ``email``), so binary files come back byte for byte.
    """
    delim = b"--" + _boundary_of(content_type).encode("latin-1")
    chunks = body.split(delim)
    if len(chunks) < 3:
        raise ValueError("response declared multipart but has no complete part")
    parts: list[Part] = []
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            break  # closing delimiter
        if chunk.startswith(b"\r\n"):
            chunk = chunk[2:]
        if chunk.endswith(b"\r\n"):
            chunk = chunk[:-2]
        head, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("malformed multipart part: no blank line after its headers")
        headers: dict[str, str] = {}
        for line in head.decode("latin-1").split("\r\n"):
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        disp = _header_params(headers.get("content-disposition", ""))
        parts.append(
            Part(
                name=disp.get("name", ""),
                filename=disp.get("filename") or None,
                content_type=headers.get("content-type", "application/octet-stream").split(";")[0].strip(),
                data=data,
            )
        )
    return parts
