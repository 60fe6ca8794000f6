"""The service as deployed: a real ``bentoml serve`` process (both services, the shared batcher
between processes, the gRPC port, multi-process metrics), driven over the network."""

from __future__ import annotations

import concurrent.futures as cf
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("bentoml")
httpx = pytest.importorskip("httpx")
grpc = pytest.importorskip("grpc")

from tests.service_helpers import (  # noqa: E402
    API_KEY,
    INFANT,
    free_port,
    multipart,
    npy_bytes,
    server_env,
    serving,
    simulated,
)

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "demo" / "infant_demo.mp4"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
GRPC_AUTH = [("authorization", f"Bearer {API_KEY}")]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("served")
    grpc_port = free_port()
    env = server_env(tmp, grpc_port, BENTOML_RESULT_STORE=str(tmp / "tasks.db"))
    with serving(env, tmp / "server.log") as s:
        yield {"base": s.base, "grpc": f"127.0.0.1:{grpc_port}", "tmp": tmp}


@pytest.fixture(scope="module")
def bags():
    return {cat: simulated(cat, seed)[2] for cat, seed in (("continuous", 1), ("absent", 2))}


def rest_instances(base: str, tensors: np.ndarray, infant=INFANT, headers=AUTH):
    files, data = multipart("instances", npy_bytes(tensors), "application/octet-stream", infant)
    return httpx.post(base + "/screen_instances", files=files, data=data, headers=headers,
                      timeout=120)  # fmt: skip


