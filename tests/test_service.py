"""The REST service in-process (ASGI, BentoML's app with its lifespan): results equal the
library's, every failure is a typed envelope with the right status, and limits hold."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("bentoml")

from mam.schemas import InfantData  # noqa: E402
from mam.screening import Screener  # noqa: E402
from tests.media import write_video  # noqa: E402
from tests.service_helpers import (  # noqa: E402
    API_KEY,
    INFANT,
    in_process_service,
    multipart,
    npy_bytes,
    simulated,
)

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def client(tmp_path_factory, prometheus_dir):
    from starlette.testclient import TestClient

    tmp = tmp_path_factory.mktemp("svc")
    with in_process_service(tmp, prometheus_dir) as app_module:
        with TestClient(app_module.Screening.to_asgi()) as c:
            c.tmp = tmp
            yield c


@pytest.fixture(scope="module")
def library():
    return Screener()


@pytest.fixture(scope="module")
def sims():
    return {
        "continuous": simulated("continuous", 1),
        "absent": simulated("absent", 2),
    }


def post(client, path, field, data, ctype="application/octet-stream", infant=None, **kw):
    files, form = multipart(field, data, ctype, infant)
    return client.post(path, files=files, data=form, headers=kw.pop("headers", AUTH), **kw)


def error_of(r, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"]["code"] == code, body
    assert r.headers["x-mam-error-code"] == code
    assert body["error"]["request_id"] and "Decision support" in body["disclaimer"]
    return body["error"]


def test_health_and_metrics_need_no_key(client):
    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_instances_equal_library_and_follow_truth(client, library, sims):
    """Same numbers as the CLI's Screener; and learned behaviour survives the service path:
    an infant simulated with continuous FMs scores a higher FMs frequency than one without."""
    results = {}
    for cat, (_, _, tensors) in sims.items():
        r = post(client, "/screen_instances", "instances", npy_bytes(tensors), infant=INFANT)
        assert r.status_code == 200, r.text
        got = r.json()
        want = library.score_instances(tensors, InfantData(**INFANT))
        assert np.allclose(got["fms_probability"], want.fms_probability, atol=1e-4)
        assert abs(got["normal_probability"] - want.normal_probability) < 1e-4
        assert got["model"]["used_info_branch"] and "Decision support" in got["disclaimer"]
        results[cat] = got
    assert results["continuous"]["fms_frequency"] > results["absent"]["fms_frequency"] + 0.5
    assert results["continuous"]["risk_probability"] < results["absent"]["risk_probability"]


def test_pose_in_equals_library(client, library, sims):
    _, joints, _ = sims["absent"]
    r = post(client, "/screen_pose", "pose", npy_bytes(joints))
    assert r.status_code == 200, r.text
    got, want = r.json(), library.screen_pose(library_seq(joints))
    assert got["fms_frequency"] == want.fms_frequency
    assert got["risk_probability"] == pytest.approx(want.risk_probability, abs=1e-4)
    assert len(got["clips"]) == len(want.clips) and got["infant"] is None


def library_seq(joints):
    from mam.pose.precomputed import validate_pose_array

    return validate_pose_array(joints)


@pytest.mark.parametrize(
    "case, status, code",
    [
        ("no_key", 401, "unauthorized"),
        ("wrong_key", 401, "unauthorized"),
        ("json_body", 415, "unsupported_media_type"),
        ("not_npy", 400, "malformed_request"),
        ("pickle", 400, "malformed_request"),
        ("wrong_shape", 422, "invalid_tensor"),
        ("not_differences", 422, "invalid_tensor"),
        ("nan", 422, "invalid_tensor"),
        ("too_many", 422, "invalid_tensor"),
        ("partial_infant", 422, "invalid_infant_data"),
        ("absurd_infant", 422, "invalid_infant_data"),
        ("missing_field", 400, "malformed_request"),
        ("too_large", 413, "file_too_large"),
        ("unknown_route", 404, "not_found"),
    ],
)
def test_tensor_errors_are_typed_and_harmless(client, sims, case, status, code):
    good = sims["absent"][2][:2]
    x = {
        "wrong_shape": good[:, :, :, :, :16],
        "not_differences": np.abs(good) + 1.0,
        "nan": np.where(good == good.max(), np.nan, good),
        "too_many": np.repeat(good, 5, axis=0),  # 10 > MAM_MAX_INSTANCES=8
    }.get(case, good)
    body = npy_bytes(x)
    infant = {"partial_infant": {"sex": "male"}, "absurd_infant": INFANT | {"birth_weight_g": 9e9}}
    if case == "no_key":
        r = post(client, "/screen_instances", "instances", body, headers={})
    elif case == "wrong_key":
        r = post(client, "/screen_instances", "instances", body, headers={"x-api-key": "nope"})
    elif case == "json_body":
        r = client.post("/screen_instances", json={"instances": [1, 2]}, headers=AUTH)
    elif case == "not_npy":
        r = post(client, "/screen_instances", "instances", b"\x93NUMPY garbage")
    elif case == "pickle":
        import io

        buf = io.BytesIO()
        np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        r = post(client, "/screen_instances", "instances", buf.getvalue())
    elif case == "missing_field":
        r = post(client, "/screen_instances", "wrong_name", body)
    elif case == "too_large":
        r = post(client, "/screen_instances", "instances", os.urandom(17 * 2**20))
    elif case == "unknown_route":
        r = client.get("/nothing/here", headers=AUTH)
    else:
        r = post(client, "/screen_instances", "instances", body, infant=infant.get(case))
    err = error_of(r, status, code)
    if case == "absurd_infant":
        assert "birth_weight_g" in err["message"] and "9000000000" not in err["message"]
    # ...and the service is unharmed:
    ok = post(client, "/screen_instances", "instances", npy_bytes(good))
    assert ok.status_code == 200, ok.text


@pytest.fixture(scope="module")
def short_video(tmp_path_factory):
    from tests.media import moving_square_frames

    p = tmp_path_factory.mktemp("v") / "Patient_Name_2026.mp4"
    write_video(p, moving_square_frames(100), fps=25)
    return p


@pytest.mark.parametrize(
    "case, status, code",
    [
        ("not_a_video", 422, "not_a_video"),
        ("wrong_type", 415, "unsupported_media_type"),
        ("too_short", 422, "video_too_short"),
    ],
)
def test_video_errors_are_typed_and_leave_nothing(client, short_video, case, status, code):
    data = short_video.read_bytes() if case == "too_short" else b"not a video at all" * 100
    ctype = "text/plain" if case == "wrong_type" else "video/mp4"
    files = {"video": ("Patient_Name_2026.mp4", data, ctype)}
    r = client.post("/screen", files=files, headers=AUTH)
    err = error_of(r, status, code)
    assert "Patient_Name" not in r.text and str(client.tmp) not in err["message"]
    kept = [p for p in Path(client.tmp).rglob("*") if p.is_file() and data in p.read_bytes()]
    assert kept == [], kept


def test_a_recording_screened_by_the_service_equals_mam_screen(client, tmp_path):
    """The service's video route and ``mam screen`` take one path (``Screener.screen_video``,
    the demo's 60 s posed in parts on the parts executor): the same joints give the same
    clips, P(risk), FMs frequency, quality and domain scores."""
    import json
    import subprocess
    import sys

    demo = Path(__file__).resolve().parent.parent / "demo" / "infant_demo.mp4"
    infant = {"sex": "male", "gestational_age_weeks": 38.0, "birth_weight_g": 3100,
              "corrected_age_weeks": 13.0}  # fmt: skip
    cli = subprocess.run(
        [sys.executable, "-m", "mam", "screen", str(demo), "--format", "json", "-q",
         "--sex", "male", "--gestational-age-weeks", "38", "--birth-weight-g", "3100",
         "--corrected-age-weeks", "13"],
        capture_output=True, text=True, timeout=600, env=os.environ | {"TMPDIR": str(tmp_path)},
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr[-2000:]
    files = {"video": ("recording.mp4", demo.read_bytes(), "video/mp4")}
    r = client.post("/screen", files=files, data={"infant": json.dumps(infant)}, headers=AUTH)
    assert r.status_code == 200, r.text
    ours, theirs = r.json(), json.loads(cli.stdout)
    assert len(ours["clips"]) >= 10 and ours["quality"]["frames_total"] == 1500
    for key in ("clips", "risk_probability", "normal_probability", "fms_frequency",
                "fms_category", "classification", "domain", "quality", "warnings"):  # fmt: skip
        assert ours[key] == theirs[key], key
    assert ours["model"]["digest"] == theirs["model"]["digest"]
    assert ours["model"]["pose_backend"] == theirs["model"]["pose_backend"]


def test_metrics_count_by_endpoint_and_code_without_identifiers(client):
    text = client.get("/metrics").text
    assert 'mam_requests_total{code="ok",endpoint="screen_instances",protocol="rest"}' in text
    assert 'code="invalid_tensor",endpoint="screen_instances"' in text
    assert 'code="unauthorized"' in text
    assert "mam_batch_rows_bucket" in text and "mam_model_compute_seconds_bucket" in text
    assert 'mam_model_info{backend="onnxruntime"' in text
    assert "Patient_Name" not in text and "nothing/here" not in text
    assert 'endpoint="other"' in text  # unknown paths are one label, not the path


def test_model_endpoint_names_the_served_weights(client, library, sims):
    """GET /model is public (no health data) and names exactly the model results come from."""
    r = client.get("/model")  # no key
    assert r.status_code == 200, r.text
    doc = r.json()
    meta = library.meta
    assert (doc["name"], doc["version"], doc["digest"]) == (
        meta.name, meta.version, library.model_digest
    )  # fmt: skip
    assert doc["demo"] is True  # the shipped weights
    assert "data_digests" not in doc["provenance"] and doc["provenance"]["summary"]
    assert doc["training_data"]["declared"] == "simulated"
    assert doc["intended_use"]["source"] == "model card" and doc["model_card"] is True
    got = post(client, "/screen_instances", "instances", npy_bytes(sims["absent"][2][:2])).json()
    assert got["model"]["digest"] == doc["digest"]
    assert client.post("/model").status_code == 405
    from service.app import AUDIT

    assert AUDIT.model["model_digest"] == doc["digest"]  # every audit line names the model


def test_batch_through_the_service_keys_its_ledger_by_the_service_digest(client, library):
    from mam.batch.runner import _run_model
    from mam.batch.service_client import ServiceClient

    svc = ServiceClient("http://testserver", retries=0)
    svc.http.close()
    svc.http = client  # the in-process service (an httpx client)
    assert svc.model()["digest"] == library.model_digest
    key, ident = _run_model(None, svc)
    assert key == library.model_digest and ident["name"] == library.meta.name


def test_openapi_documents_the_typed_api(client):
    spec = client.get("/docs.json").json()
    for path in ("/screen", "/screen/submit", "/screen_pose", "/screen_instances"):
        assert path in spec["paths"], sorted(spec["paths"])
    schemas = " ".join(spec["components"]["schemas"])  # BentoML suffixes IODescriptor
    for name in ("ScreeningResult", "InstancesResult", "InfantData", "Quality", "TaskProgress"):
        assert name in schemas


def test_overload_is_503_timeout_is_504_and_both_are_harmless(client, sims, monkeypatch):
    """Load shedding and deadlines, made deterministic by holding the pose stage on a gate."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import mam.screening as screening
    import service.app as app
    from mam.errors import NoInfantDetectedError

    gate = threading.Event()

    def held_pose(*args, **kwargs):
        gate.wait(60)
        raise NoInfantDetectedError("no person was found in any frame")

    monkeypatch.setattr(screening, "estimate_video_pose", held_pose)  # inside screen_video
    monkeypatch.setattr(app.S, "video_queue", 0)
    files = {"video": ("v.mp4", b"\x00" * 1000, "video/mp4")}

    def running() -> float:
        text = client.get("/metrics").text
        line = [x for x in text.splitlines() if x.startswith('mam_video_jobs{state="running"}')]
        return float(line[0].split()[-1]) if line else 0.0

    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.post, "/screen", files=files, headers=AUTH)
        for _ in range(200):
            if running() >= 1:
                break
            threading.Event().wait(0.05)
        error_of(client.post("/screen", files=files, headers=AUTH), 503, "overloaded")
        gate.set()
        error_of(first.result(), 422, "no_infant_detected")

    gate.clear()
    monkeypatch.setattr(app.S, "request_timeout_s", 0.3)
    error_of(client.post("/screen", files=files, headers=AUTH), 504, "timeout")
    gate.set()  # the abandoned job ends; its slot comes back

    monkeypatch.setattr(app.S, "tensor_timeout_s", 1e-6)
    good = npy_bytes(sims["absent"][2][:2])
    error_of(post(client, "/screen_instances", "instances", good), 504, "timeout")
    monkeypatch.undo()
    assert post(client, "/screen_instances", "instances", good).status_code == 200
    text = client.get("/metrics").text
    assert 'mam_load_shed_total{endpoint="screen",protocol="rest"} 1.0' in text


