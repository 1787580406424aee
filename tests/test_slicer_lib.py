"""TumorLensLib (the Slicer module's pure-Python part): REST client, parsing, report, colours.

The client is exercised against a small real HTTP server on loopback (started and stopped here),
so error paths, multipart answers, timeouts and cancellation go through real sockets.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tumorlens.paths import project_root

sys.path.insert(0, str(project_root() / "slicer_module" / "TumorLens"))

import TumorLensLib as tll  # noqa: E402
from TumorLensLib import multipart  # noqa: E402

BIN = bytes(range(256)) * 64 + b"\r\n--not-a-boundary\r\n\r\n" + bytes(range(255, -1, -1)) * 8


def test_lib_imports_no_slicer_or_qt():
    src = "\n".join(p.read_text() for p in (project_root() / "slicer_module/TumorLens/TumorLensLib").glob("*.py"))
    for mod in ("slicer", "qt", "ctk", "vtk"):
        assert f"import {mod}" not in src and f"from {mod}" not in src, mod


# ---- multipart --------------------------------------------------------------------------------------

def test_multipart_round_trip_keeps_binary_bytes(tmp_path):
    f = tmp_path / "label.nii.gz"
    f.write_bytes(BIN)
    boundary = multipart.new_boundary()
    pieces, length = multipart.encode_fields({"params": json.dumps({"a": 1})}, {"label": str(f)}, boundary)
    body = b"".join(multipart.iter_pieces(pieces, 1000, lambda: None))
    assert len(body) == length
    parts = multipart.decode(body, f"multipart/form-data; boundary={boundary}")
    assert [p.name for p in parts] == ["params", "label"]
    assert json.loads(parts[0].data) == {"a": 1}
    assert parts[1].filename == "label.nii.gz" and parts[1].data == BIN


def test_multipart_decode_rejects_garbage():
    with pytest.raises(ValueError, match="boundary"):
        multipart.decode(b"x", "multipart/form-data")
    with pytest.raises(ValueError):
        multipart.decode(b"no parts here", "multipart/form-data; boundary=abc")


def test_iter_pieces_stops_on_cancel(tmp_path):
    f = tmp_path / "big.bin"
    f.write_bytes(b"x" * 10_000)
    pieces, _ = multipart.encode_fields({}, {"file": str(f)}, "b")
    calls = {"n": 0}

    def check():
        calls["n"] += 1
        if calls["n"] > 3:
            raise tll.Cancelled("stop")

    with pytest.raises(tll.Cancelled):
        list(multipart.iter_pieces(pieces, 100, check))


# ---- a real loopback HTTP server ----------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):  # keep pytest output clean
        pass

    def _send(self, status: int, body: bytes, ctype: str = "application/json", extra: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_GET(self):
        if self.path.startswith("/info/"):
            return self._send(200, json.dumps({"name": "fake", "models": {
                "classification": {"type": "classification", "labels": ["glioma", "meningioma", "pituitary", "no_tumor"]},
                "saliency_gradcampp": {"type": "segmentation", "labels": {"lesion": 1}}},
                "strategies": {"random": {}, "uncertainty": {}}}).encode())
        if self.path.startswith("/datastore/image"):
            return self._send(200, BIN, "application/gzip", {"Content-Disposition": 'attachment; filename="../../x.nii.gz"'})
        if self.path.startswith("/datastore/"):
            return self._send(200, json.dumps({"objects": {"img-1": {"image": {}, "labels": {}}}}).encode())
        if self.path.startswith("/slow"):
            time.sleep(2.0)
            return self._send(200, b"{}")
        if self.path.startswith("/stream"):
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(64 * 1024 * 40))
            self.end_headers()
            try:
                for _ in range(40):
                    self.wfile.write(b"y" * 64 * 1024)
                    self.wfile.flush()
                    time.sleep(0.05)
            except (BrokenPipeError, ConnectionResetError):
                pass
            return None
        if self.path.startswith("/train/"):
            return self._send(200, json.dumps({"status": "RUNNING"}).encode())
        if self.path.startswith("/notjson"):
            return self._send(200, b"<html>hello</html>", "application/json")
        return self._send(404, json.dumps({"detail": f"no route {self.path.split('?')[0]}"}).encode())

    def do_DELETE(self):
        if self.path.startswith("/train/"):
            return self._send(200, json.dumps({"stopped": True}).encode())
        return self._send(404, json.dumps({"detail": "Not Found"}).encode())

    def do_PUT(self):
        body = self._body()
        parts = multipart.decode(body, self.headers["Content-Type"])
        files = [p for p in parts if p.filename]
        params = json.loads(next(p.data for p in parts if p.name == "params"))
        if not files:
            return self._send(422, json.dumps({"detail": [{"loc": ["body", "file"], "msg": "field required"}]}).encode())
        return self._send(200, json.dumps({"image": "img-2", "sha": hashlib.sha1(files[0].data).hexdigest(),
                                           "field": files[0].name, "params": params,
                                           "query": self.path.split("?", 1)[-1]}).encode())

    def do_POST(self):
        body = self._body()
        if self.path.startswith("/infer/saliency"):
            boundary = "srv-boundary"
            params = json.dumps({"label_names": {"Left_Insular_Cortex": 1}, "findings": {"schema_version": "1.0"}})
            payload = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"params\"\r\n"
                       f"Content-Type: application/json\r\n\r\n{params}\r\n"
                       f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"tmpab.nii.gz\"\r\n"
                       f"Content-Type: application/gzip\r\n\r\n").encode() + BIN + f"\r\n--{boundary}--\r\n".encode()
            return self._send(200, payload, f"multipart/form-data; boundary={boundary}")
        if self.path.startswith("/infer/classification"):
            return self._send(200, json.dumps({"probabilities": {"glioma": 0.7, "meningioma": 0.1,
                                                                 "pituitary": 0.1, "no_tumor": 0.1}}).encode())
        if self.path.startswith("/infer/broken"):
            return self._send(500, json.dumps({"detail": "model exploded: CUDA not available"}).encode())
        if self.path.startswith("/train/"):
            return self._send(200, json.dumps({"started": self.path.split("?")[0].rsplit("/", 1)[-1],
                                               "params": json.loads(body or b"{}")}).encode())
        if self.path.startswith("/activelearning/"):
            return self._send(200, json.dumps({"id": "img-1", "echo": json.loads(body or b"{}")}).encode())
        return self._send(404, json.dumps({"detail": "Not Found"}).encode())


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # a client that hung up on purpose (timeout, cancel)
        pass


@pytest.fixture(scope="module")
def fake_server():
    srv = _QuietServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_client_info_and_models(fake_server):
    c = tll.MonaiLabelClient(fake_server, timeout=5)
    models = tll.parse_models(c.info())
    by = {m.name: m for m in models}
    assert by["classification"].type == "classification" and not by["classification"].returns_label
    assert by["classification"].labels == {"glioma": 1, "meningioma": 2, "pituitary": 3, "no_tumor": 4}
    assert by["saliency_gradcampp"].returns_label
    assert by["classification"].display == "classification (classification)"
    assert c.has_image("img-1") and not c.has_image("img-9")


def test_client_upload_streams_file_and_params(fake_server, tmp_path):
    f = tmp_path / "vol.nii.gz"
    f.write_bytes(BIN)
    c = tll.MonaiLabelClient(fake_server, timeout=5)
    res = c.request("PUT", "/datastore/image", query={"image": "img-2"}, fields={"params": '{"k": "v"}'},
                    files={"file": str(f)}).json()
    assert res["sha"] == hashlib.sha1(BIN).hexdigest() and res["field"] == "file"
    assert res["params"] == {"k": "v"} and res["query"] == "image=img-2"
    assert c.upload_image(str(f), "img-2") == "img-2"
    assert c.save_label("img-2", str(f))["field"] == "label"


def test_client_infer_multipart_and_json(fake_server, tmp_path):
    c = tll.MonaiLabelClient(fake_server, timeout=5)
    ans = c.infer("saliency_gradcampp", "img-1", out_dir=str(tmp_path))
    assert ans.label_path and Path(ans.label_path).read_bytes() == BIN
    assert Path(ans.label_path).parent == tmp_path
    assert tll.label_names_of(ans.params) == {"Left_Insular_Cortex": 1}
    cls = c.infer("classification", "img-1", out_dir=str(tmp_path))
    assert cls.label_path is None
    assert list(tll.probabilities_of(cls.params)) == list(tll.CLASS_NAMES)


def test_client_download_cannot_escape_folder(fake_server, tmp_path):
    c = tll.MonaiLabelClient(fake_server, timeout=5)
    p = c.download_image("img-1", str(tmp_path / "dl"))
    assert Path(p).parent == tmp_path / "dl" and Path(p).name == "x.nii.gz" and Path(p).read_bytes() == BIN


def test_client_errors_are_readable(fake_server, tmp_path):
    c = tll.MonaiLabelClient(fake_server, timeout=5)
    with pytest.raises(tll.ServerError) as e:
        c.infer("broken", "img-1", out_dir=str(tmp_path))
    assert e.value.status == 500 and "model exploded" in str(e.value) and "Traceback" not in str(e.value)
    with pytest.raises(tll.ServerError) as e:
        c.request("GET", "/nothing")
    assert e.value.status == 404 and e.value.message == "no route /nothing"
    with pytest.raises(tll.ServerError) as e:
        c.request("GET", "/notjson").json()
    assert "expected JSON" in str(e.value)
    with pytest.raises(tll.ServerError) as e:  # FastAPI validation error list -> one line
        c.request("PUT", "/datastore/image", fields={"params": "{}"})
    assert e.value.status == 422 and "body.file: field required" in e.value.message
    with pytest.raises(tll.ServerError, match="does not exist"):
        c.upload_image(str(tmp_path / "missing.nii.gz"), "x")


def test_client_timeout_and_unreachable():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(tll.ServerError) as e:
        tll.MonaiLabelClient(f"127.0.0.1:{port}", timeout=2).info()
    assert e.value.status == 0 and "cannot reach" in str(e.value)
    for bad in ("", "ftp://x"):
        with pytest.raises(tll.ServerError):
            tll.MonaiLabelClient(bad)


def test_client_timeout(fake_server):
    t0 = time.monotonic()
    with pytest.raises(tll.ServerError) as e:
        tll.MonaiLabelClient(fake_server, timeout=0.5).request("GET", "/slow")
    assert e.value.status == 0 and time.monotonic() - t0 < 1.9


def test_client_cancel_between_chunks(fake_server):
    cancel = threading.Event()
    seen = []

    def progress(done, total):
        seen.append(done)
        if done >= 128 * 1024:
            cancel.set()

    c = tll.MonaiLabelClient(fake_server, timeout=5, cancel=cancel, progress=progress)
    t0 = time.monotonic()
    with pytest.raises(tll.Cancelled):
        c.request("GET", "/stream")
    assert time.monotonic() - t0 < 1.5  # the whole stream takes 2 s
    assert seen and seen[-1] < 64 * 1024 * 40
    with pytest.raises(tll.Cancelled):  # a cancelled client refuses new calls until cleared
        c.info()
    cancel.clear()
    assert c.info()["name"] == "fake"


def test_next_sample_posts_json(fake_server):
    c = tll.MonaiLabelClient(fake_server, timeout=5)
    assert c.next_sample("uncertainty", {"a": 1}) == {"id": "img-1", "echo": {"a": 1}}


# ---- parsing --------------------------------------------------------------------------------------------

def test_parse_label_map_and_errors():
    assert tll.parse_label_map(["a", "b"]) == {"a": 1, "b": 2}
    assert tll.parse_label_map({"a": "3"}) == {"a": 3}
    with pytest.raises(tll.ResponseError):
        tll.parse_label_map({"a": "x"})
    with pytest.raises(tll.ResponseError):
        tll.parse_models({"name": "not monai label"})
    assert tll.label_names_of({"label_names": json.dumps({"background": 0, "lesion": 1})}) == {"lesion": 1}


def test_findings_and_probabilities_parsing():
    f = {"schema_version": "1.0", "classification": {"label": "glioma", "probabilities": {
        "no_tumor": 0.1, "glioma": 0.6, "pituitary": 0.1, "meningioma": 0.2}}}
    assert tll.findings_of({"findings": json.dumps(f)}) == f
    probs = tll.probabilities_of({"findings": f})
    assert list(probs) == list(tll.CLASS_NAMES) and probs["glioma"] == 0.6
    assert tll.probabilities_of({"probabilities": [0.1, 0.2, 0.3, 0.4]})["no_tumor"] == 0.4
    with pytest.raises(tll.ResponseError, match="schema_version"):
        tll.findings_of({"findings": {"regions": []}})
    with pytest.raises(tll.ResponseError, match="not supported"):
        tll.findings_of({"findings": {"schema_version": "2.0"}})
    with pytest.raises(tll.ResponseError):
        tll.probabilities_of({"probabilities": [0.5, 0.5]})
    with pytest.raises(tll.ResponseError):
        tll.probabilities_of({})


def test_familiarity_parsing_and_warning():
    fam = {"score": 0.7446, "threshold": 0.8635, "k": 5, "familiar": False}
    assert tll.familiarity_of({"familiarity": fam}) == {"score": 0.7446, "threshold": 0.8635, "familiar": False}
    f = {"schema_version": "1.1", "classification": {"label": "glioma", "familiarity": dict(fam, familiar=True,
                                                                                             score=0.95)}}
    assert tll.familiarity_of({"findings": f})["familiar"] is True
    assert tll.familiarity_of({"findings": {"schema_version": "1.0", "classification": {}}}) is None
    assert tll.familiarity_of({}) is None
    warning = tll.familiarity_warning(tll.familiarity_of({"familiarity": json.dumps(fam)}))
    assert warning and "0.745 below 0.86" in warning
    close = tll.familiarity_warning({"score": 0.8592, "threshold": 0.8635, "familiar": False})
    shown = [float(w) for w in close.split("familiarity ")[1].split(")")[0].split(" below ")]
    assert shown[0] < shown[1]  # never "0.86 below 0.86"
    assert tll.familiarity_warning({"score": 0.95, "threshold": 0.86, "familiar": True}) is None
    # flagged by the layer statistics alone: the panel says so, not "familiarity 0.95 below 0.79"
    layers = tll.familiarity_of({"familiarity": {"score": 0.95, "threshold": 0.79, "k": 5, "familiar": False,
                                                 "layer_score": 5.9, "layer_threshold": 3.618}})
    warning = tll.familiarity_warning(layers)
    assert "layer score 5.900 above 3.618" in warning and "below" not in warning, warning


def test_window_opinion_line():
    """The lesion-window classifier's part in the decision reaches the results panel, from a classification
    answer or from a findings record; anything malformed is a ResponseError, not a crash in the widget."""
    net = {"glioma": 0.48, "meningioma": 0.41, "pituitary": 0.03, "no_tumor": 0.08}
    w = {"probabilities": {"glioma": 0.12, "meningioma": 0.83, "pituitary": 0.05}, "weight": 0.5,
         "network_probabilities": net, "changed_label": True}
    line = tll.window_opinion_line({"window_classifier": json.dumps(w)})
    assert "settled by the lesion-window classifier (meningioma, 0.83)" in line and "favoured glioma (0.48)" in line
    f = {"schema_version": "1.2", "classification": {"label": "glioma", "window_opinion": dict(w, changed_label=False)}}
    assert tll.window_opinion_line({"findings": f}).startswith("Lesion-window classifier agreed")
    assert tll.window_opinion_line({}) is None
    assert tll.window_opinion_line({"findings": {"schema_version": "1.1", "classification": {}}}) is None
    with pytest.raises(tll.ResponseError):
        tll.window_opinion_line({"window_classifier": {"probabilities": [0.2, 0.8]}})


def test_caveats_parsing():
    """The caveats of a classification/segmentation answer (a list, or the JSON of one in a multipart form
    field) reach the results panel; anything else is a clear ResponseError, not a crash in the widget."""
    cav = ["image is unlike the training images (familiarity 0.80 below the threshold 0.86 ...)",
           "no pose matches the MNI152 head template (...): the volume may not be a head MRI"]
    assert tll.caveats_of({"caveats": cav}) == cav
    assert tll.caveats_of({"caveats": json.dumps(cav)}) == cav
    assert tll.caveats_of({}) == [] and tll.caveats_of({"caveats": ["", " "]}) == []
    for bad in ({"caveats": "not a list"}, {"caveats": [1, 2]}, {"caveats": {"a": 1}}):
        with pytest.raises(tll.ResponseError, match="caveats"):
            tll.caveats_of(bad)


def test_matched_descriptions_lines():
    findings = {"text_matches": [
        {"class_name": "glioma", "description": "an infiltrative intra-axial mass", "similarity": 0.6231},
        {"class_name": "glioma", "description": "a heterogeneous lesion with oedema", "similarity": 0.5},
        {"class_name": "meningioma", "description": "an extra-axial dural-based mass", "similarity": 0.41}]}
    lines = tll.matched_descriptions(findings)
    assert lines == ['matches "an infiltrative intra-axial mass" (glioma, similarity 0.62)',
                     'matches "a heterogeneous lesion with oedema" (glioma, similarity 0.50)']
    assert tll.matched_descriptions({"text_matches": []}) == [] and tll.matched_descriptions(None) == []
    with pytest.raises(tll.ResponseError, match="text_matches"):
        tll.matched_descriptions({"text_matches": [{"class_name": "glioma"}]})
    with pytest.raises(tll.ResponseError, match="familiarity"):
        tll.familiarity_of({"familiarity": {"score": "high"}})


def test_region_names():
    assert tll.readable_region("Left_Insular_Cortex") == ("insular cortex", "left")
    assert tll.readable_region("Right_Lateral_Ventricle") == ("lateral ventricle", "right")
    assert tll.readable_region("Left_Lateral_Ventrical") == ("lateral ventricle", "left")
    assert tll.readable_region("Brain-Stem") == ("brain stem", "midline")
    assert tll.readable_region("Unlabelled_White_Matter_Or_Other")[1] == "unknown"
    findings = {"schema_version": "1.0", "regions": [
        {"label": "Right_Temporal_Pole", "name": "temporal pole", "hemisphere": "right", "fraction": 0.7},
        {"label": "Left_Putamen", "name": "putamen", "hemisphere": "left", "fraction": 0.3}]}
    specs = tll.segment_specs({"Left_Putamen": 2, "Right_Temporal_Pole": 1, "Left_Frontal_Pole": 3},
                              findings, tll.region_color)
    assert [(s.value, s.name) for s in specs] == [
        (1, "temporal pole (right)"), (2, "putamen (left)"), (3, "frontal pole (left)")]
    assert specs[0].fraction == 0.7 and specs[2].fraction is None
    one = tll.segment_specs({"lesion": 1}, findings, tll.region_color)
    assert one[0].name == "lesion - temporal pole (right) +1 more"
    assert one[0].extra["regions"] == "temporal pole (right) 70%; putamen (left) 30%"
    # the server's own name for a binary lesion (its regions joined) is treated the same way
    joined = tll.segment_specs({"temporal pole, putamen": 1}, findings, tll.region_color)
    assert joined[0].name == "salient area - temporal pole (right) +1 more"
    salient = tll.segment_specs({"salient area": 1}, findings, tll.region_color)  # today's saliency tasks
    assert salient[0].name == "salient area - temporal pole (right) +1 more"
    accented = tll.segment_specs({"l\u00e9sion\u2014x": 1}, None, tll.region_color)
    assert accented[0].name == "lesion-x"  # .seg.nrrd headers keep ASCII only
    dup = tll.segment_specs({"Left_Putamen": 1, "left putamen": 2}, {"schema_version": "1.0", "regions": [
        {"label": "Left_Putamen", "name": "putamen", "hemisphere": "left", "fraction": 1.0}]}, tll.region_color)
    assert len({s.name for s in dup}) == 2


def test_colours_distinct_and_heat_table():
    cols = [tll.region_color(i) for i in range(40)]
    assert all(0 <= c <= 1 for col in cols for c in col)
    close = min(tll.color_distance(a, b) for i, a in enumerate(cols) for b in cols[i + 1:])
    assert close > 0.15, close  # no two of the first 40 segments look the same
    heat = tll.heat_table(256)
    assert heat[0][3] == 0.0 and heat[-1] == (1.0, 1.0, 1.0, 1.0)
    assert all(heat[i][0] <= heat[i + 1][0] for i in range(255))
    with pytest.raises(ValueError):
        tll.region_color(-1)


# ---- report formatting ------------------------------------------------------------------------------------

def test_report_view_verified_and_not():
    report = {"findings": "A lesion in the right temporal pole.", "impression": "Likely glioma.",
              "limitations": ["Dev model", "No histology"]}
    ok = tll.report_view({"report": report, "verification": {"supported": True, "unsupported_claims": [],
                                                               "negation_conflicts": [], "checked": 5,
                                                               "backend": "llamacpp"}})
    assert ok.verified and ok.status.startswith("VERIFIED") and "5 claim(s) checked" in ok.status
    md = ok.markdown
    assert md.index("## Findings") < md.index("## Impression") < md.index("## Limitations")
    assert "- No histology" in md and ok.status in md
    bad = tll.report_view({"report": json.dumps(report), "verification": {
        "supported": False, "unsupported_claims": ["left frontal lobe"], "negation_conflicts": [],
        "fell_back": True}})
    assert not bad.verified and bad.status.startswith("FLAGGED") and "1 unsupported" in bad.status
    assert "fell back" in bad.status and "unsupported: left frontal lobe" in bad.markdown
    # the report chain's own record: claims as {"text", "reason"}, checked as {"claims": n}, flags
    chain = tll.report_view({"report": report, "verification": {
        "supported": True, "unsupported_claims": [], "negation_conflicts": [], "missing": [],
        "checked": {"claims": 7, "by_kind": {}}, "fell_back": True, "flagged": True,
        "flag_reason": "the model's draft failed verification after repair", "backend": "llamacpp"}})
    # the template delivered for a failed draft is itself verified, and says it is the template (it had read
    # "FLAGGED" in red for a fully supported report; session 39 probe)
    assert chain.verified and chain.status.startswith("VERIFIED (template report)") and "7 claim(s) checked" in chain.status
    claims = tll.report_view({"report": report, "verification": {
        "supported": False, "negation_conflicts": [{"text": "no mass effect", "reason": "findings say X"}]}})
    assert '- negation conflict: "no mass effect": findings say X' in claims.markdown
    none = tll.report_view({"report": report})
    assert not none.verified and "no verification" in none.status
    # the count of regions left out of the list goes under the regions, never a section of its own
    listed = tll.report_view({"report": {**report, "regions": ["right insular cortex"], "regions_not_listed": 3}})
    assert "- right insular cortex\n- and 3 more, each under 1 % of the lesion" in listed.markdown
    assert "not listed" not in listed.markdown.lower().replace("(listed in the findings)", "")
    zero = tll.report_view({"report": {**report, "regions": ["right insular cortex"], "regions_not_listed": 0}})
    assert "more, each under" not in zero.markdown and "Regions not listed" not in zero.markdown
    given = tll.report_view({"report": report, "markdown": "# R\n\ntext", "verification": {"supported": True}})
    assert given.markdown.startswith("> **VERIFIED")
    with pytest.raises(tll.ResponseError):
        tll.report_view({"verification": {}})


def test_probabilities_table():
    t = tll.probabilities_table({"glioma": 0.2, "no_tumor": 0.8})
    assert t.splitlines()[2] == "| no_tumor | 0.800 |"


def test_env_has_no_proxy_for_loopback(fake_server, monkeypatch):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # a dead proxy must not be used for loopback
    assert tll.MonaiLabelClient(fake_server, timeout=5).info()["name"] == "fake"
    assert os.environ["http_proxy"]


def test_train_endpoints(fake_server):
    c = tll.MonaiLabelClient(fake_server, timeout=5)
    assert c.train_start("segmentation", {"max_epochs": 1}) == {"started": "segmentation", "params": {"max_epochs": 1}}
    assert c.train_status() == {"status": "RUNNING"}
    assert c.train_stop() == {"stopped": True}
