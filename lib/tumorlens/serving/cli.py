"""``tumorlens serve [--studies DIR] [--host 127.0.0.1] [--port 8000]``.

Runs MONAI Label's ``start_server --app monai_app`` with this environment's Python (``python -m monailabel.main``)
and its ``bin/`` first on PATH. Without ``--studies`` it serves a
working copy of the bundled ``samples/studies`` (the datastore writes labels and its index next
to the images, and the repository's copy must stay untouched).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from tumorlens.errors import InvalidInputError


def default_workdir() -> Path:
    env = os.environ.get("TUMORLENS_WORKDIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "tumorlens"


def prepare_sample_studies(dest: Path) -> Path:
    """Copy the bundled sample studies into ``dest`` (files already there are kept: labels made in
    an earlier session survive a restart)."""
    from tumorlens.paths import not_a_checkout, sample_studies_dir

    src = sample_studies_dir()
    if not src.is_dir():
        raise InvalidInputError(src, f"bundled sample studies are missing{not_a_checkout(src)}")
    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_file() and not (dest / f.name).exists():
            shutil.copy2(f, dest / f.name)
            (dest / f.name).chmod(0o644)
    return dest


def logs_dir(studies: str, workdir: Path | None = None) -> Path:
    """This server's log folder, one per datastore under the work folder: every server of a checkout had written
    ``monai_app/logs/app.log``, and each one's ``GET /logs/`` showed the others' image ids and picks."""
    import hashlib

    name = Path(studies.rstrip("/")).name if not studies.startswith(("http://", "https://")) else "dicomweb"
    tag = hashlib.sha256(studies.encode()).hexdigest()[:10]
    return Path(workdir or default_workdir()).absolute() / "logs" / f"{safe_part(name)}-{tag}"


def safe_part(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:40] or "studies"


def logging_config(logs: Path) -> Path | None:
    """MONAI Label's logging config, written beside the log it names (``logs/app.log``): without one, every
    server start left a copy in the system's temporary folder. Same content as MONAI Label makes."""
    try:
        import monailabel

        template = Path(monailabel.__file__).resolve().parent / "logging.json"
        text = template.read_text().replace("${LOGDIR}", str(logs)).replace("${LOGFILE}", str(logs / "app.log"))
        logs.mkdir(parents=True, exist_ok=True)
        out = logs / "logging.json"
        if not out.is_file() or out.read_text() != text:
            from tumorlens.atomic import atomic_write_text

            atomic_write_text(out, text)
        return out
    except (OSError, ImportError, InvalidInputError):
        return None  # MONAI Label then makes its own, as before


def server_command(studies: str, host: str, port: int, conf: list[list[str]] | None = None,
                   extra: list[str] | None = None, workdir: Path | None = None) -> tuple[list[str], dict[str, str]]:
    """The ``monailabel start_server`` command line and environment (``workdir``: where its log goes)."""
    import importlib.util

    from tumorlens.paths import not_a_checkout, project_root

    bindir = str(Path(sys.executable).parent)
    env = dict(os.environ)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if importlib.util.find_spec("monailabel") is None:
        raise InvalidInputError(None, f"monailabel is not installed in this environment ({sys.executable}): "
                                      "install the project with `make setup`")
    app = project_root() / "monai_app"
    if not (app / "main.py").is_file():
        raise InvalidInputError(app, f"the MONAI Label app is not there{not_a_checkout(app)}")
    # MONAI Label's own server entry point with this Python, not its ``monailabel`` launcher: that bash script
    # re-splits its arguments (``$*``), and a studies folder with a space in its name was two arguments
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", studies,
           "--host", host, "--port", str(port)]
    check_app_folders(app)
    log_config = logging_config(logs_dir(studies, workdir))
    if log_config is not None:
        cmd += ["--log_config", str(log_config)]
        env["TUMORLENS_LOG_FILE"] = str(log_config.parent / "app.log")  # what this server's GET /logs/ reads
    for k, v in conf or []:
        cmd += ["--conf", k, v]
    cmd += list(extra or [])
    return cmd, env


def check_app_folders(app: Path) -> None:
    """MONAI Label creates ``model/``, ``lib/``, ``logs/`` and ``bin/`` in the app folder at start: in a read-only
    checkout that was a traceback. Said at once, with the fix."""
    missing = [d for d in ("model", "lib", "logs", "bin") if not (app / d).is_dir()]
    if missing and not os.access(app, os.W_OK):
        raise InvalidInputError(app, f"read-only, and MONAI Label needs the folders {', '.join(missing)} in it: create "
                                     "them once (mkdir), or serve from a writable checkout")


def check_port_free(host: str, port: int) -> None:
    """A port another server holds: said at once (the server loaded the model and started scoring for half a
    minute, then exited 3 with "address already in use" among 100 lines that ended in "Return code: 0")."""
    import errno
    import socket

    if not 0 < port < 65536:
        raise InvalidInputError(None, f"port {port} is not a TCP port (1-65535)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise InvalidInputError(None, f"cannot listen on {host}: {e.strerror or e}") from e
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            sock.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise InvalidInputError(None, f"port {port} on {host} is in use (another server?): stop it, or "
                                              "give another with --port") from e
            raise InvalidInputError(None, f"cannot listen on {host}:{port}: {e.strerror or e}") from e


def run(args: argparse.Namespace) -> int:
    studies = args.studies
    if studies is None:
        studies = str(prepare_sample_studies(Path(args.workdir or default_workdir()) / "studies"))
        print(f"serving the bundled sample studies from {studies}", file=sys.stderr)
    elif not studies.startswith(("http://", "https://")):
        p = Path(studies)
        if not p.is_dir():
            raise InvalidInputError(p, "studies folder does not exist")
        studies = str(p.resolve())
    check_port_free(args.host, args.port)
    cmd, env = server_command(studies, args.host, args.port, args.conf, workdir=args.workdir and Path(args.workdir))
    # session uploads go to the work folder too (MONAI Label's own default is ~/.cache/monailabel/sessions)
    env.setdefault("MONAI_LABEL_SESSION_PATH", str((Path(args.workdir or default_workdir()) / "sessions").absolute()))
    # a PACS' series list is kept a minute, not MONAI Label's two hours: a series sent to it shows up while the
    # annotator still waits for it, one deleted from it leaves the list
    env.setdefault("MONAI_LABEL_DICOMWEB_CACHE_EXPIRY", "60")
    print(" ".join(cmd), file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    # The server (``python -m monailabel.main``) replaces this process: it keeps this PID, so a SIGTERM/SIGINT sent to
    # ``tumorlens serve`` reaches uvicorn itself and it shuts down (tests/test_volume_edges.py checks it).
    # A wrapper that forks (``(cd X && tumorlens serve) &``) holds a PID of its own: signal the server's.
    os.execvpe(cmd[0], cmd, env)
    return 0  # pragma: no cover


def register(sub) -> None:
    p = sub.add_parser("serve", help="run the MONAI Label server with the tumorlens app",
                       description=__doc__.splitlines()[0])
    p.add_argument("--studies", default=None,
                   help="datastore: a folder of images, or a DICOMweb URL (default: a copy of the bundled samples)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workdir", default=None,
                   help="where the copy of the sample studies, session uploads and the server's log (logs/) go "
                        "(default $TUMORLENS_WORKDIR or ~/.local/share/tumorlens)")
    p.add_argument("--conf", nargs=2, action="append", metavar=("KEY", "VALUE"),
                   help="app setting passed to the server, e.g. --conf model PATH (see monai_app/README.md)")
    p.set_defaults(func=run)