def metric(text: str, name: str, **labels) -> float:
    """Sum of a metric's samples whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}(\{{[^}}]*\}})? ([0-9.e+-]+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


def test_rest_and_grpc_share_one_batcher_and_agree(server, bags):
    from service.grpc_v2.client import V2Client

    base = server["base"]
    before = httpx.get(base + "/metrics").text
    x = bags["absent"]
    infant_vec = np.array([[0.0, 39.0, 3300.0, 12.0]], np.float32)  # = INFANT
    with V2Client(server["grpc"], timeout=120) as client, cf.ThreadPoolExecutor(16) as pool:
        rest = [pool.submit(rest_instances, base, x) for _ in range(12)]
        grpc_calls = [
            pool.submit(
                client.infer, "mam", {"instances": x, "infant": infant_vec}, metadata=GRPC_AUTH
            )  # fmt: skip
            for _ in range(4)
        ]
        rest = [f.result() for f in rest]
        outs = [f.result() for f in grpc_calls]
    assert all(r.status_code == 200 for r in rest), [r.text for r in rest if r.status_code != 200]
    body = rest[0].json()
    for out in outs:  # both protocols give the same answer
        assert np.allclose(out["fms_probability"], body["fms_probability"], atol=1e-4)
        assert abs(float(out["risk_probability"][0]) - body["risk_probability"]) < 1e-4

    after = httpx.get(base + "/metrics").text
    batches = metric(after, "mam_batch_rows_count") - metric(before, "mam_batch_rows_count")
    rows = metric(after, "mam_batch_rows_sum") - metric(before, "mam_batch_rows_sum")
    assert rows == 16 * len(x)  # every instance went through the one batcher, once
    assert batches < 16, "concurrent calls of both protocols were never merged into one batch"
    assert metric(after, "mam_requests_total", protocol="grpc", endpoint="ModelInfer", code="ok")
    assert 'mam_model_info{backend="onnxruntime"' in after
    assert "bentoml_service_adaptive_batch_size_bucket" in after  # BentoML's own, beside ours
    assert metric(after, "mam_queue_wait_seconds_count") > 0


def test_grpc_health_metadata_auth_and_errors(server, bags):
    from service.grpc_v2.client import V2Client

    x = bags["continuous"][:2]
    with V2Client(server["grpc"], timeout=60) as c:
        assert c.live() and c.ready() and c.model_ready("mam")  # probes need no key
        meta = c.model_metadata("mam", metadata=GRPC_AUTH)
        assert [i.name for i in meta.inputs] == ["instances", "infant"]
        with pytest.raises(grpc.RpcError) as e:
            c.infer("mam", {"instances": x})
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            c.infer("mam", {"instances": np.abs(x) + 1}, metadata=GRPC_AUTH)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details().startswith("invalid_tensor")
        with pytest.raises(grpc.RpcError) as e:
            bad = np.array([[1.0, 39.0, 99999.0, 12.0]], np.float32)
            c.infer("mam", {"instances": x, "infant": bad}, metadata=GRPC_AUTH)
        assert e.value.details().startswith("invalid_infant_data")
        out = c.infer("mam", {"instances": x}, metadata=GRPC_AUTH)
        assert out["fms_probability"].shape == (2,)


def test_model_endpoint_and_v2_metadata_name_the_digest(server, bags):
    from mam.model.weights import load_meta
    from mam.screening import default_weights
    from service.grpc_v2.client import V2Client

    meta = load_meta(default_weights())[0]
    doc = httpx.get(server["base"] + "/model", timeout=30).json()  # public: no key
    assert (doc["name"], doc["digest"], doc["demo"]) == (meta.name, meta.digest, True)
    with V2Client(server["grpc"], timeout=60) as c:
        m = c.model_metadata("mam", metadata=GRPC_AUTH)
        assert list(m.versions) == [meta.version, meta.digest]
        out = c.infer("mam", {"instances": bags["absent"][:2]}, metadata=GRPC_AUTH)
        assert out["fms_probability"].shape == (2,)


def test_survives_every_bad_request(server, bags):
    base = server["base"]
    good = bags["absent"][:2]
    video = DEMO.read_bytes()

    def post(path, field, data, ctype, headers=AUTH, infant=None):
        files, form = multipart(field, data, ctype, infant)
        return httpx.post(base + path, files=files, data=form, headers=headers, timeout=120)

    cases = [
        (post("/screen_instances", "instances", npy_bytes(good), "x", headers={}), 401),
        (post("/screen_instances", "instances", b"junk", "application/octet-stream"), 400),
        (httpx.post(base + "/screen_instances", json={}, headers=AUTH), 415),
        (post("/screen", "video", video, "application/pdf"), 415),
        (post("/screen", "video", os.urandom(17 * 2**20), "video/mp4"), 413),
        (post("/screen", "video", video[: len(video) // 3], "video/mp4"), 422),
        (post("/screen", "video", b"\x00" * 5000, "video/mp4"), 422),
        (post("/screen_pose", "pose", npy_bytes(np.zeros((100, 17, 3))), "x"), 422),
        (
            post(
                "/screen_instances",
                "instances",
                npy_bytes(good),
                "x",
                infant=INFANT | {"gestational_age_weeks": 80},
            ),
            422,
        ),  # fmt: skip
        (httpx.post(base + "/screen/retry?task_id=abc", headers=AUTH), 409),
        # Found by a probe of the running service: coordinates around 1e30 overflowed inside the
        # network (500 internal_error); they are an invalid pose.
        (post("/screen_pose", "pose", npy_bytes(np.full((300, 17, 3), 1e30, np.float32)), "x"),
         422),
    ]  # fmt: skip
    for r, status in cases:
        assert r.status_code == status, r.text
        assert r.json()["error"]["code"] == r.headers["x-mam-error-code"]
    assert cases[-1][0].json()["error"]["code"] == "invalid_pose"
    # A motionless skeleton (the same pose in every frame) has no movement to assess: the
    # answer says so instead of a confident classification.
    still = np.repeat(simulated("continuous", 12)[1][:1], 300, axis=0)
    r = post("/screen_pose", "pose", npy_bytes(still), "x")
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["classification"]["label"] == "indeterminate" and not res["probabilities_usable"]
    assert any("no movement" in why for why in res["classification"]["reasons"])
    assert rest_instances(base, good).status_code == 200


def test_video_task_with_progress_keeps_nothing(server):
    base = server["base"]
    infant_json = '{"sex": "male", "gestational_age_weeks": 38, "birth_weight_g": 3100, ' \
                  '"corrected_age_weeks": 13}'  # fmt: skip
    files = {"video": ("Patient_Name_2026.mp4", DEMO.read_bytes(), "video/mp4")}
    r = httpx.post(base + "/screen/submit", files=files, data={"infant": infant_json},
                   headers=AUTH, timeout=60)  # fmt: skip
    assert r.status_code == 200, r.text
    task_id = r.json()["task_id"]
    fractions, deadline = [], time.monotonic() + 400
    while True:
        status = httpx.get(base + "/screen/status", params={"task_id": task_id}, headers=AUTH)
        p = httpx.post(base + "/screen/progress", json={"task_id": task_id}, headers=AUTH).json()
        fractions.append(p["fraction"])
        if status.json()["status"] in ("completed", "failed", "canceled"):
            break
        assert time.monotonic() < deadline, "task did not finish"
        time.sleep(1)
    assert status.json()["status"] == "completed", status.text
    assert any(0 < f < 1 for f in fractions), fractions  # progress was visible while posing
    res = httpx.get(base + "/screen/get", params={"task_id": task_id}, headers=AUTH).json()
    assert res["model"]["used_info_branch"] and res["model"]["runtime"] == "onnxruntime"
    assert res["quality"]["frames_total"] == 1500 and len(res["clips"]) >= 10
    assert "Decision support" in res["disclaimer"]

    # Nothing of the recording is kept: not in the temp folder, not in the task store.
    head = DEMO.read_bytes()[4096:8192]
    for f in Path(server["tmp"], "tmp").rglob("*"):
        assert not (f.is_file() and head in f.read_bytes()), f
    assert not (server["tmp"] / "tasks.db").exists()  # the task store lives in memory
    log = (server["tmp"] / "server.log").read_text()
    # The birth weight as a value of its own: random trace ids in hex can hold "3100" too.
    assert "Patient_Name" not in log and not re.search(r"\b3100\b", log)
    assert re.search(r"request_id=\w+ endpoint=screen_submit status=200", log)

    text = httpx.get(base + "/metrics").text
    assert metric(text, "mam_videos_total", outcome="ok") >= 1
    assert metric(text, "mam_video_seconds_total") >= 59
    assert metric(text, "mam_pose_frames_total") >= 1500


def test_bento_builds(tmp_path):
    """``bentoml build`` (the image recipe comes from the bento) works from a clean home."""
    env = os.environ | {"BENTOML_HOME": str(tmp_path), "BENTOML_DO_NOT_TRACK": "True"}
    r = subprocess.run([sys.executable, "-m", "bentoml", "build", str(REPO)], env=env,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    (bento,) = Path(tmp_path, "bentos", "mam").glob("*/bento.yaml")
    src = bento.parent / "src"
    for f in ("service/app.py", "models/mam_demo.clip.onnx", "mam/screening.py"):
        assert (src / f).is_file(), f
    assert not list(src.glob("tests")) and not list(src.glob("runs"))


def test_batch_through_the_service_matches_in_process(server, tmp_path):
    """``mam batch --service``: same rows as the in-process run, bad files typed, not fatal."""
    import csv

    from mam.batch import run_batch
    from mam.batch.service_client import ServiceClient
    from mam.synth.motion import simulate_infant

    archive = tmp_path / "archive"
    archive.mkdir()
    for seed in (5, 6):
        sim = simulate_infant(np.random.default_rng(seed), f"s{seed}", "absent", 20.0)
        np.save(archive / f"p{seed}.npy", sim.joints)
    (archive / "broken.mp4").write_bytes(b"not a video" * 100)

    client = ServiceClient(server["base"], api_key=API_KEY, backoff_s=0.1)
    try:
        run_batch(archive, tmp_path / "svc", workers=2, service=client)
    finally:
        client.close()
    run_batch(archive, tmp_path / "local", workers=1)

    def rows(d):
        with open(d / "results.csv", newline="") as f:
            return {r["path"]: r for r in csv.DictReader(f)}

    svc, local = rows(tmp_path / "svc"), rows(tmp_path / "local")
    assert svc.keys() == local.keys() == {"p5.npy", "p6.npy", "broken.mp4"}
    assert svc["broken.mp4"]["error_code"] == local["broken.mp4"]["error_code"] == "not_a_video"
    for p in ("p5.npy", "p6.npy"):
        assert svc[p]["error_code"] == "" and svc[p]["fms_category"] == local[p]["fms_category"]
        assert abs(float(svc[p]["risk_probability"]) - float(local[p]["risk_probability"])) < 1e-3

    with pytest.raises(ConnectionError):
        ServiceClient(f"http://127.0.0.1:{free_port()}").check()


def test_sigterm_to_mam_serve_drains_the_request_in_flight_then_everything_exits(tmp_path):
    """``mam serve`` becomes the server (exec): a SIGTERM to it (a rolling update, a supervisor)
    lets the recording in flight finish with its answer, then the server and all its workers
    exit and free the port. Before, ``subprocess.call`` left the server running; and BentoML
    stops ClipModel while the entry worker drains, which failed the request (500) until the
    clip network could run in the entry worker (``mam_clip_fallback_total``)."""
    import signal
    import socket

    from mam.video import iter_frames
    from tests.media import write_video

    clip = tmp_path / "demo15.mp4"  # 15 s of the demo: a few seconds of pose
    frames = list(iter_frames(DEMO, max_side=640, end_s=15.0))
    write_video(clip, iter(frames), size=(frames[0].shape[1], frames[0].shape[0]))
    env = dict(os.environ) | {"BENTOML_HOME": str(tmp_path / "home")}
    command = [sys.executable, "-m", "mam", "serve", "--no-auth", "--grpc-port", "0", "--port"]
    with serving(env, tmp_path / "serve.log", lambda port: [*command, str(port)]) as served:
        port, proc = served.port, served.proc
        with cf.ThreadPoolExecutor(1) as ex:
            files = {"video": ("clip.mp4", clip.read_bytes(), "video/mp4")}
            fut = ex.submit(httpx.post, served.base + "/screen", files=files, timeout=300)
            time.sleep(1.5)  # posing the recording
            proc.send_signal(signal.SIGTERM)  # to mam serve alone, not its process group
            r = fut.result()
        assert r.status_code == 200, r.text
        assert r.json()["quality"]["frames_total"] == 375
        assert proc.wait(60) == 0  # exited by itself: serving() has nothing left to stop
    with socket.socket() as s:  # nothing listens on the port any more
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # closed connections linger
        s.bind(("127.0.0.1", port))
    workers = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path / "home") not in workers and f"--port {port}" not in workers
