"""A grpc.aio servicer of the v2 / Open Inference Protocol for one model.

The servicer owns the protocol: it checks the model name and version, decodes and validates the
input tensors against the model's metadata before the model sees them, and turns every failure
into a gRPC status whose details read ``"<code>: <message>"``, with the code also in the trailing
metadata key ``mam-error-code`` so clients can branch on it without parsing text. Unexpected
exceptions become INTERNAL with a generic message: tracebacks are logged here, never returned.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import Any, NamedTuple, Protocol, TypeVar

import grpc
import numpy as np

from mam.errors import InputError
from service.grpc_v2 import grpc_predict_v2_pb2 as pb
from service.grpc_v2 import grpc_predict_v2_pb2_grpc as pb_grpc
from service.grpc_v2.tensors import DATATYPES, TensorError, from_numpy, to_numpy

logger = logging.getLogger(__name__)

ERROR_CODE_KEY = "mam-error-code"
INTERNAL_CODE = "internal"
_GENERIC_MESSAGE = "internal error"

ParamValue = bool | int | str
Observer = Callable[[str, str, float], None]
ErrorStatus = Callable[[Exception], grpc.StatusCode]
_Resp = TypeVar("_Resp")


class TensorSpec(NamedTuple):
    """Metadata of one model input or output. ``-1`` marks a variable dimension.

    A plain ``(name, datatype, shape)`` tuple is accepted too; an input is optional only when
    declared with a fourth element ``True`` (``TensorSpec(..., optional=True)``).
    """

    name: str
    datatype: str
    shape: Sequence[int]
    optional: bool = False


class InferenceModel(Protocol):
    """What the servicer serves; ``inputs``/``outputs`` are read once, at servicer build."""

    name: str
    version: str
    platform: str
    # A model may also have ``digest`` (str): the content digest of its weights, which the
    # metadata list as a second version, so that a client can pin exactly the weights it
    # validated (a Protocol cannot declare an optional attribute).
    inputs: Sequence[TensorSpec | tuple[Any, ...]]
    outputs: Sequence[TensorSpec | tuple[Any, ...]]

    def is_ready(self) -> bool: ...

    async def infer(
        self, inputs: dict[str, np.ndarray], parameters: dict[str, ParamValue]
    ) -> dict[str, np.ndarray]:
        """May raise exceptions carrying a string ``.code`` (e.g. :class:`mam.errors.MamError`)."""
        ...


def _input_error_codes() -> frozenset[str]:
    codes: set[str] = set()
    stack: list[type] = [InputError]
    while stack:
        cls = stack.pop()
        codes.add(cls.code)
        stack.extend(cls.__subclasses__())
    return frozenset(codes)


#: Codes of every :class:`mam.errors.InputError` subclass: failures the caller caused.
DEFAULT_INVALID_ARGUMENT_CODES: frozenset[str] = _input_error_codes()


def error_code_of(exc: BaseException) -> str | None:
    """The exception's string ``.code``, if it has one fit for a metadata value (ASCII token)."""
    code = getattr(exc, "code", None)
    if isinstance(code, str) and code.isascii() and code.isprintable() and code.strip() == code:
        return code or None
    return None


def make_error_status(
    invalid_argument_codes: Collection[str] = DEFAULT_INVALID_ARGUMENT_CODES,
) -> ErrorStatus:
    """Map errors whose code is in ``invalid_argument_codes`` to INVALID_ARGUMENT, others to
    INTERNAL."""
    codes = frozenset(invalid_argument_codes)

    def error_status(exc: Exception) -> grpc.StatusCode:
        code = error_code_of(exc)
        return grpc.StatusCode.INVALID_ARGUMENT if code in codes else grpc.StatusCode.INTERNAL

    return error_status


