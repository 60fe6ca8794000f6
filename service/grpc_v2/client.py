"""A small synchronous v2 client for tests, smoke checks and load tests.

Inputs always travel as ``raw_input_contents`` (the fast path); outputs are decoded from
``raw_output_contents`` or, for servers that answer with typed contents, from those. Failures
surface as the ``grpc.RpcError`` of the call, so callers can read ``code()``, ``details()`` and
``trailing_metadata()``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import numpy as np

from service.grpc_v2 import grpc_predict_v2_pb2 as pb
from service.grpc_v2 import grpc_predict_v2_pb2_grpc as pb_grpc
from service.grpc_v2.tensors import encode, raw_to_numpy, to_numpy

Metadata = Sequence[tuple[str, str | bytes]]
_MAX_OUTPUT_ELEMENTS = 1 << 31  # the client trusts its server; size is bounded by the channel


def _parameter(value: bool | int | str) -> pb.InferParameter:
    if isinstance(value, bool):  # before int: bool is an int subclass
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb.InferParameter(int64_param=value)
    if isinstance(value, str):
        return pb.InferParameter(string_param=value)
    raise TypeError(f"parameter value must be bool, int or str, not {type(value).__name__}")


def make_request(
    model_name: str,
    inputs: Mapping[str, Any],
    outputs: Sequence[str] | None = None,
    *,
    model_version: str = "",
    request_id: str = "",
    parameters: Mapping[str, bool | int | str] | None = None,
) -> pb.ModelInferRequest:
    """Build a ``ModelInferRequest`` with raw contents (reusable across calls in load tests)."""
    request = pb.ModelInferRequest(
        model_name=model_name, model_version=model_version, id=request_id
    )
    for name, array in inputs.items():
        datatype, shape, raw = encode(array)
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(raw)
    for name in outputs or ():
        request.outputs.add(name=name)
    for key, value in (parameters or {}).items():
        request.parameters[key].CopyFrom(_parameter(value))
    return request


def decode_response(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Output name -> array."""
    raw = response.raw_output_contents
    result: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(response.outputs):
        if raw:
            result[tensor.name] = raw_to_numpy(
                tensor.name,
                tensor.datatype,
                list(tensor.shape),
                raw[i],
                max_elements=_MAX_OUTPUT_ELEMENTS,
            )
        else:
            result[tensor.name] = to_numpy(tensor, None, max_elements=_MAX_OUTPUT_ELEMENTS)
    return result


class V2Client:
    """Blocking client over one insecure channel; use as a context manager or call ``close``."""

    def __init__(
        self, target: str, timeout: float = 10.0, max_message_bytes: int | None = None
    ) -> None:
        options = []
        if max_message_bytes is not None:
            options = [
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes),
            ]
        self.timeout = timeout
        self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> V2Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def live(self, metadata: Metadata | None = None) -> bool:
        response = self._stub.ServerLive(
            pb.ServerLiveRequest(), timeout=self.timeout, metadata=metadata
        )
        return response.live

    def ready(self, metadata: Metadata | None = None) -> bool:
        response = self._stub.ServerReady(
            pb.ServerReadyRequest(), timeout=self.timeout, metadata=metadata
        )
        return response.ready

    def model_ready(self, name: str, version: str = "", metadata: Metadata | None = None) -> bool:
        request = pb.ModelReadyRequest(name=name, version=version)
        return self._stub.ModelReady(request, timeout=self.timeout, metadata=metadata).ready

    def server_metadata(self, metadata: Metadata | None = None) -> pb.ServerMetadataResponse:
        return self._stub.ServerMetadata(
            pb.ServerMetadataRequest(), timeout=self.timeout, metadata=metadata
        )

    def model_metadata(
        self, name: str, version: str = "", metadata: Metadata | None = None
    ) -> pb.ModelMetadataResponse:
        request = pb.ModelMetadataRequest(name=name, version=version)
        return self._stub.ModelMetadata(request, timeout=self.timeout, metadata=metadata)

    def infer_request(
        self, request: pb.ModelInferRequest, metadata: Metadata | None = None
    ) -> pb.ModelInferResponse:
        """Send a prepared request; returns the raw response (id, version, tensors)."""
        return self._stub.ModelInfer(request, timeout=self.timeout, metadata=metadata)

    def infer(
        self,
        model_name: str,
        inputs: Mapping[str, Any],
        outputs: list[str] | None = None,
        metadata: Metadata | None = None,
        *,
        parameters: Mapping[str, bool | int | str] | None = None,
    ) -> dict[str, np.ndarray]:
        """Run one inference; inputs are numpy arrays (or array-likes) keyed by input name."""
        request = make_request(model_name, inputs, outputs, parameters=parameters)
        return decode_response(self.infer_request(request, metadata))
