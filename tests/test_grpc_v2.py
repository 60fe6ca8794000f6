"""The v2 gRPC layer end to end: a real grpc.aio server on a localhost port (its own event loop
in a background thread) serving a small numpy model, and the real synchronous client."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
from collections.abc import Coroutine, Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from mam.errors import InvalidPoseError, ModelLoadError
from service.grpc_v2 import grpc_predict_v2_pb2 as pb
from service.grpc_v2.client import V2Client, make_request
from service.grpc_v2.server import (
    ERROR_CODE_KEY,
    InferenceServicer,
    TensorSpec,
    start_server,
    stop_server,
)
from service.grpc_v2.tensors import (
    TensorError,
    encode,
    from_numpy,
    raw_to_numpy,
    to_numpy,
)

MAX_MESSAGE = 1 << 20  # 1 MiB: small, so the size limit is cheap to exceed
MAX_ELEMENTS = 200_000  # 800 kB of FP32: under the message limit, so both limits are testable
SECRET = "SECRET-infant-42 /data/private.mp4"


class SumModel:
    """Row sums (optionally scaled) and the row count: real arithmetic that assertions check."""

    name = "summer"
    version = "3"
    platform = "numpy"
    inputs = [("x", "FP32", [-1, -1]), TensorSpec("scale", "FP32", [1], optional=True)]
    outputs = [("sum", "FP32", [-1]), ("rows", "INT64", [1])]

    def __init__(self) -> None:
        self.ready = True

    def is_ready(self) -> bool:
        return self.ready

    async def infer(
        self, inputs: dict[str, np.ndarray], parameters: dict[str, Any]
    ) -> dict[str, np.ndarray]:
        fail = parameters.get("fail")
        if fail == "input":
            raise InvalidPoseError("pose contains non-finite values")
        if fail == "load":
            raise ModelLoadError(f"weights corrupt: {SECRET}")
        if fail == "boom":
            raise RuntimeError(SECRET)
        x = inputs["x"]
        scale = inputs["scale"][0] if "scale" in inputs else np.float32(1)
        return {
            "sum": (x.sum(axis=1, dtype=np.float32) * scale).astype(np.float32),
            "rows": np.array([x.shape[0]], dtype=np.int64),
        }


class LoopThread:
    """An asyncio loop in a daemon thread, so the blocking client can run in the test thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, loop: LoopThread, model: SumModel, port: int, calls: list) -> None:
        self.loop, self.model, self.port, self.calls = loop, model, port, calls
        self.client = V2Client(f"127.0.0.1:{port}", timeout=5.0)


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    loop, model, calls = LoopThread(), SumModel(), []
    servicer = InferenceServicer(
        model,
        server_name="mam-test",
        server_version="0.1.0",
        max_elements=MAX_ELEMENTS,
        observer=lambda method, code, seconds: calls.append((method, code, seconds)),
    )
    port = free_port()
    server = loop.run(start_server(servicer, "127.0.0.1", port, MAX_MESSAGE))
    s = Served(loop, model, port, calls)
    try:
        yield s
    finally:
        s.client.close()
        loop.run(stop_server(server, grace=0.5))
        loop.close()


def rpc_error(call: Any, *args: Any, **kwargs: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


def error_code(err: grpc.RpcError) -> str | None:
    return dict(err.trailing_metadata() or ()).get(ERROR_CODE_KEY)


X = np.array([[1.5, 2.25, -3.0], [0.125, 0.0, 10.0]], dtype=np.float32)


# --- tensors (no server) ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "array",
    [
        np.array([[1.0, -2.5]], dtype=np.float16),
        np.array([1e-300, 2.0], dtype=np.float64),
        np.array([[-(2**62), 7]], dtype=np.int64),
        np.array([-(2**31), 2**31 - 1], dtype=np.int32),
        np.array([[True, False, True]]),
        np.array([0, 255, 17], dtype=np.uint8),
        np.array([[]], dtype=np.float32).reshape(2, 0),
    ],
)
def test_raw_round_trip_is_exact(array: np.ndarray) -> None:
    datatype, shape, raw = encode(array)
    back = raw_to_numpy("t", datatype, shape, raw)
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_encode_is_little_endian_row_major() -> None:
    big = np.array([[1, 2], [3, 4]], dtype=">i4").T  # big-endian, column-major view
    datatype, shape, raw = encode(big)
    assert (datatype, shape) == ("INT32", [2, 2])
    assert raw == np.array([[1, 3], [2, 4]], dtype="<i4").tobytes()
    tensor, raw2 = from_numpy("out", big)
    assert (tensor.name, tensor.datatype, list(tensor.shape), raw2) == ("out", "INT32", [2, 2], raw)


