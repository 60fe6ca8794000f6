"""A failure as a FHIR ``OperationOutcome``: what a FHIR client reads instead of an envelope."""

from __future__ import annotations

__all__ = ["operation_outcome"]

# Stable error codes (``mam.errors``, ``service.errors``) -> OperationOutcome.issue.code
# (http://hl7.org/fhir/issue-type). A code not here: ``processing`` (the input was read but
# cannot be screened), or ``exception`` when the server failed.
ISSUE_TYPE: dict[str, str] = {
    "malformed_request": "structure",
    "invalid_request": "structure",
    "unauthorized": "login",
    "not_found": "not-found",
    "model_not_found": "not-found",
    "method_not_allowed": "not-supported",
    "unsupported_media_type": "not-supported",
    "task_retry_disabled": "not-supported",
    "file_too_large": "too-costly",
    "overloaded": "transient",
    "not_ready": "transient",
    "model_not_ready": "transient",
    "timeout": "timeout",
    "body_timeout": "timeout",
    "client_closed_request": "incomplete",
    "internal_error": "exception",
    "model_load_error": "exception",
    "dependency_missing": "exception",
    "invalid_fhir_reference": "value",
    "invalid_infant_data": "value",
    "file_not_found": "not-found",
}


def operation_outcome(code: str, message: str, status: int | None = None) -> dict:
    """An R4 OperationOutcome of one error issue: ``issue.code`` mapped from the stable error
    ``code`` (also given as ``details``), ``diagnostics`` the message (which carries no health
    data)."""
    kind = ISSUE_TYPE.get(code) or ("exception" if (status or 422) >= 500 else "processing")
    return {
        "resourceType": "OperationOutcome",
        "issue": [{
            "severity": "error",
            "code": kind,
            "details": {"coding": [{"code": code}], "text": code},
            "diagnostics": message,
        }],
    }  # fmt: skip