class _Abort(Exception):
    """A protocol failure decided by the servicer (not by the model)."""

    def __init__(self, status: grpc.StatusCode, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


Abort = _Abort  # public name for the protocol's own failures (``.code``, ``.message``)


def _spec(entry: TensorSpec | Sequence[Any]) -> TensorSpec:
    spec = TensorSpec(*entry)
    if spec.datatype not in DATATYPES:
        raise ValueError(f"tensor '{spec.name}': unsupported datatype '{spec.datatype}'")
    if any(int(d) < -1 for d in spec.shape):
        raise ValueError(f"tensor '{spec.name}': dims must be >= 0 or -1, got {spec.shape}")
    return TensorSpec(spec.name, spec.datatype, [int(d) for d in spec.shape], bool(spec.optional))


def _param_value(param: pb.InferParameter) -> ParamValue | None:
    which = param.WhichOneof("parameter_choice")
    return None if which is None else getattr(param, which)


def _shape_matches(shape: Sequence[int], spec: Sequence[int]) -> bool:
    return len(shape) == len(spec) and all(s == -1 or s == d for d, s in zip(shape, spec))


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Serves one :class:`InferenceModel` over the v2 protocol (grpc.aio)."""

    def __init__(
        self,
        model: InferenceModel,
        server_name: str,
        server_version: str,
        max_elements: int,
        error_status: ErrorStatus | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.model = model
        self.server_name = server_name
        self.server_version = server_version
        self.max_elements = max_elements
        self.error_status = error_status or make_error_status()
        self.observer = observer
        self.inputs = [_spec(e) for e in model.inputs]
        self.outputs = [_spec(e) for e in model.outputs]
        self._inputs_by_name = {s.name: s for s in self.inputs}
        self._output_names = {s.name for s in self.outputs}

    # --- plumbing ---------------------------------------------------------------------------
    def _observe(self, method: str, code: str, started: float) -> None:
        if self.observer is None:
            return
        try:
            self.observer(method, code, time.perf_counter() - started)
        except Exception:  # a metrics bug must not fail the request
            logger.exception("gRPC observer failed for %s", method)

    async def _serve(
        self,
        method: str,
        context: grpc.aio.ServicerContext,
        handler: Callable[[], Awaitable[_Resp]],
    ) -> _Resp:
        """Run ``handler``; translate failures to a status, and report the outcome once."""
        started = time.perf_counter()
        try:
            response = await handler()
        except _Abort as exc:
            status, code, message = exc.status, exc.code, exc.message
        except Exception as exc:
            status, code, message = self._model_failure(method, exc)
        else:
            self._observe(method, "ok", started)
            return response
        self._observe(method, code, started)
        await context.abort(
            status, f"{code}: {message}", trailing_metadata=((ERROR_CODE_KEY, code),)
        )
        raise AssertionError("unreachable: context.abort raises")  # pragma: no cover

    def _model_failure(self, method: str, exc: Exception) -> tuple[grpc.StatusCode, str, str]:
        code = error_code_of(exc)
        try:
            status = self.error_status(exc)
        except Exception:
            logger.exception("error_status mapping failed")
            status = grpc.StatusCode.INTERNAL
        if status in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            logger.error("%s failed (%s)", method, code or type(exc).__name__, exc_info=exc)
            return status, code or INTERNAL_CODE, _GENERIC_MESSAGE
        if code is None:  # a custom mapping chose the status: say only that
            return status, status.name.lower(), status.name.lower().replace("_", " ")
        message = getattr(exc, "message", None)
        return status, code, message if isinstance(message, str) else str(exc)

    def _versions(self) -> list[str]:
        """The version and, where the model names one, its content digest: the metadata's
        ``versions``, and the values a request's ``model_version`` may name."""
        digest = getattr(self.model, "digest", None)
        return [self.model.version, *([str(digest)] if digest else [])]

    def _check_model(self, name: str, version: str) -> None:
        if name != self.model.name:
            raise _Abort(grpc.StatusCode.NOT_FOUND, "model_not_found", f"unknown model '{name}'")
        if version and version not in self._versions():
            raise _Abort(
                grpc.StatusCode.NOT_FOUND,
                "model_not_found",
                f"model '{name}' has no version '{version}' (serving '{self.model.version}')",
            )

    # --- health and metadata ----------------------------------------------------------------
    async def ServerLive(self, request, context):
        async def handle() -> pb.ServerLiveResponse:
            return pb.ServerLiveResponse(live=True)

        return await self._serve("ServerLive", context, handle)

    async def ServerReady(self, request, context):
        async def handle() -> pb.ServerReadyResponse:
            return pb.ServerReadyResponse(ready=bool(self.model.is_ready()))

        return await self._serve("ServerReady", context, handle)

    async def ModelReady(self, request, context):
        async def handle() -> pb.ModelReadyResponse:
            self._check_model(request.name, request.version)
            return pb.ModelReadyResponse(ready=bool(self.model.is_ready()))

        return await self._serve("ModelReady", context, handle)

    async def ServerMetadata(self, request, context):
        async def handle() -> pb.ServerMetadataResponse:
            return pb.ServerMetadataResponse(
                name=self.server_name, version=self.server_version, extensions=[]
            )

        return await self._serve("ServerMetadata", context, handle)

    async def ModelMetadata(self, request, context):
        async def handle() -> pb.ModelMetadataResponse:
            self._check_model(request.name, request.version)
            meta = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=self.model.name,
                versions=self._versions(),
                platform=self.model.platform,
                inputs=[meta(name=s.name, datatype=s.datatype, shape=s.shape) for s in self.inputs],
                outputs=[
                    meta(name=s.name, datatype=s.datatype, shape=s.shape) for s in self.outputs
                ],
            )

        return await self._serve("ModelMetadata", context, handle)

    # --- inference --------------------------------------------------------------------------
    async def ModelInfer(self, request, context):
        return await self._serve("ModelInfer", context, lambda: self._infer(request))

    def _decode_inputs(self, request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
        bad = grpc.StatusCode.INVALID_ARGUMENT
        raw_list = request.raw_input_contents
        if raw_list and len(raw_list) != len(request.inputs):
            raise _Abort(
                bad,
                "invalid_request",
                f"{len(raw_list)} raw_input_contents for {len(request.inputs)} inputs",
            )
        arrays: dict[str, np.ndarray] = {}
        for i, tensor in enumerate(request.inputs):
            spec = self._inputs_by_name.get(tensor.name)
            if spec is None:
                known = ", ".join(self._inputs_by_name)
                raise _Abort(
                    bad, "invalid_request", f"unknown input '{tensor.name}' (model takes {known})"
                )
            if tensor.name in arrays:
                raise _Abort(bad, "invalid_request", f"input '{tensor.name}' given twice")
            if tensor.datatype != spec.datatype:
                raise _Abort(
                    bad,
                    TensorError.code,
                    f"input '{tensor.name}': datatype {tensor.datatype}, expected {spec.datatype}",
                )
            if not _shape_matches(tensor.shape, spec.shape):
                raise _Abort(
                    bad,
                    TensorError.code,
                    f"input '{tensor.name}': shape {list(tensor.shape)} does not match "
                    f"{list(spec.shape)}",
                )
            raw = raw_list[i] if raw_list else None
            try:
                arrays[tensor.name] = to_numpy(tensor, raw, max_elements=self.max_elements)
            except TensorError as exc:
                raise _Abort(bad, exc.code, exc.message) from exc
        missing = [s.name for s in self.inputs if not s.optional and s.name not in arrays]
        if missing:
            raise _Abort(bad, "invalid_request", f"missing required input(s): {', '.join(missing)}")
        return arrays

    def _requested_outputs(self, request: pb.ModelInferRequest) -> list[str]:
        names = [o.name for o in request.outputs]
        unknown = [n for n in names if n not in self._output_names]
        if unknown:
            known = ", ".join(s.name for s in self.outputs)
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "invalid_request",
                f"unknown output '{unknown[0]}' (model produces {known})",
            )
        if len(set(names)) != len(names):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "invalid_request", "output asked twice")
        return names

    async def infer_message(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        """A ModelInfer request checked, decoded, run and encoded; raises :class:`Abort` (the
        protocol's failures) or the model's exceptions. Other transports of the protocol (v2
        REST) convert their request to this message and call here, so every check is shared."""
        return await self._infer(request)

    async def _infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        self._check_model(request.model_name, request.model_version)
        if not self.model.is_ready():
            raise _Abort(
                grpc.StatusCode.UNAVAILABLE,
                "model_not_ready",
                f"model '{self.model.name}' not ready",
            )
        # Typed contents of a large tensor take seconds to convert: off the event loop.
        inputs = await asyncio.to_thread(self._decode_inputs, request)
        requested = self._requested_outputs(request)
        parameters = {
            key: value
            for key, param in request.parameters.items()
            if (value := _param_value(param)) is not None
        }
        results = await self.model.infer(inputs, parameters)
        return self._encode_outputs(request, results, requested)

    def _encode_outputs(
        self,
        request: pb.ModelInferRequest,
        results: Mapping[str, np.ndarray],
        requested: list[str],
    ) -> pb.ModelInferResponse:
        if requested:
            names = requested
        else:  # metadata order first, then anything else the model returned
            names = [s.name for s in self.outputs if s.name in results]
            names += [n for n in results if n not in self._output_names]
        response = pb.ModelInferResponse(
            model_name=self.model.name, model_version=self.model.version, id=request.id
        )
        for name in names:
            if name not in results:
                raise RuntimeError(f"model did not return requested output '{name}'")
            try:
                tensor, raw = from_numpy(name, results[name])
            except TensorError as exc:  # a model bug, not the caller's: must not map to 400
                raise RuntimeError(f"output '{name}': {exc.message}") from None
            response.outputs.append(tensor)
            response.raw_output_contents.append(raw)
        return response


def _address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal
    return f"{host}:{port}"


async def start_server(
    servicer: InferenceServicer,
    host: str,
    port: int,
    max_message_bytes: int,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> grpc.aio.Server:
    """Create, bind and start a grpc.aio server on the running event loop.

    ``grpc.so_reuseport`` is turned off: gRPC enables SO_REUSEPORT by default on Linux, which
    lets a second server silently share a port that is already taken instead of failing.
    """
    server = grpc.aio.server(
        interceptors=list(interceptors),
        options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    address = _address(host, port)
    try:
        bound = server.add_insecure_port(address)  # returns 0 on failure in older grpcio
    except Exception as exc:  # newer grpcio raises RuntimeError instead
        raise RuntimeError(f"cannot bind gRPC server to {address}: {exc}") from exc
    if not bound:
        raise RuntimeError(f"cannot bind gRPC server to {address} (port in use or not allowed)")
    await server.start()
    return server


async def stop_server(server: grpc.aio.Server, grace: float) -> None:
    """Stop accepting calls and give in-flight ones ``grace`` seconds to finish."""
    await server.stop(grace)