@pytest.mark.parametrize(
    ("datatype", "shape", "raw", "match"),
    [
        ("FP32", [2, 3], b"\0" * 20, "20 bytes, expected 24"),
        ("FP32", [2, -3], b"", "negative dimension"),
        ("FP32", [2**40, 2**40], b"\0" * 4, "more than the limit"),
        ("BF16", [1], b"\0\0", "unsupported"),
        ("BOOL", [2], b"\x01\x02", "0 or 1"),
    ],
)
def test_raw_validation(datatype: str, shape: list[int], raw: bytes, match: str) -> None:
    with pytest.raises(TensorError, match=match) as info:
        raw_to_numpy("pose", datatype, shape, raw, max_elements=1000)
    assert "'pose'" in str(info.value)


def test_typed_contents_validation() -> None:
    t = pb.ModelInferRequest.InferInputTensor(name="a", datatype="INT8", shape=[2])
    t.contents.int_contents.extend([1, 300])
    with pytest.raises(TensorError, match="outside the INT8 range"):
        to_numpy(t, None)
    t = pb.ModelInferRequest.InferInputTensor(name="a", datatype="FP32", shape=[2])
    t.contents.fp64_contents.extend([1.0, 2.0])
    with pytest.raises(TensorError, match="fp32_contents"):
        to_numpy(t, None)
    t = pb.ModelInferRequest.InferInputTensor(name="a", datatype="FP32", shape=[2])
    t.contents.fp32_contents.extend([1.0, 2.0])
    with pytest.raises(TensorError, match="both"):
        to_numpy(t, b"\0" * 8)
    with pytest.raises(TensorError, match="no data"):
        to_numpy(pb.ModelInferRequest.InferInputTensor(name="a", datatype="FP32", shape=[1]), None)
    t = pb.ModelInferRequest.InferInputTensor(name="a", datatype="UINT8", shape=[3])
    t.contents.uint_contents.extend([0, 200, 255])
    out = to_numpy(t, None)
    assert out.dtype == np.uint8 and out.tolist() == [0, 200, 255]


# --- server and client --------------------------------------------------------------------------
def test_health_and_metadata(served: Served) -> None:
    c = served.client
    assert c.live() is True
    assert c.ready() is True
    assert c.model_ready("summer") is True
    meta = c.server_metadata()
    assert (meta.name, meta.version, list(meta.extensions)) == ("mam-test", "0.1.0", [])
    m = c.model_metadata("summer")
    assert (m.name, list(m.versions), m.platform) == ("summer", ["3"], "numpy")
    assert [(t.name, t.datatype, list(t.shape)) for t in m.inputs] == [
        ("x", "FP32", [-1, -1]),
        ("scale", "FP32", [1]),
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in m.outputs] == [
        ("sum", "FP32", [-1]),
        ("rows", "INT64", [1]),
    ]
    assert rpc_error(c.model_metadata, "nope").code() == grpc.StatusCode.NOT_FOUND


def test_metadata_names_the_digest_and_requests_may_pin_it(served: Served) -> None:
    c, digest = served.client, hashlib.sha256(b"weights").hexdigest()
    assert list(c.model_metadata("summer").versions) == ["3"]  # a model that names no digest
    served.model.digest = digest
    try:
        assert list(c.model_metadata("summer").versions) == ["3", digest]
        assert list(c.model_metadata("summer", version=digest).versions) == ["3", digest]
        assert c.model_ready("summer", version=digest) is True
        raw = c.infer_request(make_request("summer", {"x": X}, model_version=digest))
        assert raw.model_version == "3" and raw.outputs  # answered by the pinned weights
        other = hashlib.sha256(b"other weights").hexdigest()
        assert rpc_error(c.model_metadata, "summer", other).code() == grpc.StatusCode.NOT_FOUND
    finally:
        del served.model.digest


def test_not_ready_model(served: Served) -> None:
    served.model.ready = False
    try:
        assert served.client.ready() is False
        assert served.client.model_ready("summer") is False
        err = rpc_error(served.client.infer, "summer", {"x": X})
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert error_code(err) == "model_not_ready"
    finally:
        served.model.ready = True


def test_raw_round_trip_exact_values(served: Served) -> None:
    out = served.client.infer("summer", {"x": X}, metadata=[("authorization", "Bearer t0k")])
    assert set(out) == {"sum", "rows"}
    assert out["sum"].dtype == np.float32
    np.testing.assert_array_equal(out["sum"], np.array([0.75, 10.125], dtype=np.float32))
    assert out["rows"].tolist() == [2]
    scaled = served.client.infer("summer", {"x": X, "scale": np.array([2], dtype=np.float32)})
    np.testing.assert_array_equal(scaled["sum"], np.array([1.5, 20.25], dtype=np.float32))


def test_request_id_and_version_echoed(served: Served) -> None:
    request = make_request("summer", {"x": X}, model_version="3", request_id="req-7")
    response = served.client.infer_request(request)
    assert (response.id, response.model_name, response.model_version) == ("req-7", "summer", "3")
    wrong = make_request("summer", {"x": X}, model_version="9")
    err = rpc_error(served.client.infer_request, wrong)
    assert err.code() == grpc.StatusCode.NOT_FOUND and "version '9'" in err.details()


