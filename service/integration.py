"""Hospital integration in the service: FHIR answers, FHIR push through the outbox, the audit trail.

* A result is answered in any format of :mod:`mam.formats`, asked for with ``?format=NAME`` or
  its media type in ``Accept`` (``application/fhir+json`` or ``?format=fhir``: the FHIR Bundle
  of :mod:`mam.fhir`) on ``/screen``, ``/screen_pose``, ``/screen_instances`` and
  ``/screen/get``; the middleware turns the JSON result into it (``negotiate``, ``render``), so
  handlers and BentoML's task routes stay as they are. Errors keep the service's JSON envelope.
* The caller passes its references in headers, never in the URL (proxies log URLs):
  ``X-MAM-FHIR-Subject: Patient/<id>``, ``X-MAM-FHIR-Encounter: Encounter/<id>``, or the
  patient by identifier ``X-MAM-FHIR-Patient-Identifier: SYSTEM|VALUE`` (a conditional
  reference), the order ``X-MAM-FHIR-Order-Identifier: SYSTEM|VALUE`` (``basedOn``) and
  ``X-MAM-Accession-Number``;
  ``X-MAM-Echo-DICOM-UIDs: true`` asks for a DICOM upload's study and series UIDs to be echoed
  into the Bundle. The result id is the request id (``x-request-id``) of a synchronous call and
  the task id of a task, so a result fetched twice is the same FHIR result.
* ``Pushes`` sends the Bundle of each result with a subject to ``MAM_FHIR_BASE_URL`` in the
  background (the durable outbox, ``mam.fhir.outbox``: retries, counted in
  ``mam_fhir_push_total``), after the result is answered or stored: a failing FHIR server
  never loses a result.

Echoed UIDs of tasks are kept in memory only (``UidStore``, bounded), for ``/screen/get``.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping
from urllib.parse import parse_qs

from mam import formats
from mam.fhir import FhirCodes, FhirContext, build_bundle
from mam.schemas import InstancesResult, ScreeningResult

logger = logging.getLogger("mam.service")

SUBJECT_HEADER = "x-mam-fhir-subject"
ENCOUNTER_HEADER = "x-mam-fhir-encounter"
ECHO_UIDS_HEADER = "x-mam-echo-dicom-uids"
PATIENT_IDENTIFIER_HEADER = "x-mam-fhir-patient-identifier"
ORDER_IDENTIFIER_HEADER = "x-mam-fhir-order-identifier"
ACCESSION_HEADER = "x-mam-accession-number"
# Endpoints (service.middleware.ROUTES names) whose results can be answered as FHIR.
RESULT_TYPES = {
    "screen": ScreeningResult,
    "screen_get": ScreeningResult,
    "screen_pose": ScreeningResult,
    "screen_instances": InstancesResult,
}
RESULT_KINDS = {name: formats.INSTANCES if t is InstancesResult else formats.SCREENING
                for name, t in RESULT_TYPES.items()}  # fmt: skip
# Endpoints every call of which is audited (status polls are not: they carry no data).
AUDITED = frozenset({"screen", "screen_submit", "screen_get", "screen_pose", "screen_instances"})


def headers_of(scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}


def query_of(scope) -> dict[str, str]:
    q = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    return {k: v[-1] for k, v in q.items()}


def negotiate(scope, endpoint: str):
    """The output format (``mam.formats``) a result request asks for: ``?format=NAME`` (which
    wins over Accept), else its ``Accept`` header, else JSON; None for an endpoint that answers
    no result."""
    kind = RESULT_KINDS.get(endpoint)
    if kind is None:
        return None
    return formats.negotiate(query_of(scope).get("format"), headers_of(scope).get("accept"), kind)


def echo_uids(headers: Mapping[str, str]) -> bool:
    return headers.get(ECHO_UIDS_HEADER, "").strip().lower() in ("1", "true", "yes")


def context(headers: Mapping[str, str], result_id: str, uids=None,
            content_sha256: str | None = None) -> FhirContext:  # fmt: skip
    """The caller's references and identifiers (``InvalidFhirReferenceError`` when they are not
    ones); ``content_sha256``: the screened upload's, for the Provenance."""
    return FhirContext(
        result_id=result_id,
        subject=headers.get(SUBJECT_HEADER) or None,
        encounter=headers.get(ENCOUNTER_HEADER) or None,
        patient_identifier=headers.get(PATIENT_IDENTIFIER_HEADER) or None,
        order_identifier=headers.get(ORDER_IDENTIFIER_HEADER) or None,
        accession_number=headers.get(ACCESSION_HEADER) or None,
        content_sha256=content_sha256,
        study_instance_uid=getattr(uids, "study_instance_uid", None),
        series_instance_uid=getattr(uids, "series_instance_uid", None),
    )


def render(body: bytes, endpoint: str, fmt, ctx: FhirContext, codes: FhirCodes | None) -> bytes:
    """A JSON result as BentoML answered it -> the same result in ``fmt`` (one line of JSON for
    the JSON formats), as bytes."""
    result = RESULT_TYPES[endpoint].model_validate_json(body)
    rc = formats.RenderContext(ctx.result_id, fhir=ctx, issued=ctx.issued, codes=codes,
                               pretty=False)  # fmt: skip
    return fmt.to_bytes(result, rc)


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
