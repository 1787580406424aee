"""llama-cpp-python's OpenAI-compatible server, with the same safe weight loading as the local backend.

``python -m tumorlens.report.llama_server --model X.gguf --host 127.0.0.1 --port N`` takes the
arguments of ``python -m llama_cpp.server``. Why a wrapper: on this machine kind the repacked
(extra-buffer) weights crash llama.cpp's decode, and the server has no option to turn them off.
"""

from __future__ import annotations

import runpy
import sys


def main() -> None:
    from tumorlens.report.backends import _no_extra_buffers

    _no_extra_buffers()
    sys.argv[0] = "llama_cpp.server"
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