def test_typed_contents_input(served: Served) -> None:
    request = pb.ModelInferRequest(model_name="summer")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[2, 2])
    tensor.contents.fp32_contents.extend([1.0, 2.0, 3.0, 4.5])
    response = served.client.infer_request(request)
    names = [t.name for t in response.outputs]
    raw = dict(zip(names, response.raw_output_contents))
    assert not response.outputs[0].HasField("contents")  # responses are always raw
    assert np.frombuffer(raw["sum"], "<f4").tolist() == [3.0, 7.5]
    assert np.frombuffer(raw["rows"], "<i8").tolist() == [2]


def test_output_subset(served: Served) -> None:
    out = served.client.infer("summer", {"x": X}, outputs=["rows"])
    assert list(out) == ["rows"] and out["rows"].tolist() == [2]
    err = rpc_error(served.client.infer, "summer", {"x": X}, outputs=["rows", "mean"])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "mean" in err.details()


def test_wrong_byte_length_names_input(served: Served) -> None:
    request = make_request("summer", {"x": X})
    request.raw_input_contents[0] = request.raw_input_contents[0][:-4]
    err = rpc_error(served.client.infer_request, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("invalid_tensor: ")
    assert "'x'" in err.details() and "20 bytes, expected 24" in err.details()
    assert error_code(err) == "invalid_tensor"


def test_input_validation_against_metadata(served: Served) -> None:
    c = served.client
    cases = [
        ({"x": X.astype(np.float64)}, "datatype FP64, expected FP32"),
        ({"x": X[0]}, "does not match"),
        ({"x": X, "y": X}, "unknown input 'y'"),
        ({"scale": np.array([1], dtype=np.float32)}, "missing required input(s): x"),
        ({"x": np.zeros((250_000, 1), np.float32)}, "more than the limit 200000"),
    ]
    for inputs, expected in cases:
        err = rpc_error(c.infer, "summer", inputs)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, expected
        assert expected in err.details()
    hostile = make_request("summer", {"x": X})
    del hostile.inputs[0].shape[:]
    hostile.inputs[0].shape.extend([2**40, 2**40])
    err = rpc_error(c.infer_request, hostile)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit" in err.details()


def test_unknown_model(served: Served) -> None:
    err = rpc_error(served.client.infer, "other", {"x": X})
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert error_code(err) == "model_not_found" and "'other'" in err.details()


def test_model_error_with_code_is_invalid_argument(served: Served) -> None:
    err = rpc_error(served.client.infer, "summer", {"x": X}, parameters={"fail": "input"})
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "invalid_pose: pose contains non-finite values"
    assert error_code(err) == "invalid_pose"


def test_unexpected_errors_do_not_leak(served: Served) -> None:
    err = rpc_error(served.client.infer, "summer", {"x": X}, parameters={"fail": "boom"})
    assert err.code() == grpc.StatusCode.INTERNAL
    assert err.details() == "internal: internal error" and error_code(err) == "internal"
    err = rpc_error(served.client.infer, "summer", {"x": X}, parameters={"fail": "load"})
    assert err.code() == grpc.StatusCode.INTERNAL
    assert error_code(err) == "model_load_error"
    assert "SECRET" not in err.details() and "Traceback" not in err.details()


def test_message_over_limit_rejected(served: Served) -> None:
    big = {"x": np.zeros((300_000, 1), np.float32)}  # 1.2 MB > 1 MiB
    err = rpc_error(served.client.infer, "summer", big)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_observer_sees_every_outcome(served: Served) -> None:
    codes = {(method, code) for method, code, _ in served.calls}
    assert ("ModelInfer", "ok") in codes
    assert ("ModelInfer", "invalid_tensor") in codes
    assert ("ModelInfer", "model_not_found") in codes
    assert ("ModelMetadata", "model_not_found") in codes
    assert all(seconds >= 0 for _, _, seconds in served.calls)


def test_port_in_use_is_a_clear_error(served: Served) -> None:
    servicer = InferenceServicer(SumModel(), "dup", "0", max_elements=10)
    with pytest.raises(RuntimeError, match=f"cannot bind gRPC server to 127.0.0.1:{served.port}"):
        served.loop.run(start_server(servicer, "127.0.0.1", served.port, MAX_MESSAGE))


def test_valid_request_after_all_errors(served: Served) -> None:
    out = served.client.infer("summer", {"x": X})
    np.testing.assert_array_equal(out["sum"], np.array([0.75, 10.125], dtype=np.float32))
    assert out["rows"].tolist() == [2]


def test_generate_refuses_other_grpcio_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.grpc_v2 import generate

    monkeypatch.setattr(generate.metadata, "version", lambda _name: "1.66.0")
    with pytest.raises(SystemExit, match="1.62.x required"):
        generate.check_tools_version()
