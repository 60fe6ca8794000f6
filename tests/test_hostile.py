"""Walk 6 (DESIGN: an attacker or a broken client) against one real ``bentoml serve``: hostile
requests over REST and gRPC get a typed 4xx in the error envelope, without internals, while
``/livez`` keeps answering within a second; slow bodies, disconnects and keyless gRPC messages
cost the service nothing; and after everything, and after shutdown, no file of the service holds
the key, the recording, its file name or the infant's data.
"""

from __future__ import annotations

import io
import json
import re
import socket
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("bentoml")
httpx = pytest.importorskip("httpx")
grpc = pytest.importorskip("grpc")
psutil = pytest.importorskip("psutil")

from service.process import ServerProcess  # noqa: E402
from tests.media import write_video  # noqa: E402
from tests.service_helpers import (  # noqa: E402
    API_KEY,
    free_port,
    npy_bytes,
    server_env,
    serving,
    simulated,
)

AUTH = {"Authorization": f"Bearer {API_KEY}"}
GRPC_AUTH = [("authorization", f"Bearer {API_KEY}")]
BODY_TIMEOUT_S = 3.0
MAX_UPLOAD_MB = 256  # large enough that a 200 MB gRPC message fits the receive limit
SECRET_NAME = "Patient_Jane_Doe_20260412"
INFANT = {"sex": "female", "gestational_age_weeks": 37.0, "birth_weight_g": 3217,
          "corrected_age_weeks": 12.0}  # fmt: skip
INTERNALS = re.compile(r"Traceback|File \"|\.py\b|/site-packages/|/tmp/|Errno|Exception")


class Hostile:
    """The served service (``ServerProcess``: ``base``, ``log()``, ``stop()``), its folder and gRPC
    port."""

    def __init__(self, served: ServerProcess, tmp: Path, grpc_port: int) -> None:
        self.served, self.tmp, self.grpc_port = served, tmp, grpc_port
        self.base, self.grpc = served.base, f"127.0.0.1:{grpc_port}"
        self.log, self.stop = served.log, served.stop

    def metrics(self) -> str:
        return httpx.get(self.base + "/metrics", timeout=10).text

    def grpc_worker(self) -> psutil.Process:
        """The worker process that owns the gRPC port (the Screening service)."""
        for p in psutil.Process(self.served.proc.pid).children(recursive=True):
            try:
                if any(c.laddr and c.laddr.port == self.grpc_port and c.status == "LISTEN"
                       for c in p.net_connections("tcp")):  # fmt: skip
                    return p
            except psutil.Error:
                continue
        raise AssertionError("no process listens on the gRPC port")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    grpc_port = free_port()
    env = server_env(
        tmp, grpc_port,
        MAM_MAX_UPLOAD_MB=str(MAX_UPLOAD_MB),
        MAM_MAX_INSTANCES="300",
        MAM_BODY_TIMEOUT_S=str(BODY_TIMEOUT_S),
        MAM_AUDIT_FILE=str(tmp / "audit.log"),
        BENTOML_RESULT_STORE=None,
    )  # fmt: skip
    with serving(env, tmp / "server.log") as served:
        yield Hostile(served, tmp, grpc_port)


@pytest.fixture(scope="module")
def bag():
    return simulated("absent", 2)[2]


# -- helpers -------------------------------------------------------------------------------------
def while_live(server: Hostile, fn):
    """``fn()`` in a thread while ``/livez`` is polled; every answer within 1 s. -> fn's result."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    slowest = 0.0
    with httpx.Client(base_url=server.base, timeout=5) as c:
        while t.is_alive():
            t0 = time.perf_counter()
            assert c.get("/livez").status_code == 200
            slowest = max(slowest, time.perf_counter() - t0)
            time.sleep(0.05)
    t.join()
    assert slowest < 1.0, f"/livez took {slowest:.2f} s during the hostile request"
    if "error" in out:
        raise out["error"]
    return out["value"]


def envelope(r, status: int, code: str) -> dict:
    assert r.status_code == status, r.text[:500]
    body = r.json()
    assert body["error"]["code"] == code and r.headers["x-mam-error-code"] == code, body
    assert body["error"]["request_id"] and "Decision support" in body["disclaimer"]
    assert not INTERNALS.search(r.text), r.text  # no traceback, module path or server path
    return body["error"]


def npy_header_only(shape, descr: str = "<f4", tail: int = 1024) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": descr, "fortran_order": False, "shape": tuple(shape)}
    )
    return buf.getvalue() + bytes(tail)


def npz_bomb(frames: int = 100_000) -> bytes:
    """An .npz whose 'joints' expand to ``frames`` x 17 x 3 float64 zeros (100k: 41 MB from
    about 40 KB)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("joints.npy", "w", force_zip64=True) as f:
            f.write(npy_header_only((frames, 17, 3), "<f8", tail=0))
            left, chunk = frames * 17 * 3 * 8, bytes(1 << 22)
            while left > 0:
                f.write(chunk[: min(left, len(chunk))])
                left -= len(chunk)
    return buf.getvalue()


