"""One ASGI middleware in front of every REST route: request id, API-key check, upload limit
and body deadline (with or without ``Content-Length``), content types, task ids, metering and
the error envelope.

It is pure ASGI (no buffering of request bodies) so that a 500 MB upload streams through; it only
buffers the bodies of error responses that BentoML produced itself (validation, load shedding,
unknown routes) to put them in the service's envelope with a stable code.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass

from mam.audit import AuditLog, key_id
from mam.errors import MamError
from service import errors as E
from service import integration as I
from service.auth import KeyCheck, key_from_headers
from service.metrics import get_metrics, scrape_collectors

logger = logging.getLogger("mam.service.access")

# Routes never behind the key: probes and the scraper must work without one, and the API
# description is public. Everything else, including unknown paths, needs a key.
EXEMPT = frozenset(
    {"/livez", "/readyz", "/healthz", "/metrics", "/", "/docs.json", "/schema.json"}
    | {"/v2/health/live", "/v2/health/ready", "/v2/models/mam/ready"}  # as gRPC's health RPCs
)
EXEMPT_PREFIXES = ("/static_content/",)

MULTIPART = ("multipart/form-data",)
JSON = ("application/json",)


@dataclass(frozen=True)
class Route:
    endpoint: str  # metric label: a fixed name, never the raw path
    content_types: tuple[str, ...] | None  # allowed for a request with a body; None: no body


ROUTES: dict[str, Route] = {
    "/screen": Route("screen", MULTIPART),
    "/screen/submit": Route("screen_submit", MULTIPART),
    "/screen/status": Route("screen_status", None),
    "/screen/get": Route("screen_get", None),
    "/screen/progress": Route("screen_progress", JSON),
    "/screen/cancel": Route("screen_cancel", None),
    "/screen/retry": Route("screen_retry", None),
    "/screen_pose": Route("screen_pose", MULTIPART),
    "/screen_instances": Route("screen_instances", MULTIPART),
    # KServe v2 REST (service.v2_rest): a JSON header, then binary tensor data.
    "/v2": Route("v2_server_metadata", None),
    "/v2/models/mam": Route("v2_model_metadata", None),
    "/v2/models/mam/infer": Route("v2_model_infer", None),
}
V2_PREFIX = "/v2"
RETRY_DISABLED = (
    "retry is disabled: recordings are deleted once processed, so there is nothing to rerun; "
    "submit the recording again"
)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_TASK_ID = re.compile(r"^[0-9a-f]{32}$")  # BentoML's task ids: uuid4().hex
TASK_ROUTES = frozenset({"screen_status", "screen_get", "screen_cancel"})


class BodyRefused(Exception):
    """The body broke a limit while the app was reading it: answered with ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return v.decode("latin-1")
    return None