def _hold_batcher(client, monkeypatch):
    """Make every clip-network call wait on a gate; returns it and a reader of the queue gauge."""
    import asyncio
    import threading

    from service.core import DataPlane

    gate = threading.Event()
    real_call = DataPlane._one_call

    async def held_call(self, chunk):
        await asyncio.to_thread(gate.wait, 60)
        return await real_call(self, chunk)

    def queued() -> float:
        text = client.get("/metrics").text
        line = [x for x in text.splitlines() if x.startswith("mam_queue_depth_rows ")]
        return float(line[0].split()[-1]) if line else 0.0

    monkeypatch.setattr(DataPlane, "_one_call", held_call)
    return gate, queued


def _wait_for(predicate) -> None:
    import threading

    for _ in range(200):
        if predicate():
            return
        threading.Event().wait(0.05)


def _shed(client, endpoint: str) -> float:
    key = f'mam_load_shed_total{{endpoint="{endpoint}",protocol="rest"}} '
    line = [x for x in client.get("/metrics").text.splitlines() if x.startswith(key)]
    return float(line[0].split()[-1]) if line else 0.0


def test_a_full_batcher_sheds_tensor_and_pose_requests_with_503(client, sims, monkeypatch):
    """Past MAM_MAX_QUEUED_INSTANCES waiting instances, new tensor and pose work is refused at
    once instead of queueing without bound; what was admitted still completes."""
    from concurrent.futures import ThreadPoolExecutor

    import service.app as app

    gate, queued = _hold_batcher(client, monkeypatch)
    monkeypatch.setattr(app.S, "max_queued_instances", 3)
    three = npy_bytes(sims["absent"][2][:3])
    before = _shed(client, "screen_instances")
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(post, client, "/screen_instances", "instances", three)
            _wait_for(lambda: queued() >= 3)
            # Validation comes first: a bad request is told what is wrong even when full.
            cut = post(client, "/screen_instances", "instances", three[:1000])
            error_of(cut, 400, "malformed_request")
            full = post(client, "/screen_instances", "instances", three)
            shed = error_of(full, 503, "overloaded")
            assert "queue is full" in shed["message"] and full.headers["retry-after"] == "1"
            pose = npy_bytes(np.zeros((300, 17, 3), np.float32))
            error_of(post(client, "/screen_pose", "pose", pose), 503, "overloaded")
            gate.set()
            assert first.result().status_code == 200
    finally:
        gate.set()  # never leave the held call waiting, whatever failed
    assert post(client, "/screen_instances", "instances", three).status_code == 200
    assert _shed(client, "screen_instances") == before + 1


