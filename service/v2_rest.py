"""The KServe v2 / Open Inference Protocol over REST: a third adapter over the data plane.

``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/mam``,
``/v2/models/mam/ready`` and ``POST /v2/models/mam/infer``, with the binary tensor data
extension (``Inference-Header-Content-Length``: a JSON header, then the tensors' bytes), so the
stock HTTP clients of Triton and KServe, and a KServe InferenceGraph, can call the model. The
request becomes the gRPC ModelInfer message and goes through the same protocol checks
(``service.grpc_v2.server``) and ``core.V2Model`` as gRPC; only the framing is REST's.

An ASGI layer behind ``ServiceMiddleware``, which has already checked the API key (health
routes are open, as for gRPC), the body's size and deadline, and meters the routes. Errors are
the protocol's ``{"error": "<code>: <message>"}`` with the service's status for the code.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.responses import JSONResponse, Response

import mam
from mam.audit import key_id
from mam.errors import MamError
from service import core
from service import errors as E
from service.auth import key_from_headers
from service.grpc_v2 import grpc_predict_v2_pb2 as pb
from service.grpc_v2.server import Abort
from service.grpc_v2.tensors import DATATYPES, TensorError, element_count, raw_to_numpy

HEADER_LENGTH = "inference-header-content-length"
PREFIX = "/v2"
_MODEL = f"{PREFIX}/models/{core.MODEL_NAME}"
Param = bool | int | float | str


class RequestInput(BaseModel):
    """One input tensor of a v2 REST request (the spec's ``$request_input``)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Param] | None = None
    data: list[Any] | None = None


class RequestOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    parameters: dict[str, Param] | None = None


class InferenceRequest(BaseModel):
    """The JSON of ``POST /v2/models/{name}/infer`` (``$inference_request``)."""

    model_config = ConfigDict(extra="forbid")
    id: str | None = None
    parameters: dict[str, Param] | None = None
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


def error(exc: Exception, rid: str | None) -> Response:
    """The protocol's error body for a failure: the protocol's own (``Abort``, ``TensorError``)
    and the service's typed errors as they are, anything else logged and answered as
    ``internal_error`` (``core.typed_failure``)."""
    if not isinstance(exc, Abort | TensorError):
        exc = core.typed_failure(exc, rid, "v2 inference")
    if isinstance(exc, Abort | TensorError | MamError | E.ServiceError):
        return E.v2_error_response(exc.code, exc.message)
    return E.v2_error_response(E.INTERNAL, "unexpected server error; it has been logged")


def _to_message(body: bytes, header_length: str | None, max_elements: int):
    """A v2 REST request -> ``(ModelInferRequest, names of outputs wanted in binary)``. Every
    input becomes raw contents (JSON ``data`` converted after its element count is checked)."""
    n = len(body)
    if header_length is not None:
        if not (header_length.isascii() and header_length.isdigit()) or int(header_length) > n:
            raise E.ServiceError(E.MALFORMED, f"{HEADER_LENGTH} must be at most the body's length")
        n = int(header_length)
    try:
        req = InferenceRequest.model_validate_json(body[:n])
    except ValidationError as e:
        where = "; ".join(".".join(map(str, d["loc"])) + ": " + d["msg"] for d in e.errors()[:3])
        raise E.ServiceError(E.MALFORMED, f"malformed inference request: {where}") from None
    msg = pb.ModelInferRequest(model_name=core.MODEL_NAME, id=req.id or "")
    offset = n
    for t in req.inputs:
        msg.inputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        size = (t.parameters or {}).get("binary_data_size")
        if size is not None:
            if t.data is not None or type(size) is not int or not 0 <= size <= len(body):
                raise TensorError(f"tensor '{t.name}': binary_data_size and data do not agree")
            raw, offset = body[offset : offset + size], offset + size
            if len(raw) != size:
                raise TensorError(f"tensor '{t.name}': the body ends before its binary data")
        else:
            raw = _json_data(t, max_elements)
        msg.raw_input_contents.append(raw)
    if offset != len(body):
        raise E.ServiceError(E.MALFORMED, f"{len(body) - offset} bytes of binary data unused")
    all_binary = bool((req.parameters or {}).get("binary_data_output", False))
    binary = set()
    for o in req.outputs or ():
        msg.outputs.add(name=o.name)
        if (o.parameters or {}).get("binary_data", all_binary):
            binary.add(o.name)
    return msg, binary if req.outputs else (None if all_binary else set())


def _json_data(t: RequestInput, max_elements: int) -> bytes:
    """An input's JSON ``data`` (flat or nested, row-major) as little-endian bytes."""
    dtype = DATATYPES.get(t.datatype)
    if dtype is None:
        raise TensorError(f"tensor '{t.name}': datatype '{t.datatype}' unsupported")
    count = element_count(t.name, t.shape, max_elements)
    try:
        values = np.asarray(t.data if t.data is not None else [], dtype=dtype).reshape(-1)
    except (TypeError, ValueError):
        raise TensorError(f"tensor '{t.name}': data are not {t.datatype} values") from None
    if values.size != count:
        raise TensorError(f"tensor '{t.name}': {values.size} values for shape {t.shape}")
    return values.astype(dtype, copy=False).tobytes()


def _to_response(out: pb.ModelInferResponse, binary: set[str] | None) -> Response:
    """The ModelInferResponse as v2 REST: outputs in ``binary`` (None: all) as binary data
    after the JSON header, the others as JSON ``data`` (NaN as null)."""
    outputs, blobs = [], []
    for t, raw in zip(out.outputs, out.raw_output_contents):
        entry = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        if binary is None or t.name in binary:
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            values = raw_to_numpy(t.name, t.datatype, list(t.shape), raw).reshape(-1).tolist()
            entry["data"] = [None if isinstance(v, float) and math.isnan(v) else v for v in values]
        outputs.append(entry)
    head = {"model_name": out.model_name, "model_version": out.model_version, "outputs": outputs}
    if out.id:
        head["id"] = out.id
    text = json.dumps(head).encode()
    if not blobs:
        return Response(text, media_type="application/json")
    return Response(
        b"".join([text, *blobs]),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(text))},
    )


