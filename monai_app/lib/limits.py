"""A request-size limit in front of MONAI Label's FastAPI app (it has none): 413 with a message.

MONAI Label builds its app before ours is loaded, so the limit wraps the already-built ASGI stack.
"""

from __future__ import annotations

import json
import logging

logger = logging.getLogger(__name__)


class _TooLarge(Exception):
    pass


class BodyLimit:
    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def _reject(self, send, size: str) -> None:
        body = json.dumps({"detail": f"request body too large ({size}); the limit is "
                                     f"{self.max_bytes / 1048576:.0f} MiB"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            logger.warning(f"rejected a {int(length)} byte request to {scope.get('path')}")
            return await self._reject(send, f"{int(length) / 1048576:.1f} MiB")
        seen = 0
        started = False
        exceeded = False

        async def limited_receive():
            nonlocal seen, exceeded
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    exceeded = True
                    raise _TooLarge()
            return msg

        async def tracking_send(msg):
            nonlocal started
            if exceeded:  # the form parser turned the stop into its own 400: answer 413 instead
                if not started:
                    started = True
                    await self._reject(send, f"over {seen / 1048576:.1f} MiB")
                return
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._reject(send, f"over {seen / 1048576:.1f} MiB")


def install_body_limit(fastapi_app, max_bytes: int) -> None:
    stack = getattr(fastapi_app, "middleware_stack", None)
    if isinstance(stack, BodyLimit):
        stack.max_bytes = max_bytes
        return
    if stack is None:
        stack = fastapi_app.build_middleware_stack()
    fastapi_app.middleware_stack = BodyLimit(stack, max_bytes)
    logger.info(f"request size limit: {max_bytes / 1048576:.0f} MiB")
