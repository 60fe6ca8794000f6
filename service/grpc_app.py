"""The tensors-in model over KServe v2 gRPC, served beside REST from the same process.

BentoML cannot serve gRPC for new-style services, so ``Screening``'s start-up hook starts this
``grpc.aio`` server on its own port. ModelInfer calls ``Screening.score``, the same coroutine as
REST's ``/screen_instances``, so both protocols share one adaptive batcher.

Model ``mam``:
  inputs  ``instances`` FP32 ``[N, 240, 3, 17, 17]``; optional ``infant`` FP32 ``[1, 4]`` =
          sex (1 male, 0 female), gestational age (weeks), birth weight (g), corrected age (weeks)
  outputs ``normal_probability`` / ``risk_probability`` / ``fms_frequency`` FP32 ``[1]``,
          ``fms_probability`` / ``attention_weight`` FP32 ``[N]``, ``classification`` INT32
          ``[1]`` (0 normal, 1 risk, 2 indeterminate), ``probabilities_usable`` and
          ``in_domain`` BOOL ``[1]``, ``domain_score`` FP32 ``[1]`` (NaN: not scored). v2 has
          no enum type, and BYTES is not served here, so the label travels as its index in
          ``CLASSIFICATION_LABELS``; the reasons are REST's (``/screen_instances``).
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import logging
import time

import grpc
import numpy as np

import mam
from mam.audit import key_id
from mam.errors import InvalidInfantDataError
from mam.features import CLIP_FRAMES
from mam.schemas import InfantData
from service import errors as E
from service.admission import get_admission
from service.auth import KeyCheck, key_from_headers
from service.grpc_v2.server import (
    ERROR_CODE_KEY,
    InferenceServicer,
    TensorSpec,
    make_error_status,
    start_server,
)
from service.metrics import get_metrics
from service.settings import get_settings

logger = logging.getLogger("mam.service.grpc")

MODEL_NAME = "mam"
_CALL: contextvars.ContextVar[dict] = contextvars.ContextVar("mam_grpc_call")  # key id, start


def _audit():
    """The process's audit trail (the REST service's, ``service.app.AUDIT``)."""
    from service.app import AUDIT

    return AUDIT


CLASSIFICATION_LABELS = ("normal", "risk", "indeterminate")
# Health RPCs answer without a key, as /livez and /readyz do.
_OPEN_METHODS = frozenset({"ServerLive", "ServerReady", "ModelReady"})
_INSTANCE_BYTES = CLIP_FRAMES * 3 * 17 * 17 * 4


def _digest(x: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(x).data).hexdigest()


class V2Model:
    """``InferenceModel`` over ``Screening.score``."""

    name = MODEL_NAME
    platform = "onnxruntime"
    inputs = [
        TensorSpec("instances", "FP32", [-1, CLIP_FRAMES, 3, 17, 17]),
        TensorSpec("infant", "FP32", [1, 4], optional=True),
    ]
    outputs = [
        TensorSpec("normal_probability", "FP32", [1]),
        TensorSpec("risk_probability", "FP32", [1]),
        TensorSpec("fms_frequency", "FP32", [1]),
        TensorSpec("fms_probability", "FP32", [-1]),
        TensorSpec("attention_weight", "FP32", [-1]),
        TensorSpec("classification", "INT32", [1]),
        TensorSpec("probabilities_usable", "BOOL", [1]),
        TensorSpec("in_domain", "BOOL", [1]),
        TensorSpec("domain_score", "FP32", [1]),
    ]

    def __init__(self, screening) -> None:
        self.screening = screening
        self.version = screening.screener.meta.version
        self.digest = screening.screener.model_digest  # ModelMetadata's second version

    def is_ready(self) -> bool:
        return self.screening.__is_ready__()

    async def infer(self, inputs: dict[str, np.ndarray], parameters: dict) -> dict[str, np.ndarray]:
        infant = None
        if "infant" in inputs:
            v = np.asarray(inputs["infant"], np.float64).reshape(-1)
            if not np.isfinite(v).all() or v[0] not in (0.0, 1.0):
                raise InvalidInfantDataError(
                    "invalid infant data: 'infant' is [sex (1 male, 0 female), gestational age "
                    "weeks, birth weight g, corrected age weeks], all finite"
                )
            infant = InfantData.parse(
                sex="male" if v[0] == 1.0 else "female",
                gestational_age_weeks=float(v[1]),
                birth_weight_g=float(v[2]),
                corrected_age_weeks=float(v[3]),
            )
        call = _CALL.get({})
        digest = await asyncio.to_thread(_digest, inputs["instances"])
        outcome = "internal_error"
        try:
            with get_admission().enter():  # the same gate as REST's tensor requests
                r = await self.screening.score(inputs["instances"], infant)
            outcome = "ok"
        except TimeoutError:
            outcome = E.TIMEOUT
            raise E.ServiceError(E.TIMEOUT, "scoring took longer than the limit") from None
        except Exception as e:
            outcome = getattr(e, "code", outcome)
            raise
        finally:
            _audit().record(
                "screening_request", api_key_id=call.get("key_id", "none"), route="model_infer",
                protocol="grpc", content_sha256=digest, format="v2", outcome=outcome,
                duration_ms=(time.perf_counter() - call.get("t0", time.perf_counter())) * 1000,
            )  # fmt: skip
        f32 = np.float32
        return {
            "normal_probability": np.array([r.normal_probability], f32),
            "risk_probability": np.array([r.risk_probability], f32),
            "fms_frequency": np.array([r.fms_frequency], f32),
            "fms_probability": np.array(r.fms_probability, f32),
            "attention_weight": np.array(r.attention_weight, f32),
            "classification": np.array(
                [CLASSIFICATION_LABELS.index(r.classification.label)], np.int32
            ),
            "probabilities_usable": np.array([r.probabilities_usable]),
            "in_domain": np.array([r.domain.in_domain]),
            "domain_score": np.array([np.nan if r.domain.score is None else r.domain.score], f32),
        }


def _status(exc: Exception) -> grpc.StatusCode:
    code = getattr(exc, "code", None)
    return {
        E.OVERLOADED: grpc.StatusCode.UNAVAILABLE,
        E.TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    }.get(code) or _default_status(exc)


_default_status = make_error_status()


# The RPCs of the v2 protocol: the only method names that become metric labels.
_METHODS = frozenset(
    name for name in dir(InferenceServicer) if name[:1].isupper() and not name.startswith("_")
)


def method_label(full_method: str | bytes) -> str:
    """A metric label for a gRPC method path: its name when it is one of the protocol's RPCs,
    else ``other`` (the path is the client's choice: a label per path would be unbounded)."""
    if isinstance(full_method, bytes):
        full_method = full_method.decode("utf-8", "replace")
    name = full_method.rsplit("/", 1)[-1]
    return name if name in _METHODS else "other"


class _AuthAndMeter(grpc.aio.ServerInterceptor):
    """API key (``authorization: Bearer <key>`` metadata) and in-flight gauge for gRPC.

    The key is checked from the call's metadata before its message is read: a refused call is
    answered by a request-streaming handler that never reads the stream, so a keyless client
    cannot make the server receive or parse its message (grpc reads a unary request in full
    before its handler runs)."""

    def __init__(self, key_hashes: frozenset[str], auth_disabled: bool) -> None:
        self.keys = KeyCheck(key_hashes, auth_disabled)

    def _authorised(self, metadata) -> bool:
        return self.keys.allows({k.lower(): v for k, v in (metadata or ()) if isinstance(v, str)})

    async def intercept_service(self, continuation, details):
        method = method_label(details.method)
        if method in _OPEN_METHODS or self._authorised(details.invocation_metadata):
            handler = await continuation(details)
            if handler is None or handler.unary_unary is None:
                return handler
            inner = handler.unary_unary
            gauge = get_metrics().in_flight.labels(protocol="grpc")

            meta = {k.lower(): v for k, v in (details.invocation_metadata or ())
                    if isinstance(v, str)}  # fmt: skip
            key_ref = key_id(key_from_headers(meta), self.keys.disabled)

            async def metered(request, context):
                gauge.inc()
                token = _CALL.set({"key_id": key_ref, "t0": time.perf_counter()})
                try:
                    return await inner(request, context)
                finally:
                    _CALL.reset(token)
                    gauge.dec()

            return grpc.unary_unary_rpc_method_handler(
                metered,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )

        async def deny(request_iterator, context):  # the stream is never read
            get_metrics().observe_request(method, "grpc", E.UNAUTHORIZED)
            context.set_trailing_metadata(((ERROR_CODE_KEY, E.UNAUTHORIZED),))
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, f"{E.UNAUTHORIZED}: missing or invalid API key"
            )

        return grpc.stream_unary_rpc_method_handler(deny)


def _observe(method: str, code: str, seconds: float) -> None:
    get_metrics().observe_request(method, "grpc", code, seconds)


def max_message_bytes(s) -> int:
    """The largest message the server receives: ``MAM_MAX_INSTANCES`` instances, and no more
    than REST's upload limit (``MAM_MAX_UPLOAD_MB``), with 1 MiB for the framing."""
    return min(s.max_instances * _INSTANCE_BYTES, int(s.max_upload_mb * 2**20)) + 2**20


async def start_grpc(screening, host: str, port: int) -> grpc.aio.Server:
    s = get_settings()
    max_instances = s.max_instances
    servicer = InferenceServicer(
        V2Model(screening),
        server_name="mam",
        server_version=mam.__version__,
        max_elements=max_instances * _INSTANCE_BYTES // 4 + 4,
        error_status=_status,
        observer=_observe,
    )
    server = await start_server(
        servicer,
        host,
        port,
        max_message_bytes=max_message_bytes(s),
        interceptors=[_AuthAndMeter(s.key_hashes(), s.auth_disabled)],
    )
    logger.info("KServe v2 gRPC on %s:%d (model %r)", host, port, MODEL_NAME)
    return server


__all__ = ["V2Model", "start_grpc"]