def test_requests_beyond_the_admission_limit_are_refused_before_their_body(
    client, sims, monkeypatch
):
    """MAM_MAX_TENSOR_REQUESTS bounds tensor and pose requests in progress. The excess gets 503
    with Retry-After once its body has arrived, before it is parsed: a corrupt body is not even
    read as an array (503, not 400).
    Probes and video task routes are not counted."""
    from concurrent.futures import ThreadPoolExecutor

    from service.admission import get_admission

    gate, queued = _hold_batcher(client, monkeypatch)
    monkeypatch.setattr(get_admission(), "limit", 1)
    three = npy_bytes(sims["absent"][2][:3])
    before = _shed(client, "screen_instances")
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(post, client, "/screen_instances", "instances", three)
            _wait_for(lambda: queued() >= 3)
            r = post(client, "/screen_instances", "instances", three[:1000])
            assert "in progress" in error_of(r, 503, "overloaded")["message"]
            assert r.headers["retry-after"] == "1"
            pose = npy_bytes(np.zeros((300, 17, 3), np.float32))
            error_of(post(client, "/screen_pose", "pose", pose), 503, "overloaded")
            assert client.get("/readyz").status_code == 200
            assert (
                client.post("/screen/status", json={"task_id": "x"}, headers=AUTH).status_code
                != 503
            )
            gate.set()
            assert first.result().status_code == 200
    finally:
        gate.set()
    assert get_admission().active == 0
    assert post(client, "/screen_instances", "instances", three).status_code == 200
    assert _shed(client, "screen_instances") == before + 1


