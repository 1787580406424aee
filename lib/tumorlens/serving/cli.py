"""``tumorlens serve [--studies DIR] [--host 127.0.0.1] [--port 8000]``.

Runs ``monailabel start_server --app monai_app`` with this environment's ``bin/`` first on PATH (the
``monailabel`` launcher runs whichever ``python`` comes first). Without ``--studies`` it serves a
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
    from tumorlens.paths import sample_studies_dir

    src = sample_studies_dir()
    if not src.is_dir():
        raise InvalidInputError(src, "bundled sample studies are missing")
    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_file() and not (dest / f.name).exists():
            shutil.copy2(f, dest / f.name)
            (dest / f.name).chmod(0o644)
    return dest


def logging_config(app: Path) -> Path | None:
    """MONAI Label's logging config, written once beside its log (``monai_app/logs/``): without one, every
    server start left a copy in the system's temporary folder. Same content as MONAI Label makes."""
    try:
        import monailabel

        template = Path(monailabel.__file__).resolve().parent / "logging.json"
        logs = app / "logs"
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
                   extra: list[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """The ``monailabel start_server`` command line and environment."""
    from tumorlens.paths import project_root

    bindir = str(Path(sys.executable).parent)
    env = dict(os.environ)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    exe = shutil.which("monailabel", path=env["PATH"])
    if exe is None:
        raise InvalidInputError(None, f"the 'monailabel' launcher is not installed in {bindir}")
    app = project_root() / "monai_app"
    cmd = [exe, "start_server", "--app", str(app), "--studies", studies, "--host", host, "--port", str(port)]
    log_config = logging_config(app)
    if log_config is not None:
        cmd += ["--log_config", str(log_config)]
    for k, v in conf or []:
        cmd += ["--conf", k, v]
    cmd += list(extra or [])
    return cmd, env


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
    cmd, env = server_command(studies, args.host, args.port, args.conf)
    # session uploads go to the work folder too (MONAI Label's own default is ~/.cache/monailabel/sessions)
    env.setdefault("MONAI_LABEL_SESSION_PATH", str((Path(args.workdir or default_workdir()) / "sessions").absolute()))
    # a PACS' series list is kept a minute, not MONAI Label's two hours: a series sent to it shows up while the
    # annotator still waits for it, one deleted from it leaves the list
    env.setdefault("MONAI_LABEL_DICOMWEB_CACHE_EXPIRY", "60")
    print(" ".join(cmd), file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    # The server replaces this process, and the ``monailabel`` launcher (a bash script) ``exec``s
    # ``python -m monailabel.main`` in turn: the server keeps this PID, so a SIGTERM/SIGINT sent to
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
                   help="where the copy of the sample studies and session uploads go (default $TUMORLENS_WORKDIR or "
                        "~/.local/share/tumorlens)")
    p.add_argument("--conf", nargs=2, action="append", metavar=("KEY", "VALUE"),
                   help="app setting passed to the server, e.g. --conf model PATH (see monai_app/README.md)")
    p.set_defaults(func=run)
