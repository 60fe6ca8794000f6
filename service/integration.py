"""Hospital integration in the service: FHIR answers, FHIR push through the outbox, the audit trail.

* FHIR is asked for with ``Accept: application/fhir+json`` or ``?format=fhir`` on
  ``/screen``, ``/screen_pose``, ``/screen_instances`` and ``/screen/get``; the middleware turns
  the JSON result into the Bundle of :mod:`mam.fhir` (``to_fhir``), so handlers and BentoML's task
  routes stay as they are. Errors keep the service's JSON envelope.
* The caller passes its references in headers, never in the URL (proxies log URLs):
  ``X-MAM-FHIR-Subject: Patient/<id>``, ``X-MAM-FHIR-Encounter: Encounter/<id>``;
  ``X-MAM-Echo-DICOM-UIDs: true`` asks for a DICOM upload's study and series UIDs to be echoed
  into the Bundle. The result id is the request id (``x-request-id``) of a synchronous call and
  the task id of a task, so a result fetched twice is the same FHIR result.
* ``Pushes`` sends the Bundle of each result with a subject to ``MAM_FHIR_BASE_URL`` in the
  background (``mam.fhir.push``: retries, counted in ``mam_fhir_push_total``), after the result
  is answered or stored: a failing FHIR server never loses a result.

Echoed UIDs of tasks are kept in memory only (``UidStore``, bounded), for ``/screen/get``.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping
from urllib.parse import parse_qs

from mam.fhir import FHIR_JSON, FhirCodes, FhirContext, build_bundle
from mam.schemas import InstancesResult, ScreeningResult

logger = logging.getLogger("mam.service")

SUBJECT_HEADER = "x-mam-fhir-subject"
ENCOUNTER_HEADER = "x-mam-fhir-encounter"
ECHO_UIDS_HEADER = "x-mam-echo-dicom-uids"
# Endpoints (service.middleware.ROUTES names) whose results can be answered as FHIR.
RESULT_TYPES = {
    "screen": ScreeningResult,
    "screen_get": ScreeningResult,
    "screen_pose": ScreeningResult,
    "screen_instances": InstancesResult,
}
# Endpoints every call of which is audited (status polls are not: they carry no data).
AUDITED = frozenset({"screen", "screen_submit", "screen_get", "screen_pose", "screen_instances"})


def headers_of(scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}


def query_of(scope) -> dict[str, str]:
    q = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    return {k: v[-1] for k, v in q.items()}


def wants_fhir(scope) -> bool:
    """``?format=fhir``, or an Accept header naming ``application/fhir+json`` (``format=json``
    wins over Accept)."""
    fmt = query_of(scope).get("format", "").lower()
    if fmt:
        return fmt == "fhir"
    accept = headers_of(scope).get("accept", "").lower()
    return FHIR_JSON in accept


def echo_uids(headers: Mapping[str, str]) -> bool:
    return headers.get(ECHO_UIDS_HEADER, "").strip().lower() in ("1", "true", "yes")


def context(headers: Mapping[str, str], result_id: str, uids=None) -> FhirContext:
    """The caller's references (``InvalidFhirReferenceError`` when they are not references)."""
    return FhirContext(
        result_id=result_id,
        subject=headers.get(SUBJECT_HEADER) or None,
        encounter=headers.get(ENCOUNTER_HEADER) or None,
        study_instance_uid=getattr(uids, "study_instance_uid", None),
        series_instance_uid=getattr(uids, "series_instance_uid", None),
    )


def to_fhir(body: bytes, endpoint: str, ctx: FhirContext, codes: FhirCodes) -> bytes:
    """A JSON result as BentoML answered it -> its FHIR Bundle, as bytes."""
    result = RESULT_TYPES[endpoint].model_validate_json(body)
    return json.dumps(build_bundle(result, ctx, codes)).encode()


class UidStore:
    """Echoed DICOM UIDs of tasks, by task id: memory only, the oldest dropped beyond ``size``."""

    def __init__(self, size: int = 4096) -> None:
        self._d: OrderedDict[str, object] = OrderedDict()
        self._size, self._lock = size, threading.Lock()

    def put(self, task_id: str, uids) -> None:
        with self._lock:
            self._d[task_id] = uids
            while len(self._d) > self._size:
                self._d.popitem(last=False)

    def get(self, task_id: str | None):
        with self._lock:
            return self._d.get(task_id) if task_id else None


UIDS = UidStore()


class Pushes:
    """The service's FHIR push through the durable outbox (``mam.fhir.outbox``): a Bundle is
    written to the outbox before anything is sent, delivered by a background worker with
    backoff, kept across restarts, and drained (not dropped) on shutdown up to
    ``fhir_drain_s``; an entry given up after ``fhir_push_attempts`` stays in the outbox,
    visible and re-sent with ``mam fhir outbox retry``. Wired to the metrics and the audit.

    Args: settings (``service.settings.Settings``), metrics, audit log."""

    def __init__(self, settings, metrics, audit) -> None:
        from mam.fhir.outbox import FhirClient, Outbox, OutboxWorker, make_auth

        self.metrics, self.audit = metrics, audit
        self.codes = settings.fhir_codes()
        self.enabled = settings.fhir_base_url is not None
        self.drain_s = settings.fhir_drain_s
        self.outbox = self.worker = None
        if self.enabled:
            token = settings.fhir_token.get_secret_value() if settings.fhir_token else None
            auth = make_auth(
                token=token, token_file=settings.fhir_token_file,
                client_id=settings.fhir_client_id, token_url=settings.fhir_token_url,
                client_secret_file=settings.fhir_client_secret_file,
                private_key_file=settings.fhir_private_key_file,
            )  # fmt: skip
            client = FhirClient(settings.fhir_base_url, auth, settings.fhir_push_timeout_s)
            self.outbox = Outbox(settings.fhir_outbox_path(),
                                 max_attempts=settings.fhir_push_attempts,
                                 backoff_s=settings.fhir_push_backoff_s)  # fmt: skip
            self.worker = OutboxWorker(self.outbox, client, on_delivery=self._delivered).start()
            self.metrics.fhir_push_pending.set(self.outbox.counts()["pending"])

    def _delivered(self, d) -> None:
        if d.outcome == "retry":
            self.metrics.fhir_push_retries.inc()
            return
        outcome = "ok" if d.outcome == "ok" else ("rejected" if d.reason == "rejected"
                                                  else "failed")  # fmt: skip
        self.metrics.fhir_push.labels(outcome=outcome).inc()
        self.metrics.fhir_push_pending.set(self.outbox.counts()["pending"])
        self.audit.record("fhir_push", route="fhir_push", result_id=d.result_id,
                          outcome=outcome, status=d.status, attempts=d.attempts)  # fmt: skip

    def push(self, result, ctx: FhirContext) -> bool:
        """Put the Bundle of ``result`` in the outbox; False when push is off or there is no
        subject."""
        if not self.enabled:
            return False
        if ctx.subject is None:
            self.metrics.fhir_push.labels(outcome="skipped").inc()
            self.audit.record("fhir_push", route="fhir_push", result_id=ctx.result_id,
                              outcome="skipped")  # fmt: skip
            return False
        self.outbox.enqueue(build_bundle(result, ctx, self.codes), ctx.result_id)
        self.metrics.fhir_push_pending.set(self.outbox.counts()["pending"])
        self.worker.wake()
        return True

    def close(self) -> None:
        if self.worker is not None:
            self.worker.drain(self.drain_s)  # the rest stays in the file for the next start
            self.outbox.close()
            self.worker = None
