"""The audit trail: one JSON line per screening request, task, result access, FHIR push and batch
job, for a SIEM.

Who asked for what, when, on which content, and what came of it; never the data itself. Each
line is one JSON object (``AuditLog.record``), written to stdout (``MAM_AUDIT_FILE=-``, the
service's default: the container runtime's log collector ships it) or to a size-rotated file
(``MAM_AUDIT_FILE=/path/audit.jsonl``, ``MAM_AUDIT_MAX_MB``, ``MAM_AUDIT_BACKUPS``; a batch run
writes ``DIR/audit.jsonl`` unless told otherwise). ``MAM_AUDIT_FILE=off`` disables it (local
development only). Fields, always in this order, absent when not applicable:

==================  ===============================================================================
``audit``           ``"mam"``: the stream's marker, to route these lines apart from other logs
``time``            UTC, ISO 8601 with milliseconds (``2026-12-03T10:15:30.123Z``)
``event``           ``screening_request`` (a REST call to a screening or result route),
                    ``screening_task`` (a submitted task finishing), ``fhir_push`` (a Bundle sent
                    to the site's FHIR server), ``batch_job`` (one recording of ``mam batch``)
``service``         ``mam`` and ``version``: the software that wrote the line
``request_id``      the request's id (``x-request-id``), to join with the access log
``api_key_id``      the first 16 hex digits of SHA-256(key): the start of the digest configured in
                    ``MAM_API_KEY_HASHES``, never the key; ``none`` when no key was sent,
                    ``auth_disabled`` when keys are off
``route``           a fixed endpoint name (``screen``, ``screen_submit``, ``screen_get``,
                    ``screen_pose``, ``screen_instances``, ``batch``, ``fhir_push``)
``protocol``        ``rest``, ``grpc``, ``batch`` or ``cli`` (``mam screen``, when
                    ``MAM_AUDIT_FILE`` names a file)
``content_sha256``  SHA-256 of the submitted file (recording, pose or tensors), as the batch ledger
``result_id``       the result's id: request id (synchronous), task id, or the batch result id
                    (the FHIR DiagnosticReport.identifier of the same result)
``format``          ``json`` or ``fhir``: what was returned
``outcome``         ``ok`` or the stable error code (``video_too_short``, ``unauthorized``...); for
                    a push ``ok``, ``failed``, ``rejected`` or ``skipped``
``status``          HTTP status of the answer (of the FHIR server's, for a push)
``duration_ms``     time to answer
``attempts``        tries of a FHIR push
``model``           the screening model's name, ``model_version`` its version and ``model_digest``
                    its identity (``mam.model.weights``: SHA-256 over the tensors and all that
                    decides a label), on every line of a process that screens with one model
                    (``AuditLog.set_model``) or of a job that names it
==================  ===============================================================================

No infant data, file names, paths, patient or encounter references, DICOM attributes, results or
messages ever appear: ``record`` accepts only the fields above, and the values it is given are
codes, ids and digests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import logging.handlers
import os
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

from mam import __version__

OFF = "off"
STDOUT = "-"
FIELDS = (
    "request_id", "api_key_id", "route", "protocol", "content_sha256", "result_id", "format",
    "outcome", "status", "duration_ms", "attempts", "model", "model_version", "model_digest",
)  # fmt: skip
EVENTS = frozenset({"screening_request", "screening_task", "fhir_push", "batch_job"})

__all__ = ["AuditLog", "key_digest", "key_id"]

_counter = 0
_counter_lock = threading.Lock()


def key_digest(key: str) -> str:
    """SHA-256 of an API key: what ``MAM_API_KEY_HASHES`` lists, what the service and the
    review login compare, and what the audit id is the start of."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_id(key: str | None, auth_disabled: bool = False) -> str:
    """The audit id of an API key: 16 hex digits of its SHA-256 (never the key)."""
    if auth_disabled:
        return "auth_disabled"
    if not key:
        return "none"
    return key_digest(key)[:16]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AuditLog:
    """Args:
    target: ``-`` (stdout), ``off``, or a file path (rotated by size).
    max_bytes, backups: rotation of a file target.
    """

    def __init__(self, target: str | os.PathLike = STDOUT, max_bytes: int = 100 * 2**20,
                 backups: int = 10) -> None:  # fmt: skip
        global _counter
        self.target = str(target)
        self.enabled = self.target.lower() != OFF
        with _counter_lock:
            _counter += 1
            n = _counter
        # Its own logger (never propagating), so no other handler or level ever sees the lines.
        self._logger = logging.getLogger(f"mam.audit.{n}")
        self._logger.propagate = False
        self._logger.setLevel(logging.INFO)
        self._handler: logging.Handler | None = None
        self.model: dict[str, str] = {}  # set_model: the identity every line carries
        if not self.enabled:
            return
        if self.target == STDOUT:
            handler: logging.Handler = logging.StreamHandler(sys.stdout)
        else:
            path = Path(self.target)
            path.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.handlers.RotatingFileHandler(
                path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
            )
        handler.setFormatter(logging.Formatter("%(message)s"))
        self._logger.addHandler(handler)
        self._handler = handler

    @classmethod
    def from_env(cls, default: str | os.PathLike = STDOUT) -> AuditLog:
        """``MAM_AUDIT_FILE`` (else ``default``), ``MAM_AUDIT_MAX_MB``, ``MAM_AUDIT_BACKUPS``."""
        from mam.settings import current

        return cls.from_settings(current(), default)

    @classmethod
    def from_settings(cls, settings, default: str | os.PathLike = STDOUT) -> AuditLog:
        """From ``mam.settings.MamSettings`` (or the service's): its audit file, else
        ``default`` (each command has its own), rotated at its size, keeping its backups."""
        target = settings.audit_file or str(default)
        return cls(target, int(settings.audit_max_mb * 2**20), settings.audit_backups)

    def record(self, event: str, **fields) -> dict:
        """Write one line; returns it as a dict. Unknown fields are refused (``ValueError``),
        so nothing but the documented fields can get in."""
        if event not in EVENTS:
            raise ValueError(f"unknown audit event {event!r}")
        unknown = set(fields) - set(FIELDS)
        if unknown:
            raise ValueError(f"not audit fields: {sorted(unknown)}")
        fields = {**self.model, **fields}
        line = {"audit": "mam", "time": _now(), "event": event, "service": "mam",
                "version": __version__}  # fmt: skip
        for name in FIELDS:
            value = fields.get(name)
            if value is not None:
                line[name] = round(value, 1) if isinstance(value, float) else value
        if self.enabled:
            self._logger.info(json.dumps(line, separators=(",", ":")))
        return line

    def set_model(self, name: str, version: str, digest: str | None) -> None:
        """The model this process screens with: every later line names it (``model``,
        ``model_version``, ``model_digest``)."""
        self.model = {"model": name, "model_version": version, "model_digest": digest}

    def add_handler(self, handler: logging.Handler) -> None:
        """A second destination for the same lines (e.g. a test's capture)."""
        handler.setFormatter(logging.Formatter("%(message)s"))
        self._logger.addHandler(handler)

    def close(self) -> None:
        if self._handler is not None:
            self._logger.removeHandler(self._handler)
            self._handler.close()
            self._handler = None