class ServiceMiddleware:
    """Args: app; key_hashes: accepted SHA-256 digests; auth_disabled; max_body_bytes; audit:
    the audit trail (``mam.audit``; None: none); fhir_codes: the site's FHIR codes;
    body_timeout_s: the time a client has to send its whole body (408 after)."""

    def __init__(self, app, key_hashes: frozenset[str], auth_disabled: bool, max_body_bytes: int,
                 audit: AuditLog | None = None, fhir_codes=None,
                 body_timeout_s: float = 600.0):  # fmt: skip
        self.app = app
        self.body_timeout_s = body_timeout_s
        self.keys = KeyCheck(key_hashes, auth_disabled)
        self.max_body = max_body_bytes
        self.auth_disabled = auth_disabled
        self.audit = audit or AuditLog("off")
        self.fhir_codes = fhir_codes
        if auth_disabled:
            logger.warning("API-key authentication is DISABLED (MAM_AUTH_DISABLED): dev only")
        elif not key_hashes:
            logger.warning("no API keys configured (MAM_API_KEY_HASHES): every call gets 401")

    def _authorised(self, scope) -> bool:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ())}
        return self.keys.allows(headers)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if path == "/metrics":
            return await _metrics(scope, receive, send)
        if path in EXEMPT or path.startswith(EXEMPT_PREFIXES):
            return await self.app(scope, receive, send)

        rid = _header(scope, b"x-request-id")
        rid = rid if rid and _REQUEST_ID.match(rid) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        route = ROUTES.get(path)
        endpoint = route.endpoint if route else "other"
        m = get_metrics()
        t0 = time.perf_counter()
        outcome = {"status": 500, "code": E.INTERNAL}
        m.in_flight.labels(protocol="rest").inc()
        try:
            await self._handle(scope, receive, send, route, path, rid, outcome)
        finally:
            if outcome.get("disconnected") and outcome["code"] == E.INTERNAL:
                # The client went away mid-request (BentoML answers its read error with a 500
                # nobody receives): not a fault of the service.
                outcome.update(status=E.http_status(E.CLIENT_CLOSED), code=E.CLIENT_CLOSED)
            m.in_flight.labels(protocol="rest").dec()
            dt = time.perf_counter() - t0
            code = outcome["code"]
            m.observe_request(endpoint, "rest", code, dt)
            logger.info(
                "request_id=%s endpoint=%s status=%d code=%s duration_ms=%.1f",
                rid, endpoint, outcome["status"], code, dt * 1000,
            )  # fmt: skip
            if endpoint in I.AUDITED:
                self._audit(scope, endpoint, rid, outcome, dt)

    def _audit(self, scope, endpoint: str, rid: str, outcome: dict, seconds: float) -> None:
        """One audit line per screening or result request (``mam.audit``): ids, digests and
        codes only. The handler leaves the content digest in the request's state."""
        state = scope.get("state", {})
        self.audit.record(
            "screening_request",
            request_id=rid,
            api_key_id=key_id(key_from_headers(I.headers_of(scope)), self.auth_disabled),
            route=endpoint,
            protocol="rest",
            content_sha256=state.get("content_sha256"),
            result_id=outcome.get("result_id"),
            format=outcome.get("format", "json"),
            outcome=outcome["code"] or "unknown",
            status=outcome["status"],
            duration_ms=seconds * 1000,
        )

    async def _handle(self, scope, receive, send, route, path, rid, outcome):
        fhir_errors = E.wants_fhir_errors(_header(scope, b"accept"))

        async def reply(code: str, message: str, headers: dict | None = None):
            resp = _error_response(path, code, message, rid, fhir_errors)
            resp.headers.update(headers or {})
            outcome.update(status=resp.status_code, code=code)
            await resp(scope, receive, send)

        if not self._authorised(scope):
            return await reply(
                E.UNAUTHORIZED,
                "missing or invalid API key (send 'Authorization: Bearer <key>')",
                {"www-authenticate": "Bearer"},
            )
        if route is None:
            # Answered here, before BentoML's own metrics label it with the raw path: a scanner
            # probing /patients/<id> must not mint label values.
            return await reply(E.NOT_FOUND, "no such endpoint")
        if path == "/screen/retry":
            return await reply(E.TASK_RETRY_DISABLED, RETRY_DISABLED)
        if route.endpoint in TASK_ROUTES:
            task_id = I.query_of(scope).get("task_id")
            if task_id is not None and not _TASK_ID.match(task_id):
                return await reply(E.MALFORMED, "task_id must be 32 lower-case hex characters")
        method = scope.get("method", "GET")
        if route and route.content_types and method == "POST":
            ctype = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
            if ctype not in route.content_types:
                return await reply(
                    E.UNSUPPORTED_MEDIA_TYPE,
                    f"expected {' or '.join(route.content_types)}; received {_printable(ctype)}",
                )
            _lower_media_type(scope)  # media types are case-insensitive; BentoML's lookup is not
        length = _header(scope, b"content-length")
        limit_msg = f"request body larger than the limit of {self.max_body / 2**20:g} MiB"
        if length and length.isdigit() and int(length) > self.max_body:
            return await reply(E.TOO_LARGE, limit_msg)
        try:
            transform = self._transform(scope, route.endpoint, rid, outcome)
        except MamError as e:  # a patient or encounter header that is not a reference
            return await reply(e.code, e.message)
        except ValueError:  # an id the FHIR context refuses
            return await reply(E.MALFORMED, "the result id or a reference header is malformed")
        # Tensor and pose requests pass the admission gate (service/admission.py) in their
        # handler, once their body is in: a slow client must not hold a slot.
        return await self._forward(scope, receive, send, path, rid, outcome, reply, limit_msg,
                                   transform, fhir_errors)  # fmt: skip

    def _transform(self, scope, endpoint: str, rid: str, outcome: dict):
        """What to do with a successful answer's body before it goes out (None: nothing): the
        result in the format asked for (``mam.formats``, e.g. a FHIR Bundle; chosen by
        ``integration.negotiate``); a submitted task's id noted for the audit line. Checks the
        caller's FHIR reference headers now, before any work, raising
        ``InvalidFhirReferenceError``."""
        headers = I.headers_of(scope)
        result_id = I.query_of(scope).get("task_id") if endpoint == "screen_get" else rid
        I.context(headers, result_id or rid)  # references checked before the body is read
        outcome["result_id"] = result_id
        if endpoint == "screen_submit":

            def note_task(body: bytes) -> tuple[bytes, str | None]:
                try:
                    outcome["result_id"] = json.loads(body).get("task_id")
                except (ValueError, AttributeError):
                    pass
                return body, None

            return note_task
        fmt = I.negotiate(scope, endpoint)
        if fmt is None or fmt.name == "json":
            return None  # BentoML's JSON answer is the result as it is
        outcome["format"] = fmt.name
        codes = self.fhir_codes

        def render(body: bytes) -> tuple[bytes, str | None]:
            state = scope.get("state", {})
            uids = state.get("dicom_uids") or I.UIDS.get(result_id)
            ctx = I.context(headers, result_id or rid, uids, state.get("content_sha256"))
            return I.render(body, endpoint, fmt, ctx, codes), fmt.media_type

        return render

    async def _forward(self, scope, receive, send, path, rid, outcome, reply, limit_msg,
                       transform=None, fhir_errors: bool = False):  # fmt: skip
        """Pass the request on with the body limit enforced and BentoML's errors enveloped;
        ``transform(body) -> (body, content type or None)`` rewrites a 200 answer."""

        received, body_done = 0, False
        refused: BodyRefused | None = None
        deadline = asyncio.get_running_loop().time() + self.body_timeout_s

        async def limited_receive():
            """The body, within its size limit and deadline (with or without Content-Length:
            a chunked upload is counted as it arrives). BentoML turns any exception raised
            here into its own 500, so the refusal is also noted for ``wrapped_send``."""
            nonlocal received, body_done, refused
            if body_done:  # after the body: only a disconnect can come
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    outcome["disconnected"] = True
                return msg
            try:
                async with asyncio.timeout_at(deadline):
                    msg = await receive()
            except TimeoutError:
                refused = BodyRefused(
                    E.BODY_TIMEOUT,
                    f"the request body did not arrive within {self.body_timeout_s:g} s",
                )
                raise refused from None
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                body_done = not msg.get("more_body", False)
                if received > self.max_body:
                    refused = BodyRefused(E.TOO_LARGE, limit_msg)
                    raise refused
            else:
                body_done = True
                outcome["disconnected"] = True
            return msg

        started = False
        held: dict | None = None
        kept: dict | None = None  # a 200 answer's start, held while its body is transformed
        chunks: list[bytes] = []

        async def wrapped_send(msg):
            nonlocal started, held, kept
            if refused is not None:  # BentoML's answer to the exception limited_receive raised
                if msg["type"] == "http.response.start" and not started:
                    started = True
                    resp = _error_response(path, refused.code, refused.message, rid, fhir_errors)
                    outcome.update(status=resp.status_code, code=refused.code)
                    await resp(scope, _no_receive, send)
                return
            if msg["type"] == "http.response.start":
                started = True
                headers = [(k, v) for k, v in msg.get("headers", [])]
                code = next(
                    (v.decode() for k, v in headers if k.lower() == E.ERROR_HEADER.encode()),
                    None,
                )
                status = msg["status"]
                outcome.update(status=status, code=code or ("ok" if status < 400 else None))
                if status >= 400 and (code is None or fhir_errors):
                    held = msg  # BentoML's own error, or ours for a FHIR client: rewritten
                    return
                headers.append((b"x-request-id", rid.encode()))
                msg = {**msg, "headers": headers}
                if status == 200 and transform is not None:
                    kept = msg
                    return
            elif msg["type"] == "http.response.body" and kept is not None:
                chunks.append(msg.get("body", b""))
                if msg.get("more_body"):
                    return
                return await self._send_transformed(kept, b"".join(chunks), transform, scope,
                                                    send, rid, outcome)  # fmt: skip
            elif msg["type"] == "http.response.body" and held is not None:
                chunks.append(msg.get("body", b""))
                if msg.get("more_body"):
                    return
                code = next((v.decode() for k, v in held.get("headers", [])
                             if k.lower() == E.ERROR_HEADER.encode()), None)  # fmt: skip
                if code is None:
                    code, message = _translate(held["status"], b"".join(chunks), path)
                else:  # the envelope, as an OperationOutcome
                    message = E.envelope_message(b"".join(chunks))
                resp = _error_response(path, code, message, rid, fhir_errors)
                outcome.update(status=resp.status_code, code=code)
                return await resp(scope, _no_receive, send)
            await send(msg)

        try:
            await self.app(scope, limited_receive, wrapped_send)
        except BodyRefused as e:
            if not started:
                await reply(e.code, e.message)
            outcome.update(status=E.http_status(e.code), code=e.code)

    async def _send_transformed(self, start, body, transform, scope, send, rid, outcome):
        try:
            body, ctype = transform(body)
        except Exception as e:  # noqa: BLE001 - an envelope then; the error's text may quote data
            logger.error("request_id=%s could not convert the answer: %s", rid, type(e).__name__)
            resp = E.error_response(E.INTERNAL, "the result could not be converted", rid)
            outcome.update(status=resp.status_code, code=E.INTERNAL)
            return await resp(scope, _no_receive, send)
        drop = {b"content-length"} | ({b"content-type"} if ctype else set())
        headers = [(k, v) for k, v in start["headers"] if k.lower() not in drop]
        headers.append((b"content-length", str(len(body)).encode()))
        if ctype:
            headers.append((b"content-type", ctype.encode()))
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def _metrics(scope, receive, send):
    """Prometheus exposition of every process of the service (BentoML's workers write
    multi-process files; BentoML's own ``/metrics`` is off on this service, see ``service.app``)."""
    import os

    import anyio
    import prometheus_client as pc
    from prometheus_client import multiprocess
    from starlette.responses import Response

    def render() -> bytes:
        # prometheus_client's own variable (set by BentoML), not a mam.settings one.
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = pc.CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            for collector in scrape_collectors():  # computed at scrape time (reviews' agreement)
                registry.register(collector)
            return pc.generate_latest(registry)
        return pc.generate_latest()

    body = await anyio.to_thread.run_sync(render)
    await Response(body, media_type=pc.CONTENT_TYPE_LATEST)(scope, receive, send)


