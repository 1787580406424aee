"""A MONAI Label server with the tumorlens app as a child process on a free loopback port: used by
the integration tests and ``bench/server.py`` (start, wait until ``/info/`` answers, stop it and
everything it started)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from tumorlens.serving.cli import server_command


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``with ServerProcess(studies) as srv: srv.url``. Logs go to ``log_path``."""

    def __init__(self, studies: str | Path, *, port: int | None = None, env: dict[str, str] | None = None,
                 conf: list[list[str]] | None = None, log_path: str | Path | None = None, host: str = "127.0.0.1",
                 via_cli: bool = False, workdir: str | Path | None = None):
        self.studies = str(studies)
        self.host = host
        self.port = port or free_port(host)
        self.extra_env = dict(env or {})
        self.conf = conf
        beside = Path(tempfile.gettempdir()) if self.studies.startswith(("http://", "https://")) else Path(self.studies).parent
        self.log_path = Path(log_path) if log_path else beside / f"server-{self.port}.log"
        # the server's log folder goes here (``tumorlens serve --workdir``), beside its own log unless told (a
        # DICOMweb URL has no folder to go beside)
        self.workdir = Path(workdir) if workdir else self.log_path.absolute().parent / "work"
        self.via_cli = via_cli  # start through the ``tumorlens serve`` command (it execs the same server)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, timeout: float = 300.0) -> ServerProcess:
        cmd, env = server_command(self.studies, self.host, self.port, self.conf, workdir=self.workdir)
        if self.via_cli:
            cmd = [str(Path(sys.executable).parent / "tumorlens"), "serve", "--studies", self.studies,
                   "--host", self.host, "--port", str(self.port), "--workdir", str(self.workdir)]
            for k, v in self.conf or []:
                cmd += ["--conf", k, v]
        env.update(self.extra_env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        # own session: stop() can end the server and the train/scoring subprocesses it spawns
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=str(self.log_path.parent))
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; log:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/info/", timeout=5) as r:
                    if r.status == 200:
                        return self
            except urllib.error.HTTPError as e:
                if e.code in (401, 403):  # auth enabled: it answers
                    return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"server did not answer /info/ within {timeout:.0f} s; log:\n{self.tail()}")

    def info(self) -> dict:
        with urllib.request.urlopen(self.url + "/info/", timeout=30) as r:
            return json.loads(r.read())

    def rss_bytes(self) -> int:
        """Resident memory of the server process (not of its short-lived subprocesses)."""
        import psutil

        return int(psutil.Process(self.proc.pid).memory_info().rss) if self.proc else 0

    def kill(self) -> None:
        """SIGKILL the whole process group (a crash, for the fault tests)."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self._close()

    def stop(self, grace: float = 15.0) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
            except ProcessLookupError:
                pass
        # subprocesses (training, scoring) may outlive the server's own exit
        if self.proc:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._close()

    def _close(self) -> None:
        log = getattr(self, "_log", None)
        if log and not log.closed:
            log.close()

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