def multipart_body(field: str, data: bytes, boundary: str = "XYZ", name: str = "f.npy") -> bytes:
    return (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )


def metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}(\{{[^}}]*\}})? ([0-9.e+-]+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


def short_video(tmp: Path, seconds: float = 11.0) -> bytes:
    return write_video(tmp / "v.mp4", int(seconds * 25)).read_bytes()


# -- REST: every hostile input a typed 4xx -------------------------------------------------------
def _cases(bag):
    one = npy_bytes(bag[:1])

    def instances(payload, **kw):
        files = {"instances": (kw.pop("name", "i.npy"), payload, "application/octet-stream")}
        return dict(method="POST", url="/screen_instances", files=files, **kw)

    def pose(data, name="p.npy"):
        files = {"pose": (name, data, "application/octet-stream")}
        return dict(method="POST", url="/screen_pose", files=files)

    def raw(ctype, content, url="/screen_instances"):
        return dict(method="POST", url=url, content=content, headers=AUTH | {"content-type": ctype})

    def chunked_over_limit():
        yield b'--XYZ\r\nContent-Disposition: form-data; name="pose"; filename="p.npy"\r\n\r\n'
        for _ in range(MAX_UPLOAD_MB + 2):
            yield bytes(1 << 20)

    deep = "[" * 30_000 + "]" * 30_000  # 60 KB: within the field limit, too deep for json
    return {
        "task_id_65_chars": (dict(method="GET", url="/screen/get?task_id=" + "a" * 65), 400,
                             "malformed_request"),
        "task_id_nul": (dict(method="GET", url="/screen/get?task_id=%00"), 400,
                        "malformed_request"),
        "task_id_unknown": (dict(method="GET", url="/screen/status?task_id=" + "0" * 32), 404,
                            "not_found"),
        "instances_1e37": (instances(npy_bytes((bag[:2] * 1e36).astype(np.float32))), 422,
                           "invalid_tensor"),
        "instances_header_claims_1e12": (instances(npy_header_only((10**12, 240, 3, 17, 17))),
                                         422, "invalid_tensor"),
        "instances_pickle": (instances(b"\x80\x04K\x01."), 400, "malformed_request"),
        "pose_header_claims_1e12_frames": (pose(npy_header_only((10**12, 17, 3))), 422,
                                           "invalid_pose"),
        "npz_decompression_bomb": (pose(npz_bomb(), "p.npz"), 422, "invalid_pose"),
        "infant_json_nested_deep": (instances(one, data={"infant": deep}), 400,
                                    "malformed_request"),
        "infant_json_nested_100k": (instances(one, data={"infant": "[" * 100_000}), 400,
                                    "malformed_request"),
        "multipart_without_boundary": (raw("multipart/form-data", multipart_body("instances",
                                       one)), 400, "malformed_request"),
        "multipart_other_boundary": (raw("multipart/form-data; boundary=ABC",
                                     multipart_body("instances", one)), 400, "malformed_request"),
        "chunked_upload_over_the_limit": (raw("multipart/form-data; boundary=XYZ",
                                          chunked_over_limit(), "/screen_pose"), 413,
                                          "file_too_large"),
        "json_to_a_multipart_route": (dict(method="POST", url="/screen_pose", json={}), 415,
                                      "unsupported_media_type"),
        "no_key": (dict(method="POST", url="/screen_instances", headers={}), 401,
                   "unauthorized"),
        "unknown_route": (dict(method="GET", url="/patients/42311968"), 404, "not_found"),
    }  # fmt: skip


CASES = [
    "task_id_65_chars", "task_id_nul", "task_id_unknown", "instances_1e37",
    "instances_header_claims_1e12", "instances_pickle", "pose_header_claims_1e12_frames",
    "npz_decompression_bomb", "infant_json_nested_deep", "infant_json_nested_100k",
    "multipart_without_boundary", "multipart_other_boundary", "chunked_upload_over_the_limit",
    "json_to_a_multipart_route", "no_key", "unknown_route",
]  # fmt: skip


@pytest.fixture(scope="module")
def cases(bag):
    return _cases(bag)


@pytest.mark.parametrize("case", CASES)
def test_rest_hostile_input_is_a_typed_4xx_and_livez_answers(server, cases, case):
    spec, status, code = cases[case]
    spec = dict(spec)
    headers = spec.pop("headers", AUTH)
    with httpx.Client(base_url=server.base, timeout=60) as c:
        r = while_live(server, lambda: c.request(headers=headers, **spec))
    envelope(r, status, code)


def test_odd_but_valid_requests_are_served(server, bag):
    """Not hostile after all: an upper-case media type, a 300-character or path-like file
    name. Served as any other (the names are never used)."""
    body = multipart_body("instances", npy_bytes(bag[:1]))
    for ctype in ("Multipart/Form-Data; boundary=XYZ", "multipart/form-data; boundary=XYZ"):
        r = httpx.post(server.base + "/screen_instances", content=body, timeout=60,
                       headers=AUTH | {"content-type": ctype})  # fmt: skip
        assert r.status_code == 200, r.text
    for name in ("x" * 300 + ".npy", "../../../etc/passwd", "a\x00b.npy"):
        files = {"instances": (name, npy_bytes(bag[:1]), "application/octet-stream")}
        r = httpx.post(server.base + "/screen_instances", files=files, headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text


def test_a_100mb_tensor_upload_does_not_stall_livez(server, bag):
    """A legitimate large request: receiving, parsing, loading and validating it all happen off
    the event loop, so the probes keep answering."""
    x = np.concatenate([bag] * (120 // len(bag) + 1))[:120]  # 120 instances, 100 MB
    files = {"instances": ("i.npy", npy_bytes(x), "application/octet-stream")}
    r = while_live(server, lambda: httpx.post(server.base + "/screen_instances", files=files,
                                              headers=AUTH, timeout=120))  # fmt: skip
    assert r.status_code == 200, r.text
    assert len(r.json()["fms_probability"]) == 120


def test_a_truncated_mp4_index_is_corrupt_video(server, tmp_path):
    full = write_video(tmp_path / "fs.mp4", 275, container_options={"movflags": "faststart"})
    data = full.read_bytes()
    files = {"video": ("r.mp4", data[: data.find(b"moov") + 20], "video/mp4")}
    r = while_live(server, lambda: httpx.post(server.base + "/screen", files=files,
                                              headers=AUTH, timeout=60))  # fmt: skip
    envelope(r, 422, "corrupt_video")


def test_access_log_escapes_control_characters(server):
    r = httpx.get(server.base + "/x%0aFORGED-LINE%0d%0aALSO-FORGED")
    envelope(r, 401, "unauthorized")
    time.sleep(0.3)
    lines = server.log().splitlines()
    assert not [x for x in lines if x.startswith(("FORGED-LINE", "ALSO-FORGED"))]
    assert any("FORGED-LINE" in x for x in lines)  # the request is logged, on one line


def test_client_errors_are_not_logged_as_errors(server, bag):
    before = len(server.log().splitlines())
    r = httpx.post(server.base + "/screen_instances", timeout=30,
                   content=multipart_body("instances", npy_bytes(bag[:1])),
                   headers=AUTH | {"content-type": "multipart/form-data"})  # fmt: skip
    envelope(r, 400, "malformed_request")
    time.sleep(0.3)
    new = server.log().splitlines()[before:]
    assert new and not [x for x in new if "[ERROR]" in x], new


# -- slow bodies, disconnects ----------------------------------------------------------------------
def _slow_socket(server: Hostile, path: str = "/screen_instances") -> socket.socket:
    port = int(server.base.rsplit(":", 1)[1])
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
        "Content-Type: multipart/form-data; boundary=XYZ\r\nContent-Length: 100000\r\n\r\n"
        "--XYZ\r\n".encode()
    )
    return s


def test_slow_bodies_do_not_stop_a_normal_tensor_request(server, bag):
    """16 clients sending a byte a second (MAM_MAX_TENSOR_REQUESTS is 16) hold no admission
    slot: a normal request is served meanwhile; the slow ones get 408 at the body deadline."""
    slow = [_slow_socket(server) for _ in range(16)]
    stop = threading.Event()

    def drip():
        while not stop.is_set():
            for s in slow:
                try:
                    s.sendall(b"a")
                except OSError:
                    pass
            stop.wait(1.0)

    dripper = threading.Thread(target=drip)
    dripper.start()
    try:
        time.sleep(1.0)
        files = {"instances": ("i.npy", npy_bytes(bag), "application/octet-stream")}
        t0 = time.perf_counter()
        r = while_live(
            server,
            lambda: httpx.post(
                server.base + "/screen_instances", files=files, headers=AUTH, timeout=30
            ),
        )
        assert r.status_code == 200, r.text
        assert time.perf_counter() - t0 < BODY_TIMEOUT_S  # not after the slow ones gave up
        slow[0].settimeout(BODY_TIMEOUT_S + 5)
        answer = slow[0].recv(4096).decode("latin-1")
    finally:
        stop.set()
        dripper.join()
        for s in slow:
            s.close()
    assert answer.startswith("HTTP/1.1 408") and "body_timeout" in answer, answer[:300]


def test_a_client_disconnect_is_not_an_internal_error(server):
    before = server.metrics()
    s = _slow_socket(server)
    s.sendall(b"a" * 1000)
    time.sleep(0.3)
    s.close()
    time.sleep(1.0)
    after = server.metrics()
    labels = {"endpoint": "screen_instances", "protocol": "rest"}
    internal = metric(after, "mam_requests_total", code="internal_error", **labels)
    assert internal == metric(before, "mam_requests_total", code="internal_error", **labels)
    closed = metric(after, "mam_requests_total", code="client_closed_request", **labels)
    assert closed == metric(before, "mam_requests_total", code="client_closed_request",
                            **labels) + 1  # fmt: skip


def test_an_abandoned_recording_is_cancelled(server, tmp_path):
    """A client that disconnects while its recording is posed frees the video slot."""
    data = short_video(tmp_path, 40.0)
    port = int(server.base.rsplit(":", 1)[1])
    boundary = "B0UND"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="video"; filename="r.mp4"'
            "\r\nContent-Type: video/mp4\r\n\r\n").encode() + data + \
        f"\r\n--{boundary}--\r\n".encode()  # fmt: skip
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(
        f"POST /screen HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    deadline = time.monotonic() + 30
    while metric(server.metrics(), "mam_video_jobs", state="running") < 1:
        assert time.monotonic() < deadline, "the recording never started"
        time.sleep(0.2)
    s.close()
    t0 = time.monotonic()
    while metric(server.metrics(), "mam_video_jobs", state="running") > 0:
        assert time.monotonic() - t0 < 10, "the abandoned recording kept its slot"
        time.sleep(0.2)
    assert "client disconnected; cancelling its recording" in server.log()


# -- gRPC ----------------------------------------------------------------------------------------
def _stub(server: Hostile):
    from service.grpc_v2 import grpc_predict_v2_pb2_grpc as pbg

    channel = grpc.insecure_channel(server.grpc, options=[("grpc.max_send_message_length", -1)])
    return channel, pbg.GRPCInferenceServiceStub(channel)


def _grpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call()
    details = e.value.details() or ""
    assert not INTERNALS.search(details), details
    return e.value


def _code_of(err: grpc.RpcError) -> str | None:
    return dict(err.trailing_metadata() or ()).get("mam-error-code")


def test_keyless_grpc_200mb_is_refused_before_it_is_read(server):
    from service.grpc_v2 import grpc_predict_v2_pb2 as pb

    worker = server.grpc_worker()
    tensor = pb.ModelInferRequest.InferInputTensor(name="instances", datatype="FP32",
                                                   shape=[252, 240, 3, 17, 17])  # fmt: skip
    request = pb.ModelInferRequest(model_name="mam", inputs=[tensor],
                                   raw_input_contents=[bytes(200 * 2**20)])  # fmt: skip
    rss0, peak, done = worker.memory_info().rss, [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], worker.memory_info().rss)
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    channel, stub = _stub(server)
    try:
        err = while_live(server, lambda: _grpc_error(lambda: stub.ModelInfer(request, timeout=60)))
    finally:
        time.sleep(0.3)
        done.set()
        watcher.join()
        channel.close()
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and _code_of(err) == "unauthorized"
    assert (peak[0] - rss0) / 2**20 < 50, f"worker grew {(peak[0] - rss0) / 2**20:.0f} MB"


def test_grpc_hostile_calls_are_typed(server, bag):
    from service.grpc_v2 import grpc_predict_v2_pb2 as pb

    channel, stub = _stub(server)

    def infer(x: np.ndarray, shape=None, metadata=GRPC_AUTH):
        t = pb.ModelInferRequest.InferInputTensor(name="instances", datatype="FP32",
                                                  shape=shape or list(x.shape))  # fmt: skip
        req = pb.ModelInferRequest(
            model_name="mam", inputs=[t], raw_input_contents=[np.ascontiguousarray(x).tobytes()]
        )
        return lambda: stub.ModelInfer(req, metadata=metadata, timeout=60)

    try:
        err = _grpc_error(infer((bag[:2] * 1e36).astype(np.float32)))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _code_of(err) == "invalid_tensor"
        err = _grpc_error(infer(bag[:2].astype(np.float32), shape=[2, 240, 3, 17, 16]))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        err = _grpc_error(infer(bag[:1], metadata=[("authorization", "Bearer wrong")]))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        # A client-chosen method name: refused, and never a metric label.
        err = _grpc_error(lambda: channel.unary_unary("/Patient_42311968/Get")(b"", timeout=5))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        err = _grpc_error(lambda: channel.unary_unary("/Patient_42311968/Get")(
            b"", metadata=GRPC_AUTH, timeout=5))  # fmt: skip
        assert err.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        channel.close()
    text = server.metrics()
    assert "Patient_42311968" not in text
    assert metric(text, "mam_requests_total", protocol="grpc", endpoint="other",
                  code="unauthorized") >= 1  # fmt: skip


def test_grpc_listens_on_loopback_by_default():
    from service.settings import Settings

    assert Settings(_env_file=None).grpc_host == "127.0.0.1"


# -- nothing kept --------------------------------------------------------------------------------
def test_zz_no_key_recording_name_or_infant_data_left_in_any_file(server, tmp_path):
    """Runs last in this module (it stops the server). Tasks that succeed at the service's
    level, fail in BentoML's validation (before the handler), and fail in the pipeline; then
    every file the service wrote, during and after shutdown, is searched."""
    video = short_video(tmp_path)
    infant = json.dumps(INFANT)
    files = {"video": (SECRET_NAME + ".mp4", video, "video/mp4")}
    with httpx.Client(base_url=server.base, headers=AUTH, timeout=60) as c:
        task = c.post("/screen/submit", files=files, data={"infant": infant})
        assert task.status_code == 200, task.text
        # BentoML validates a task's input when it runs: this one fails before the handler.
        bad_infant = json.dumps(INFANT | {"sex": "unknown"})
        failing = c.post("/screen/submit", files=files, data={"infant": bad_infant})
        assert failing.status_code == 200, failing.text
        r = c.post("/screen", files={"video": (SECRET_NAME + ".mp4", video[:5000], "video/mp4")},
                   data={"infant": infant})  # fmt: skip
        assert r.status_code == 422, r.text
        states = {}
        for t in (task, failing):
            task_id, deadline = t.json()["task_id"], time.monotonic() + 120
            while (
                state := c.get("/screen/status", params={"task_id": task_id}).json()["status"]
            ) in ("in_progress", "pending"):
                assert time.monotonic() < deadline
                time.sleep(0.5)
            states[t is task] = state
            assert c.get("/screen/get", params={"task_id": task_id}).status_code in (200, 400, 422)
        assert states[False] == "failed"
    prometheus = [p for p in (server.tmp / "tmp").glob("mam-prometheus-*")]
    assert len(prometheus) == 1  # the instance's own metrics folder, under its TMPDIR
    server.stop()

    secrets = [API_KEY.encode(), SECRET_NAME.encode(), video[3000:3064], b"gestational_age"]
    found = []
    for f in server.tmp.rglob("*"):
        if f.is_file() and not f.is_symlink():
            data = f.read_bytes()
            found += [(f.name, s[:20]) for s in secrets if s in data]
            if re.search(rb"\b3217\b", data):
                found.append((f.name, b"birth weight"))
    assert not found, found
    leftovers = [p.name for p in server.tmp.rglob("*") if p.name.startswith(("mam-tasks-",
                 "mam-prometheus-", "task_result.db"))]  # fmt: skip
    assert not leftovers, leftovers


# -- header checks of uploaded arrays (service.uploads), without a server --------------------------
def test_pose_headers_are_checked_before_loading(tmp_path):
    from mam.errors import InvalidPoseError
    from service.uploads import check_pose_file

    def npz(path, **arrays):
        np.savez_compressed(path, **arrays)
        return path

    ok = npz(tmp_path / "ok.npz", joints=np.zeros((300, 17, 3)), confidence=np.ones((300, 17)),
             fps=np.array(25.0))  # fmt: skip
    check_pose_file(ok, max_frames=300)
    with pytest.raises(InvalidPoseError, match="at most 299 frames"):
        check_pose_file(ok, max_frames=299)
    many = npz(tmp_path / "many.npz", **{f"a{i}": np.zeros(1) for i in range(9)})
    with pytest.raises(InvalidPoseError, match="at most 8 arrays"):
        check_pose_file(many, max_frames=300)
    # A member whose header lies: small in the zip directory, huge by its own header.
    liar = tmp_path / "liar.npz"
    with zipfile.ZipFile(liar, "w") as z:
        z.writestr("joints.npy", npy_header_only((10**9, 17, 3), "<f8", tail=64))
    with pytest.raises(InvalidPoseError, match="frames"):
        check_pose_file(liar, max_frames=300)
    with zipfile.ZipFile(liar, "w") as z:
        z.writestr("confidence.npy", npy_header_only((10**9,), "<f8", tail=64))
    with pytest.raises(InvalidPoseError, match="declares"):
        check_pose_file(liar, max_frames=300)
    objects = tmp_path / "objects.npy"
    np.save(objects, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InvalidPoseError, match="not a readable"):
        check_pose_file(objects, max_frames=300)


def test_instance_headers_are_checked_before_loading(tmp_path):
    from mam.errors import InvalidTensorError
    from service.errors import ServiceError
    from service.uploads import check_instances_file

    f = tmp_path / "i.npy"
    f.write_bytes(npy_header_only((3, 240, 3, 17, 17)))
    check_instances_file(f, max_instances=3)
    for shape, dtype, match in (((4, 240, 3, 17, 17), "<f4", "1 to 3"),
                                ((3, 240, 3, 17), "<f4", "shape"),
                                ((3, 240, 3, 17, 17), "<i4", "dtype")):  # fmt: skip
        f.write_bytes(npy_header_only(shape, dtype))
        with pytest.raises(InvalidTensorError, match=match):
            check_instances_file(f, max_instances=3)
    f.write_bytes(b"PK\x03\x04 not an npy")
    with pytest.raises(ServiceError):
        check_instances_file(f, max_instances=3)


# -- the README says what the tests assert -------------------------------------------------------
def _readme_service_section() -> str:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = text.index("## The screening service")
    return text[start : text.index("\n## ", start + 10)]


def test_readme_error_table_matches_the_service(bag):
    from service import errors as E

    rows = re.findall(r"^\| (\d{3}) \| (.+?) \|", _readme_service_section(), re.M)
    table = {}
    for status, codes in rows:
        for code in re.findall(r"`([a-z_]+)`", codes):
            table[code] = int(status)
    service_codes = [E.MALFORMED, E.UNAUTHORIZED, E.NOT_FOUND, E.BODY_TIMEOUT,
                     E.TASK_RETRY_DISABLED, E.TOO_LARGE, E.UNSUPPORTED_MEDIA_TYPE, E.OVERLOADED,
                     E.TIMEOUT, E.INTERNAL]  # fmt: skip
    for code in service_codes:
        assert table.get(code) == E.http_status(code), code
    for case, (_, status, code) in _cases(bag).items():  # what the hostile tests assert
        assert table.get(code) == status, (case, code, status)
    (row_422,) = re.findall(r"^\| 422 \|.*$", _readme_service_section(), re.M)
    assert "a truncated mp4 index is `corrupt_video`" in row_422


def test_readme_setting_defaults_match_the_settings():
    from service.settings import Settings

    fields = Settings.model_fields
    found = re.findall(r"`MAM_([A-Z_]+)` \((\d+(?:\.\d+)?)[,)]", _readme_service_section())
    assert len(found) >= 6
    for name, value in found:
        default = fields[name.lower()].get_default(call_default_factory=True)
        assert float(default) == float(value), (name, default, value)
    assert "`MAM_GRPC_HOST` (127.0.0.1" in _readme_service_section()