def _error_response(path: str, code: str, message: str, rid: str, fhir: bool = False):
    """The service's envelope, or on the v2 routes the protocol's error body, or for a FHIR
    client (``fhir``) an OperationOutcome."""
    if path == V2_PREFIX or path.startswith(V2_PREFIX + "/"):
        return E.v2_error_response(code, message)
    if fhir:
        return E.fhir_error_response(code, message, rid)
    return E.error_response(code, message, rid)


def _printable(text: str, limit: int = 80) -> str:
    return "".join(c if c.isprintable() else "?" for c in text[:limit]) or "none"


def _lower_media_type(scope) -> None:
    """``Multipart/Form-Data; boundary=X`` -> ``multipart/form-data; boundary=X`` (the boundary
    itself is case-sensitive)."""
    headers = []
    for k, v in scope.get("headers", ()):
        if k == b"content-type":
            media, sep, params = v.partition(b";")
            v = media.strip().lower() + sep + params
        headers.append((k, v))
    scope["headers"] = headers


async def _no_receive():
    return {"type": "http.disconnect"}


def _translate(status: int, body: bytes, path: str) -> tuple[str, str]:
    """BentoML's own error responses -> (code, message) of the envelope."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        data = {"error": body.decode("utf-8", "replace")[:500]}
    if isinstance(data, list) and data:  # BentoML wraps some errors in a 1-tuple
        data = data[0]
    if not isinstance(data, dict):
        data = {"error": str(data)[:500]}
    message = str(data.get("error") or data.get("detail") or E.reason(status))
    detail = data.get("detail") if isinstance(data.get("detail"), list) else []
    if status == 400 and detail:
        parts = []
        for d in detail:
            loc = ".".join(str(x) for x in d.get("loc", ()))
            parts.append(f"{loc}: {d.get('msg', '')}" if loc else str(d.get("msg", "")))
            if "Invalid content type" in str(d.get("msg", "")):
                return E.UNSUPPORTED_MEDIA_TYPE, "; ".join(parts)
        locs = {str(d.get("loc", ("",))[0]) for d in detail if d.get("loc")}
        text = "; ".join(parts)
        if "infant" in locs:
            return "invalid_infant_data", f"invalid infant data: {text}"
        return E.MALFORMED, f"malformed request: {text}"
    if status == 503:
        return E.OVERLOADED, "the service is at capacity; retry with back-off"
    if status >= 500:
        return E.INTERNAL, "unexpected server error; it has been logged with this request id"
    mapping = {400: E.MALFORMED, 404: E.NOT_FOUND, 405: E.METHOD_NOT_ALLOWED,
               413: E.TOO_LARGE, 415: E.UNSUPPORTED_MEDIA_TYPE}  # fmt: skip
    return mapping.get(status, E.MALFORMED), message