class V2Rest:
    """The v2 REST routes; every other path goes on to ``app``."""

    def __init__(self, app) -> None:
        self.app = app
        self._servicer = None

    def servicer(self, plane):
        if self._servicer is None or self._servicer.model is not plane.v2:
            self._servicer = plane.v2_servicer()
        return self._servicer

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path == PREFIX or path.startswith(PREFIX + "/")):
            return await self.app(scope, receive, send)
        plane = core.served()
        if plane is None:
            resp = E.v2_error_response(E.NOT_READY, "the model is still loading")
        else:
            resp = await self.route(scope, receive, plane, path, scope.get("method", "GET"))
        await resp(scope, receive, send)

    async def route(self, scope, receive, plane, path: str, method: str) -> Response:
        get = method in ("GET", "HEAD")
        if path == _MODEL + "/infer":
            if method == "POST":
                return await self.infer(scope, receive, plane)
            return E.v2_error_response(E.METHOD_NOT_ALLOWED, "POST only")
        ready = plane.is_ready()
        answers = {
            PREFIX: lambda: {
                "name": "mam",
                "version": mam.__version__,
                "extensions": ["binary_tensor_data"],
            },  # fmt: skip
            f"{PREFIX}/health/live": lambda: {"live": True},
            f"{PREFIX}/health/ready": lambda: {"ready": ready},
            f"{_MODEL}/ready": lambda: {"name": core.MODEL_NAME, "ready": ready},
            _MODEL: lambda: self.metadata(plane),
        }
        if path not in answers:
            return E.v2_error_response(E.NOT_FOUND, "no such endpoint")
        if not get:
            return E.v2_error_response(E.METHOD_NOT_ALLOWED, "GET only")
        status = 200 if ready or not path.endswith("ready") else 503
        return JSONResponse(answers[path](), status_code=status)

    def metadata(self, plane) -> dict:
        s = self.servicer(plane)
        tensors = lambda specs: [  # noqa: E731
            {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in specs
        ]
        return {"name": core.MODEL_NAME, "versions": s._versions(), "platform": s.model.platform,
                "inputs": tensors(s.inputs), "outputs": tensors(s.outputs)}  # fmt: skip

    async def infer(self, scope, receive, plane) -> Response:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", ())}  # fmt: skip
        rid = scope.get("state", {}).get("request_id")
        chunks = []
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return E.v2_error_response(E.CLIENT_CLOSED, "the client went away")
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        servicer = self.servicer(plane)
        caller = {"key_id": key_id(key_from_headers(headers), plane.s.auth_disabled),
                  "t0": time.perf_counter(), "protocol": "rest", "request_id": rid}  # fmt: skip
        token = core.CALLER.set(caller)
        try:
            request, binary = await asyncio.to_thread(
                _to_message, b"".join(chunks), headers.get(HEADER_LENGTH), servicer.max_elements
            )
            return _to_response(await servicer.infer_message(request), binary)
        except Exception as e:  # noqa: BLE001 - every failure becomes a typed answer
            return error(e, rid)
        finally:
            core.CALLER.reset(token)
