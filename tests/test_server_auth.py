"""MONAI Label's own optional auth switch with this app (``MONAI_LABEL_AUTH_ENABLE``).

MONAI Label verifies RS256 tokens against the public key of a Keycloak realm and maps realm roles
to user / annotator / admin. Keycloak cannot run here, so a minimal realm stand-in on loopback
serves the realm key, the OpenID configuration and a password-grant token endpoint; everything on
the server side is MONAI Label's real code path with the tumorlens app behind it.
"""

from __future__ import annotations

import base64
import json
import shutil
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from tumorlens.paths import project_root, sample_studies_dir

pytest.importorskip("monailabel")
jwt = pytest.importorskip("jwt")
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: E402
from monailabel.client import MONAILabelClient  # noqa: E402
from monailabel.client.client import MONAILabelClientException  # noqa: E402

from tumorlens.serving.process import ServerProcess, free_port  # noqa: E402

ROLES = {"reader": ["monailabel-user"], "annotator": ["monailabel-user", "monailabel-annotator"],
         "admin": ["monailabel-user", "monailabel-annotator", "monailabel-admin"]}
PASSWORD = "correct horse"


class Realm:
    """Keycloak-shaped realm: key, OpenID configuration, password grant (users in ``ROLES``)."""

    def __init__(self):
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        der = self.key.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
        self.public_b64 = base64.b64encode(der).decode()
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}/realms/tumorlens"
        realm = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _json(self, code: int, obj: dict) -> None:
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path == "/realms/tumorlens":
                    return self._json(200, {"realm": "tumorlens", "public_key": realm.public_b64})
                if self.path == "/realms/tumorlens/.well-known/openid-configuration":
                    return self._json(200, {"token_endpoint": realm.uri + "/protocol/openid-connect/token"})
                return self._json(404, {})

            def do_POST(self):
                form = urllib.parse.parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
                user, pw = form.get("username", [""])[0], form.get("password", [""])[0]
                if user not in ROLES or pw != PASSWORD:
                    return self._json(401, {"error": "invalid_grant"})
                return self._json(200, {"access_token": realm.token(user), "token_type": "bearer"})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def token(self, user: str, ttl: float = 600, key=None) -> str:
        payload = {"preferred_username": user, "exp": int(time.time() + ttl), "realm_access": {"roles": ROLES[user]}}
        return jwt.encode(payload, key or self.key, algorithm="RS256")

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def forged_tokens(realm: Realm) -> dict[str, str]:
    """Tokens a verifier that trusts the header's ``alg`` would accept."""
    import hashlib
    import hmac

    payload = _b64(json.dumps({"preferred_username": "admin", "exp": int(time.time() + 600),
                               "realm_access": {"roles": ROLES["admin"]}}).encode())
    none = f"{_b64(json.dumps({'alg': 'none', 'typ': 'JWT'}).encode())}.{payload}."
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    pem = realm.key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    sig = _b64(hmac.new(pem, f"{head}.{payload}".encode(), hashlib.sha256).digest())
    return {"alg none": none, "HS256 keyed with the public key": f"{head}.{payload}.{sig}"}


def _status(exc: MONAILabelClientException) -> int:
    import re

    m = re.search(r"Status: (\d+)", str(exc.msg))
    return int(m.group(1)) if m else (exc.status_code or -1)


@pytest.mark.slow
def test_auth_switch_enforces_tokens_and_roles(tmp_path):
    studies = tmp_path / "studies"
    shutil.copytree(sample_studies_dir(), studies)
    with Realm() as realm:
        env = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": realm.uri,
               "MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "MONAI_LABEL_SESSION_PATH": str(tmp_path / "sessions")}
        with ServerProcess(studies, env=env, log_path=tmp_path / "server.log") as srv:
            c = MONAILabelClient(srv.url, tmpdir=str(tmp_path))
            assert c.auth_enabled()
            # no token, garbage, expired, or signed by someone else: 401
            assert requests.get(srv.url + "/info/", timeout=30).status_code == 401
            other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            bads = ["not-a-jwt", realm.token("admin", ttl=-60), realm.token("admin", key=other),
                    *forged_tokens(realm).values()]
            for bad in bads:
                r = requests.get(srv.url + "/info/", headers={"Authorization": f"Bearer {bad}"}, timeout=30)
                assert r.status_code == 401, (bad[:20], r.status_code)
            # the client's own login path (password grant through the server's /auth/token)
            with pytest.raises(MONAILabelClientException):
                c.auth_token("reader", "wrong password")
            c.update_auth(c.auth_token("reader", PASSWORD))
            assert c.auth_valid_token()
            assert "classification" in c.info()["models"]
            _, res = c.infer("classification", "mri2d_1941", {})
            assert json.loads(res)["label"]
            before = sorted(p.name for p in studies.iterdir())
            with pytest.raises(MONAILabelClientException) as ei:  # upload needs the annotator role
                c.upload_image(str(sample_studies_dir() / "mri2d_1941.jpg"), image_id="by_reader", params={})
            assert _status(ei.value) == 403
            with pytest.raises(MONAILabelClientException) as ei:  # training needs admin
                c.train_start("tumorlens", {})
            assert _status(ei.value) == 403
            assert sorted(p.name for p in studies.iterdir()) == before
            c.update_auth({"token_type": "Bearer", "access_token": realm.token("annotator")})
            assert c.upload_image(str(sample_studies_dir() / "mri2d_1941.jpg"), image_id="by_annotator",
                                  params={})["image"] == "by_annotator"
            with pytest.raises(MONAILabelClientException) as ei:
                c.train_start("tumorlens", {})
            assert _status(ei.value) == 403
            # the 3D Slicer module's own client logs in the same way (it had no way to give a token: every request
            # was a 401; session 39 probe)
            sys.path.insert(0, str(project_root() / "slicer_module" / "TumorLens"))
            import TumorLensLib as tll

            slicer_client = tll.MonaiLabelClient(srv.url)
            assert slicer_client.auth_enabled()
            with pytest.raises(tll.ServerError) as ei:
                slicer_client.info()
            assert ei.value.status == 401
            with pytest.raises(tll.ServerError):
                slicer_client.login("annotator", "wrong password")
            slicer_client.login("annotator", PASSWORD)
            assert "classification" in slicer_client.info()["models"]
            assert "classification" in tll.MonaiLabelClient(srv.url, token=realm.token("reader")).info()["models"]
            # the app's own 4xx still apply behind auth
            with pytest.raises(MONAILabelClientException) as ei:
                c.infer("classification", "../etc/passwd", {})
            assert _status(ei.value) == 400


def test_a_login_server_that_cannot_be_reached_is_a_503_with_a_message(tmp_path):
    """With the realm down every token got a bare 500 (session 39 probe): the server says why, and keeps serving."""
    studies = tmp_path / "studies"
    shutil.copytree(sample_studies_dir(), studies)
    with Realm() as realm:
        token = realm.token("reader")
    env = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": f"http://127.0.0.1:{free_port()}/realms/x",
           "MONAI_LABEL_AUTH_TIMEOUT": "2", "MONAI_LABEL_AUTO_UPDATE_SCORING": "false",
           "MONAI_LABEL_SESSION_PATH": str(tmp_path / "sessions")}
    with ServerProcess(studies, env=env, log_path=tmp_path / "server.log") as srv:
        for _ in range(2):
            r = requests.get(srv.url + "/info/", headers={"Authorization": f"Bearer {token}"}, timeout=30)
            assert r.status_code == 503 and "login server" in r.json()["detail"], (r.status_code, r.text[:200])