def test_a_pose_backend_that_cannot_run_stops_the_service_at_start(client, monkeypatch):
    """hrnet-videopose3d without the site's weights: the service refuses to start (model load
    error) instead of reporting ready and failing every recording."""
    import service.app as app
    from mam.errors import ModelLoadError

    monkeypatch.delenv("MAM_HRNET_WEIGHTS", raising=False)
    monkeypatch.setattr(app.S, "pose_backend", "hrnet-videopose3d")
    with pytest.raises(ModelLoadError, match="MAM_HRNET_WEIGHTS"):
        app.Screening.inner()


def _service_imports() -> dict[str, set[str]]:
    """``service`` module -> the ``service`` modules it imports (at any depth of its code)."""
    import ast

    root = Path(__file__).resolve().parent.parent
    graph: dict[str, set[str]] = {}
    for f in (root / "service").rglob("*.py"):
        name = ".".join(f.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        deps = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                mods = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            else:
                continue
            deps |= {m for m in mods if m.startswith("service.")}
        graph[name] = deps
    return {k: {d for d in v if d in graph and d != k} for k, v in graph.items()}


def test_the_service_has_no_import_cycle_and_thin_endpoints():
    """The protocol adapters sit over one data plane: no module of ``service`` imports back
    into one that imports it, and each REST endpoint is a few lines over the plane."""
    import ast
    import inspect
    import textwrap

    graph = _service_imports()
    assert "service.app" not in graph["service.grpc_app"] | graph["service.core"]

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for d in graph[todo.pop()] - seen:
                seen.add(d)
                todo.append(d)
        return seen

    cycles = [m for m in graph if m in reach(m)]
    assert not cycles, cycles

    from service.app import Screening

    cls = Screening.inner
    for name in ("screen", "progress_of", "screen_pose", "screen_instances"):
        source = textwrap.dedent(inspect.getsource(getattr(cls, name).func))
        fn = next(n for n in ast.parse(source).body if isinstance(n, ast.AsyncFunctionDef |
                                                                   ast.FunctionDef))  # fmt: skip
        body = fn.body[1:] if isinstance(fn.body[0], ast.Expr) else fn.body  # no docstring
        lines = body[-1].end_lineno - body[0].lineno + 1
        assert lines <= 15, (name, lines)


def test_screen_video_stops_at_the_first_frame_once_cancelled(library, tmp_path):
    """The hook the service's deadline and disconnect watch use: checked per frame, so a
    cancelled recording frees its thread instead of being posed to the end."""
    import threading

    from mam.screening import ScreeningCancelled
    from tests.media import moving_square_frames

    video = write_video(tmp_path / "v.mp4", moving_square_frames(260), fps=25)
    seen: list[int] = []
    flag = threading.Event()
    flag.set()
    with pytest.raises(ScreeningCancelled):
        library.screen_video(video, progress=lambda d, t: seen.append(d), cancelled=flag)
    assert seen == []  # stopped before the first frame was reported
    calls = iter(range(1000))
    with pytest.raises(ScreeningCancelled):  # a function works too: stops after three frames
        library.screen_video(video, progress=lambda d, t: seen.append(d),
                             cancelled=lambda: next(calls) >= 3)  # fmt: skip
    assert len(seen) == 3
