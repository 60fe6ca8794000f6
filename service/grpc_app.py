"""The tensors-in model over KServe v2 gRPC, served beside REST from the same process: an
adapter over ``service.core.DataPlane``.

BentoML cannot serve gRPC for new-style services, so ``Screening``'s start-up hook starts this
``grpc.aio`` server on its own port. ModelInfer runs ``core.V2Model`` (the model, its inputs
and outputs are described there), which scores through the same data plane as REST's
``/screen_instances`` and the v2 REST routes, so every protocol shares one adaptive batcher.
This module adds only what gRPC has of its own: the API key from the call's metadata, status
codes, and the metered calls.
"""

from __future__ import annotations

import logging
import time

import grpc

from mam.audit import key_id
from service import errors as E
from service.auth import KeyCheck, key_from_headers
from service.core import CALLER, CLASSIFICATION_LABELS, INSTANCE_BYTES, MODEL_NAME, V2Model
from service.grpc_v2.server import (
    ERROR_CODE_KEY,
    InferenceServicer,
    make_error_status,
    start_server,
)
from service.metrics import get_metrics
from service.settings import get_settings

logger = logging.getLogger("mam.service.grpc")

# Health RPCs answer without a key, as /livez and /readyz do.
_OPEN_METHODS = frozenset({"ServerLive", "ServerReady", "ModelReady"})


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
                token = CALLER.set(
                    {"key_id": key_ref, "t0": time.perf_counter(), "protocol": "grpc"}
                )
                try:
                    return await inner(request, context)
                finally:
                    CALLER.reset(token)
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
    return min(s.max_instances * INSTANCE_BYTES, int(s.max_upload_mb * 2**20)) + 2**20


async def start_grpc(plane, host: str, port: int) -> grpc.aio.Server:
    """The v2 gRPC server over ``plane`` (a ``service.core.DataPlane``), started."""
    s = get_settings()
    servicer = plane.v2_servicer(error_status=_status, observer=_observe)
    server = await start_server(
        servicer,
        host,
        port,
        max_message_bytes=max_message_bytes(s),
        interceptors=[_AuthAndMeter(s.key_hashes(), s.auth_disabled)],
    )
    logger.info("KServe v2 gRPC on %s:%d (model %r)", host, port, MODEL_NAME)
    return server


__all__ = ["CLASSIFICATION_LABELS", "V2Model", "max_message_bytes", "start_grpc"]
