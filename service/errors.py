"""Every failure the service reports: one envelope, stable codes, one table of HTTP statuses.

The pipeline's own errors (:mod:`mam.errors`) keep their codes; the service adds the ones only a
server has (auth, limits, load, time). gRPC maps the same codes to status codes.
"""

from __future__ import annotations

import json
from http import HTTPStatus

from pydantic import BaseModel, Field
from starlette.responses import JSONResponse

from mam import DISCLAIMER
from mam.errors import MamError

ERROR_HEADER = "x-mam-error-code"  # marks a response as already in the envelope

# Codes a client can cause that are not mam.errors codes.
MALFORMED = "malformed_request"
UNAUTHORIZED = "unauthorized"
NOT_FOUND = "not_found"
METHOD_NOT_ALLOWED = "method_not_allowed"
TOO_LARGE = "file_too_large"
UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
OVERLOADED = "overloaded"
RETRY_AFTER_S = "1"
TIMEOUT = "timeout"
BODY_TIMEOUT = "body_timeout"
CLIENT_CLOSED = "client_closed_request"
INTERNAL = "internal_error"
NOT_READY = "not_ready"
TASK_RETRY_DISABLED = "task_retry_disabled"

_STATUS: dict[str, int] = {
    MALFORMED: 400,
    UNAUTHORIZED: 401,
    NOT_FOUND: 404,
    METHOD_NOT_ALLOWED: 405,
    TOO_LARGE: 413,
    UNSUPPORTED_MEDIA_TYPE: 415,
    OVERLOADED: 503,
    NOT_READY: 503,
    TIMEOUT: 504,
    BODY_TIMEOUT: 408,
    CLIENT_CLOSED: 499,  # nginx's code: the client went away; nobody reads the answer
    TASK_RETRY_DISABLED: 409,
    INTERNAL: 500,
    "model_load_error": 503,
    # The v2 protocol's own (service.grpc_v2.server), on its REST routes.
    "model_not_found": 404,
    "invalid_request": 400,
    "model_not_ready": 503,
    "dependency_missing": 500,
    "file_not_found": 400,
}
# Everything else a mam.errors.InputError says (bad video, too short, no infant tracked, invalid
# pose, tensors or infant data) is well-formed but unprocessable: 422.


def http_status(code: str) -> int:
    return _STATUS.get(code, 422)


class ErrorBody(BaseModel):
    code: str = Field(description="Stable, machine-readable error code.")
    message: str = Field(description="What was wrong and what was expected; no health data.")
    request_id: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
    disclaimer: str = DISCLAIMER


class ServiceError(Exception):
    """An error only a server raises (limits, load, time)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def error_response(code: str, message: str, request_id: str | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(code=code, message=message, request_id=request_id))
    headers = {ERROR_HEADER: code}
    if code == OVERLOADED:
        headers["retry-after"] = RETRY_AFTER_S  # every refusal under load says when to come back
    return JSONResponse(body.model_dump(), status_code=http_status(code), headers=headers)


def wants_fhir_errors(accept: str | None) -> bool:
    """A FHIR client (``Accept: application/fhir+json``, not ``;q=0``) reads errors as an
    OperationOutcome."""
    for media in (accept or "").lower().split(","):
        kind, *params = (p.strip() for p in media.split(";"))
        if kind == "application/fhir+json":
            q = next((p[2:] for p in params if p.startswith("q=")), "1")
            try:
                return float(q) > 0
            except ValueError:
                return True
    return False


def fhir_error_response(code: str, message: str, request_id: str | None = None) -> JSONResponse:
    """The error as a FHIR ``OperationOutcome`` (``mam.fhir.operation_outcome``): status and
    headers as :func:`error_response`'s, the request id in ``x-request-id``."""
    from mam.fhir import FHIR_JSON, operation_outcome

    status = http_status(code)
    headers = {ERROR_HEADER: code} | ({"retry-after": RETRY_AFTER_S} if code == OVERLOADED else {})
    if request_id:
        headers["x-request-id"] = request_id
    return JSONResponse(operation_outcome(code, message, status), status_code=status,
                        headers=headers, media_type=FHIR_JSON)  # fmt: skip


def envelope_message(body: bytes) -> str:
    """The message of an error envelope (``error_response``'s body)."""
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "error"


def v2_error_response(code: str, message: str) -> JSONResponse:
    """An error on the KServe v2 REST routes: the protocol's ``{"error": "..."}``, which its
    clients read, as ``"<code>: <message>"`` like gRPC's details; status and headers as
    :func:`error_response`'s."""
    headers = {ERROR_HEADER: code} | ({"retry-after": RETRY_AFTER_S} if code == OVERLOADED else {})
    return JSONResponse(
        {"error": f"{code}: {message}"}, status_code=http_status(code), headers=headers
    )


def from_exception(exc: Exception, request_id: str | None = None) -> JSONResponse:
    """The envelope for an exception; unexpected ones say nothing about their internals."""
    if isinstance(exc, MamError | ServiceError):
        return error_response(exc.code, exc.message, request_id)
    return error_response(
        INTERNAL, "unexpected server error; it has been logged with this request id", request_id
    )


def reason(status: int) -> str:
    return HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "error"
