"""The ``tumorlens`` command. Each pipeline stage registers its own sub-commands (``register(sub)``
in a ``cli`` module of its package); heavy imports happen inside the handlers, so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys
from pathlib import Path

from tumorlens.errors import TumorlensError

# stage command modules, in the order they appear in --help
COMMAND_MODULES = (
    "tumorlens.data.cli",
    "tumorlens.training.cli",
    "tumorlens.evaluation.cli",
    "tumorlens.saliency.cli",
    "tumorlens.atlas.cli",
    "tumorlens.report.cli",
    "tumorlens.alignment.cli",
    "tumorlens.serving.cli",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tumorlens", description="tumorlens: explainable brain-tumour MRI (class, tumour "
                                "mask, saliency, atlas regions, verified report) and its MONAI Label server")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name or (e.name and name.startswith(e.name + ".")):
                continue  # that stage is not part of this installation
            raise
        mod.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except TumorlensError as e:
        print(f"tumorlens {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a folder that cannot be written, a full disk: the file and the reason, no traceback
        where = f"{e.filename}: " if e.filename else ""
        hint = ""
        if e.errno in (errno.EROFS, errno.EACCES) and e.filename and Path(str(e.filename)).name == ".cache":
            hint = " (set TUMORLENS_CACHE to a writable folder for the caches)"
        print(f"tumorlens {args.command}: error: {where}{e.strerror or e}{hint}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:  # an install without everything requirements.txt lists: which one, no traceback
        if not e.name or e.name.split(".")[0] == "tumorlens":
            raise
        print(f"tumorlens {args.command}: error: the Python package {e.name!r} is not installed, and this command "
              "needs it: install the project with `make setup` (requirements.txt lists every package)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
