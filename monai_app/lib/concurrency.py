"""Serve MONAI Label's ``POST /infer/...`` requests from worker threads, so they run concurrently.

MONAI Label 0.8.5 declares its infer endpoint ``async def`` but does all the work - reading the
upload, running the model, writing the result - synchronously inside it. The server's one event-loop
thread is then busy for the whole inference: concurrent clients queue behind each other and even
``/info/`` waits. This ASGI wrapper hands each infer request to a worker thread that runs the
unchanged FastAPI app on its own event loop, relaying the request body and the response through the
server's loop; every other request stays on the loop. Routes, parameters, auth and responses are
MONAI Label's own, so any client sees the same API. The tumorlens tasks are thread-safe (saliency
hooks record per thread; a model version is loaded once and never mutated).

Worker threads: ``MONAI_LABEL_INFER_CONCURRENCY`` when it is positive, else 4.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

logger = logging.getLogger(__name__)
DEFAULT_WORKERS = 4


class InferInThreads:
    def __init__(self, app, prefix: str, workers: int):
        self.app = app
        self.prefix = prefix
        self.workers = workers
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="INFER")

    def _offloaded(self, scope) -> bool:
        return scope["type"] == "http" and scope.get("method") == "POST" and scope.get("path", "").startswith(self.prefix)

    async def __call__(self, scope, receive, send):
        if not self._offloaded(scope):
            return await self.app(scope, receive, send)
        server_loop = asyncio.get_running_loop()

        def relay(coro_fn):
            async def call(*args):
                return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro_fn(*args), server_loop))
            return call

        async def in_worker() -> None:
            await self.app(scope, relay(receive), relay(send))

        await server_loop.run_in_executor(self.pool, lambda: asyncio.run(in_worker()))


def install_infer_threads(fastapi_app) -> int:
    """Wrap ``fastapi_app``'s ASGI stack; returns the number of worker threads."""
    from monailabel.config import settings

    stack = getattr(fastapi_app, "middleware_stack", None)
    layer = stack
    while layer is not None:  # already installed (an app re-init), possibly under other wrappers
        if isinstance(layer, InferInThreads):
            return layer.workers
        layer = getattr(layer, "app", None)
    if stack is None:
        stack = fastapi_app.build_middleware_stack()
    n = settings.MONAI_LABEL_INFER_CONCURRENCY
    workers = n if n > 0 else DEFAULT_WORKERS
    fastapi_app.middleware_stack = InferInThreads(stack, f"{settings.MONAI_LABEL_API_STR}/infer/", workers)
    logger.info(f"infer requests served by {workers} worker threads")
    return workers
