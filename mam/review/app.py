"""The review and annotation web app: a Starlette application over one batch output folder.

Pages: the worklist (``/``), a recording (``/r/<rid>``: the video synchronised with the per-clip
P(FMs) timeline, the top FMs clips, the skeleton overlay, the reviewer's judgement; for a senior
every assessor's review and the sign-off), the agreement between assessors (``/agreement``), the
export (``/export``), the access log (``/audit``) and the login (``/login``).

Each assessor reviews independently (their own review, :mod:`mam.review.store`). In blind mode
(``mam review --blind``, ``MAM_REVIEW_BLIND=1``, or set for the worklist by an admin) the model's
result (label, P(risk), FMs frequency and category, the P(FMs) timeline, top clips, domain) is
left out of the pages and their JSON until that user has marked their own review done or the
recording is signed off. Roles (:mod:`mam.review.auth`): a senior signs off and amends, an admin
exports, reads the access log and sets blind mode. JSON under
``/api/r/<rid>`` saves the reviewer's changes one at a time as they work
(:mod:`mam.review.store`). ``/r/<rid>/video`` serves the recording with HTTP range requests
(Starlette's ``FileResponse``), so the player can seek.

Security, in one place (:class:`Gate`, the outermost layer):

* every path but ``/login`` needs a session, including static files and unknown paths (so
  nothing can be probed); pages redirect to the login, everything else answers 401;
* every request that changes something (not GET/HEAD) carries the session's CSRF token in an
  ``X-CSRF-Token`` header or a ``csrf_token`` form field, else 403; the login form has its own
  double-submit token;
* the session cookie is ``HttpOnly; SameSite=Strict`` (``Secure`` over https, or always with
  ``MAM_REVIEW_SECURE_COOKIE=1``), the token is random and the store keeps only its hash;
* failed logins slow down the client that makes them, per name (:class:`mam.review.auth.
  Throttle`: 429 with ``Retry-After``), without locking the name; logins, failed logins,
  logouts, exports and downloads go to the access log in the store (``/audit``);
* the browser only ever names a recording by its opaque id; files come from
  :meth:`mam.review.catalog.Catalog.locate`, which refuses anything outside the archive root;
* a strict Content-Security-Policy (scripts and styles from the app itself; no CDN: everything
  is served from ``mam/review/static``), ``no-store`` caching, no framing;
* errors are logged with their type only, never with a message, path, id or value.

Mount it in another ASGI app (the screening service does, at ``/review``): URLs are built from
the request's ``root_path``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import secrets
import threading
import time
import traceback
import uuid
import zipfile
from collections import OrderedDict
from pathlib import Path
from urllib.parse import parse_qs, quote

import jinja2
from markupsafe import Markup
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from mam import DISCLAIMER, __version__
from mam.batch.report import REVIEW_NOTE
from mam.gma import FMS_CATEGORIES, GROUP_OF, GROUPS
from mam.presentation import mmss
from mam.presentation import probability as _prob
from mam.review import pose as P
from mam.review import study as S
from mam.review.agreement import agreement_row, assessors_agreement, summarise, summarise_assessors
from mam.review.auth import Authenticator, Throttle, new_token, same, token_digest
from mam.review.catalog import Catalog, Recording, model_identity
from mam.review.config import ReviewConfig
from mam.review.export import ExportError, export_annotations
from mam.review.store import (
    CATEGORIES,
    CATEGORY_LABELS,
    FINAL,
    NO_GROUP,
    OUTCOME,
    OUTCOMES,
    Gone,
    Locked,
    NotFound,
    ReviewInputError,
    ReviewStore,
)

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SESSION_COOKIE = "mam_review_session"
LOGIN_COOKIE = "mam_review_login"
SAFE_METHODS = frozenset({"GET", "HEAD"})
MAX_BODY = 1 << 20
_RID = r"rec-[0-9a-f]{16}"
_NEXT = re.compile(rf"^/(r/{_RID}|export|audit|agreement|study)?$")
MEDIA_TYPES = {".mp4": "video/mp4", ".m4v": "video/mp4", ".mov": "video/quicktime",
               ".webm": "video/webm", ".mkv": "video/x-matroska",
               ".avi": "video/x-msvideo"}  # fmt: skip
STATE_LABELS = {"not_reviewed": "not reviewed", "in_progress": "in progress", "done": "done"}
DEMO_WARNING = "demo weights, trained on simulated movement, not for clinical use"
# A classification that the FMs category would not give (the category alone says the opposite).
_AT_ODDS = {"risk": ("continuous", "intermittent"), "normal": ("sporadic", "absent")}


def _root(request: Request) -> str:
    return request.scope.get("root_path", "").rstrip("/")


def _route_path(scope) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        path = path[len(root) :]
    return path or "/"


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _json_error(status: int, code: str, message: str, **extra) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, **extra}}, status)


def _csp(nonce: str) -> str:
    return (
        "default-src 'none'; script-src 'self'; "
        f"style-src 'self' 'nonce-{nonce}'; img-src 'self' data:; media-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    )


class Gate:
    """Login, CSRF, security headers and error containment in front of every route."""

    def __init__(self, app, review: ReviewApp) -> None:
        self.app, self.review = app, review

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        nonce = secrets.token_urlsafe(16)
        state = scope.setdefault("state", {})
        state["csp_nonce"] = nonce
        path = _route_path(scope)
        method = scope.get("method", "GET")
        started = False
        static = path.startswith("/static/")

        async def send_with_headers(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
                headers = [(k, v) for k, v in msg.get("headers", [])
                           if k.lower() not in (b"cache-control",) or static]  # fmt: skip
                headers += [
                    (b"content-security-policy", _csp(nonce).encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer"),
                ]
                if not static:
                    headers.append((b"cache-control", b"no-store"))
                msg = {**msg, "headers": headers}
            await send(msg)

        try:
            if path != "/login":
                session = await run_in_threadpool(self.review.session_of, _cookie(scope))
                if session is None:
                    resp = self._unauthenticated(scope, path, method)
                    return await resp(scope, receive, send_with_headers)
                state["review_session"] = session
                if method not in SAFE_METHODS:
                    token = _header(scope, b"x-csrf-token")
                    if token is None and _is_form(scope):
                        body = await _read_body(receive)
                        if body is None:
                            resp = _json_error(413, "too_large", "request body too large")
                            return await resp(scope, receive, send_with_headers)
                        token = (parse_qs(body.decode("latin-1")).get("csrf_token") or [None])[0]
                        receive = _replay(body)
                    if not same(token, session.csrf):
                        resp = _json_error(403, "csrf", "missing or wrong CSRF token; reload")
                        return await resp(scope, receive, send_with_headers)
            await self.app(scope, receive, send_with_headers)
        except Exception as e:  # noqa: BLE001 - logged by type only: messages may carry data
            where = traceback.extract_tb(e.__traceback__)[-1]
            logger.error("review: %s at %s:%d", type(e).__name__, Path(where.filename).name,
                         where.lineno)  # fmt: skip
            if not started:
                resp = _json_error(500, "internal_error", "something went wrong; try again")
                await resp(scope, receive, send_with_headers)

    def _unauthenticated(self, scope, path: str, method: str) -> Response:
        accept = _header(scope, b"accept") or ""
        if method == "GET" and "text/html" in accept and _NEXT.match(path):
            root = scope.get("root_path", "").rstrip("/")
            nxt = "" if path == "/" else f"?next={quote(path)}"
            return RedirectResponse(f"{root}/login{nxt}", 303)
        return _json_error(401, "unauthorized", "log in first")


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


def _cookie(scope) -> str | None:
    raw = _header(scope, b"cookie") or ""
    for part in raw.split(";"):
        k, _, v = part.strip().partition("=")
        if k == SESSION_COOKIE and v:
            return v
    return None


def _is_form(scope) -> bool:
    ctype = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
    return ctype == "application/x-www-form-urlencoded"


async def _read_body(receive) -> bytes | None:
    chunks, size = [], 0
    while True:
        msg = await receive()
        if msg["type"] != "http.request":
            break
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            return None
        chunks.append(chunk)
        if not msg.get("more_body"):
            break
    return b"".join(chunks)


def _replay(body: bytes):
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


class _Export:
    """The export button's one job at a time, kept in the store as it starts and ends: after a
    restart a finished export can still be downloaded, and one the restart cut short says so
    (state ``interrupted``)."""

    def __init__(self, store: ReviewStore, exports_dir: Path) -> None:
        self.lock = threading.Lock()
        self.store, self.exports_dir = store, exports_dir
        self.state = "idle"  # idle | running | done | failed | interrupted
        self.done = self.total = 0
        self.folder: Path | None = None
        self.summary: dict | None = None
        self.message = ""
        self.by = ""
        self.client = ""
        self.at = 0.0
        kept = store.export_job()
        if kept:
            self.state, self.done, self.total = kept["state"], kept["done"], kept["total"]
            name = kept.get("name")
            self.folder = exports_dir / name if name and "/" not in name else None
            self.summary, self.message = kept.get("summary"), kept.get("message") or ""
            self.by, self.at = kept.get("by") or "", kept.get("at") or 0.0
            if self.state == "running":  # this process did not start it: the app stopped
                self.state = "interrupted"
                self.message = "the app stopped before this export finished; start it again"
                self.save()

    def as_dict(self) -> dict:
        return {"state": self.state, "done": self.done, "total": self.total,
                "name": self.folder.name if self.folder else None, "summary": self.summary,
                "message": self.message, "by": self.by, "at": self.at}  # fmt: skip

    def save(self) -> None:
        self.store.save_export_job(self.as_dict())


class ReviewApp:
    """What the routes share: the catalog, the store, the login check, the pose jobs.

    Args:
        config: :class:`mam.review.config.ReviewConfig`.
    """

    def __init__(self, config: ReviewConfig) -> None:
        self.config = config
        self.catalog = Catalog(config.out_dir, config.archive_root)
        self.store = ReviewStore(config.database_url)
        self.auth = Authenticator(config.users_file, config.key_hashes)
        self.throttle = Throttle(self.store)
        self.poses = P.PoseJobs(config.out_dir)
        self.export = _Export(self.store, config.exports_dir)
        self._overlays: OrderedDict[str, dict] = OrderedDict()
        self._rows: tuple[tuple | None, dict[str, tuple]] = (None, {})
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self.env.filters["mmss"] = mmss
        self.env.filters["prob"] = _prob
        self.env.globals.update(DISCLAIMER=DISCLAIMER, VERSION=__version__,
                                STATE_LABELS=STATE_LABELS, CATEGORY_LABELS=CATEGORY_LABELS,
                                DEMO_WARNING=DEMO_WARNING)  # fmt: skip
        self._models: tuple[tuple | None, list[dict]] = (None, [])
        # The login page carries the stylesheet inline (nothing else is served before login);
        # it is the package's own file, so it is marked safe rather than HTML-escaped.
        self.css = Markup((HERE / "static" / "review.css").read_text())
        self.fhir_outbox = self.fhir_worker = self.fhir_client = None
        if config.fhir_base_url:
            from mam.fhir import FhirCodes
            from mam.fhir.outbox import FhirClient, Outbox, check_url, make_auth

            url = check_url(config.fhir_base_url, "MAM_FHIR_BASE_URL")
            self.fhir_client = FhirClient(url, make_auth(**config.fhir_auth))
            self.fhir_codes = FhirCodes.from_env()
            self.fhir_outbox = Outbox(config.fhir_outbox)

    def start(self) -> None:
        """Start delivering the FHIR outbox (when push is configured)."""
        from mam.fhir.outbox import OutboxWorker

        if self.fhir_outbox is not None and self.fhir_worker is None:
            self.fhir_worker = OutboxWorker(self.fhir_outbox, self.fhir_client).start()

    def close(self, drain_s: float = 10.0) -> None:
        if self.fhir_worker is not None:  # drained, not dropped: what is left stays queued
            self.fhir_worker.drain(drain_s)
            self.fhir_worker = None
        if self.fhir_outbox is not None:
            self.fhir_client.close()
            self.fhir_outbox.close()
            self.fhir_outbox = None
        self.poses.close()
        self.store.close()

    # -- sessions --------------------------------------------------------------------------------
    def session_of(self, token: str | None):
        if not token or len(token) > 200:
            return None
        return self.store.session(token_digest(token))

    def render(self, request: Request, name: str, status: int = 200, **ctx) -> HTMLResponse:
        s = request.scope.get("state", {})
        session = s.get("review_session")
        roles = self.auth.roles(session.reviewer) if session else frozenset()
        ctx.setdefault("models", self.models() if session else [])
        html = self.env.get_template(name).render(
            root=_root(request), nonce=s.get("csp_nonce", ""), session=session,
            csrf=session.csrf if session else "", roles=roles, blind=self.blind(), **ctx,
        )  # fmt: skip
        return HTMLResponse(html, status)

    # -- roles and blind review ------------------------------------------------------------------
    def roles(self, request: Request) -> frozenset[str]:
        return self.auth.roles(request.state.review_session.reviewer)

    def forbidden(self, request: Request, role: str) -> Response:
        """403: the page (or JSON envelope) says which role is needed."""
        msg = f"This needs the {role} role; ask an admin (mam review DIR --add-user NAME --role)."
        if "text/html" in request.headers.get("accept", ""):
            return self.render(request, "error.html", 403, title="Not allowed", message=msg)
        return _json_error(403, "forbidden", msg)

    def blind(self) -> bool:
        """Blind review: for the deployment (``--blind``) or set for the worklist by an admin."""
        return bool(self.config.blind) or bool(self.store.setting("blind", False))

    def revealed(self, summary: dict, user: str, blind: bool | None = None) -> bool:
        """Whether ``user`` may see the model's result of a recording (``summaries`` entry):
        always unless blind; in blind mode once their own review is done or it is signed off.
        ``blind``: :meth:`blind`, when the caller has it already."""
        if not (self.blind() if blind is None else blind):
            return True
        reviews = summary.get("reviews", {})
        return (reviews.get(user, {}).get("state") == "done"
                or reviews.get(FINAL, {}).get("state") == "signed_off")  # fmt: skip

    def models(self) -> list[dict]:
        """The models whose results the worklist holds (name, version, digest prefix, demo)."""
        stamp, recs = self.catalog.snapshot()
        if self._models[0] != stamp:
            seen = {}
            for r in recs:
                m = r.summary.get("model")
                if m:
                    seen[(m["name"], m["version"], m["digest"])] = m
            self._models = (stamp, list(seen.values()))
        return self._models[1]

    # -- login -----------------------------------------------------------------------------------
    def login_page(
        self, request: Request, status: int = 200, message: str = "", nxt: str | None = None,
        name: str = "", retry_after: int | None = None,
    ) -> Response:  # fmt: skip
        token = request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(24)
        nxt = request.query_params.get("next", "") if nxt is None else nxt
        resp = self.render(
            request, "login.html", status, message=message, login_csrf=token,
            next=nxt if _NEXT.match(nxt) else "", css=self.css,
            configured=self.auth.configured, login_name=name[:64],
        )  # fmt: skip
        if retry_after is not None:
            resp.headers["retry-after"] = str(retry_after)
        self._cookie(request, resp, LOGIN_COOKIE, token, max_age=3600)
        return resp

    def log(self, request: Request, event: str, user: str, outcome: str) -> None:
        """One line of the access log (never a password, never a recording)."""
        self.store.log_event(event, user, _client(request), outcome)

    def _logged_name(self, name: str) -> str:
        # Only names of the users file are logged as typed: a failed login's "name" may be a
        # password typed into the wrong field.
        return name if self.auth.known(name) else "(unknown name)"

    async def login(self, request: Request) -> Response:
        if request.method == "GET":
            return self.login_page(request)
        body = await _read_body(request.receive)
        if body is None:
            return PlainTextResponse("request body too large", 413)
        form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
        if not same(form.get("csrf_token"), request.cookies.get(LOGIN_COOKIE)):
            return self.login_page(request, 403, "The login form expired; please try again.")
        name = (form.get("name") or "").strip()
        nxt = form.get("next") or ""
        client = _client(request)
        wait = await run_in_threadpool(self.throttle.wait_s, client, name)
        if wait > 0:
            await run_in_threadpool(self.log, request, "login", self._logged_name(name),
                                    "throttled")  # fmt: skip
            secs = max(1, int(wait + 0.999))
            return self.login_page(request, 429, f"Too many failed logins from this computer "
                                   f"for this name: wait {secs} s and try again.", nxt, name,
                                   retry_after=secs)  # fmt: skip
        reviewer = await run_in_threadpool(self.auth.check, name, form.get("password") or "")
        if reviewer is None:
            await run_in_threadpool(self.throttle.failed, client, name)
            await run_in_threadpool(self.log, request, "login", self._logged_name(name), "failed")
            return self.login_page(request, 401, "Wrong name or password.", nxt, name)
        await run_in_threadpool(self.throttle.succeeded, client, name)
        await run_in_threadpool(self.log, request, "login", reviewer, "ok")
        token, digest = new_token()
        await run_in_threadpool(self.store.create_session, digest, reviewer,
                                secrets.token_hex(32), self.config.session_ttl_s)  # fmt: skip
        resp = RedirectResponse(_root(request) + (nxt if _NEXT.match(nxt) else "/"), 303)
        self._cookie(request, resp, SESSION_COOKIE, token, max_age=int(self.config.session_ttl_s))
        resp.delete_cookie(LOGIN_COOKIE, path=self._cookie_path(request),
                           secure=self._secure(request))  # fmt: skip
        return resp

    def logout(self, request: Request) -> Response:
        token = request.cookies.get(SESSION_COOKIE)
        if token:
            self.store.delete_session(token_digest(token))
        self.log(request, "logout", request.state.review_session.reviewer, "ok")
        resp = RedirectResponse(_root(request) + "/login", 303)
        resp.delete_cookie(SESSION_COOKIE, path=self._cookie_path(request), httponly=True,
                           samesite="strict", secure=self._secure(request))  # fmt: skip
        return resp

    def _cookie_path(self, request: Request) -> str:
        return _root(request) or "/"

    def _secure(self, request: Request) -> bool:
        secure = self.config.secure_cookie
        return request.url.scheme == "https" if secure is None else secure

    def _cookie(self, request, resp: Response, name: str, value: str, max_age: int) -> None:
        resp.set_cookie(name, value, max_age=max_age, path=self._cookie_path(request),
                        httponly=True, samesite="strict",
                        secure=self._secure(request))  # fmt: skip

    # -- pages -----------------------------------------------------------------------------------
    def worklist(self, request: Request) -> Response:
        stamp, recs = self.catalog.snapshot()
        user = request.state.review_session.reviewer
        reviews = self.store.summaries(user)
        root = _root(request)
        # The model's half of a row changes only with its ledger row: rendered once and kept
        # (a batch still running changes the ledger often; only new rows are rendered). The
        # cache is one (key, rows) pair, replaced whole, so concurrent requests never mix two.
        key, cached = self._rows
        if key != (stamp, root):
            macros = self.env.get_template("_worklist_row.html").module
            old = cached if key is not None and key[1] == root else {}
            cached = {
                r.rid: old[r.rid] if r.rid in old and old[r.rid][0] is r
                else (r, macros.attrs(r, r.summary), macros.cells(r, r.summary, root),
                      macros.attrs(r, r.summary, True), macros.cells(r, r.summary, root, True))
                for r in recs
            }  # fmt: skip
            self._rows = ((stamp, root), cached)
        rows, counts = [], {"not_reviewed": 0, "in_progress": 0, "done": 0}
        blind = self.blind()
        hidden = S.hidden_rids(self.store, user)
        for n, rec in enumerate(recs, start=1):
            rv = reviews.get(rec.rid, {})
            state = rv.get("state", "not_reviewed")
            counts[state] = counts.get(state, 0) + 1
            _, attrs, cells, blind_attrs, blind_cells = cached[rec.rid]
            if not self.revealed(rv, user, blind) or rec.rid in hidden:
                attrs, cells = blind_attrs, blind_cells
            others = rv.get("reviews", {})
            rv = {**rv, "signed_off": others.get(FINAL, {}).get("state") == "signed_off",
                  "final": others.get(FINAL, {}),
                  "finished": sum(v.get("state") == "done" for k, v in others.items()
                                  if k != FINAL)}  # fmt: skip
            rows.append((n, rec, attrs, cells, state, rv))
        return self.render(request, "worklist.html", rows=rows, counts=counts,
                           total=len(recs), can_blind=not self.config.blind)  # fmt: skip

    def recording(self, request: Request) -> Response:
        rec = self._rec(request)
        if rec is None:
            return self.render(request, "error.html", 404, title="No such recording",
                               message="There is no recording with this id in the batch "
                               "output.")  # fmt: skip
        result = rec.result() if rec.status == "done" else None
        video = self.catalog.locate(rec) if rec.kind == "video" else None
        missing = "" if video is not None or rec.kind != "video" else self.catalog.why_missing(rec)
        user = request.state.review_session.reviewer
        roles = self.roles(request)
        summary = self.store.summaries(user).get(rec.rid, {})
        # A study's without-assistance session still to come hides the model here too.
        shown = self.revealed(summary, user) and rec.rid not in S.hidden_rids(self.store, user)
        signed = self.store.signed_off(rec.rid)
        reviews = self.store.reviews(rec.rid) if result is not None else {}
        final = reviews.pop(FINAL, None)
        senior = None
        if result is not None and "senior" in roles:
            done = {k: v for k, v in reviews.items()
                    if v["fields"].get("state", {}).get("value") == "done"}  # fmt: skip
            agree = assessors_agreement(rec.id, result, done)
            senior = {"reviews": reviews, "pairs": agree["pairs"],
                      "model": agree["model"] if shown else []}  # fmt: skip
        outcome = self.store.annotation(rec.rid, OUTCOME)["fields"]
        model = model_identity(result.model.model_dump()) if result is not None else None
        data = None
        if result is not None:
            top = [c.index for c in result.top_fms_clips] if shown else []
            data = {
                "rid": rec.rid,
                "duration": _duration(result),
                "clips": [
                    {
                        "i": c.index,
                        "start": c.start_s,
                        "end": c.end_s,
                        **({"p": round(c.fms_probability, 4)} if shown else {}),
                    }
                    for c in result.clips
                ],  # fmt: skip
                "top": top,
                "video": video is not None,
                "kind": rec.kind,
                "group_of": GROUP_OF,
                "no_group": list(NO_GROUP),
                "reviewer": user,
                "blind": not shown,
                "signed_off": signed,
            }
        at_odds = result is not None and result.fms_category in _AT_ODDS.get(
            result.classification.label, ())  # fmt: skip
        return self.render(
            request, "recording.html", rec=rec, result=result, video=video is not None,
            missing=missing, data=data, timeline=_timeline(result) if result else None,
            categories=CATEGORIES, groups=GROUPS, review_note=REVIEW_NOTE, shown=shown,
            signed=signed, final=final, senior=senior, outcome=outcome, outcomes=OUTCOMES,
            model=model, at_odds=at_odds, no_group=NO_GROUP,
            fms_categories=FMS_CATEGORIES, models=[model] if model else self.models(),
        )  # fmt: skip

    def export_page(self, request: Request) -> Response:
        if "admin" not in self.roles(request):
            return self.forbidden(request, "admin")
        states = self.store.summaries()
        signed = sum(s["reviews"].get(FINAL, {}).get("state") == "signed_off"
                     for s in states.values())  # fmt: skip
        done = sum(any(v.get("state") == "done" for k, v in s["reviews"].items() if k != FINAL)
                   for s in states.values())  # fmt: skip
        return self.render(request, "export.html", done=done, signed=signed,
                           job=self.export.as_dict())  # fmt: skip

    def audit_page(self, request: Request) -> Response:
        """The access log, newest first (admins only)."""
        if "admin" not in self.roles(request):
            return self.forbidden(request, "admin")
        events = self.store.events(500)[::-1]
        for e in events:
            e["time"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e["at"]))
        return self.render(request, "audit.html", events=events)

    # -- files -----------------------------------------------------------------------------------
    def video(self, request: Request) -> Response:
        rec = self._rec(request)
        if rec is None:
            return _json_error(404, "not_found", "no such recording")
        if rec.kind != "video":
            return _json_error(404, "no_video", "this recording is a pose file: no video")
        path = self.catalog.locate(rec)
        if path is None:
            return _json_error(404, "recording_missing", self.catalog.why_missing(rec))
        media = MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream")
        return FileResponse(path, media_type=media)

    def pose(self, request: Request) -> Response:
        rec = self._rec(request)
        if rec is None or rec.status != "done":
            return _json_error(404, "not_found", "no such screened recording")
        if rec.kind != "video":
            return _json_error(404, "no_video", "a pose file has no video to draw on")
        backend = rec.summary.get("pose_backend") or ""
        key = f"{backend}:{rec.sha256}"
        cached = self.poses.cached(backend, rec.sha256)
        if cached is not None:
            payload = self._overlays.get(key)
            if payload is None:
                payload = P.overlay_payload(cached)
                self._overlays[key] = payload
                while len(self._overlays) > 8:
                    self._overlays.popitem(last=False)
            else:
                self._overlays.move_to_end(key)
            return JSONResponse({"state": "done", "backend": backend, "overlay": payload})
        job = self.poses.status(key)
        if request.method == "POST" and (job is None or job.state == "failed"):
            video = self.catalog.locate(rec)
            if video is None:
                return _json_error(404, "recording_missing", self.catalog.why_missing(rec))
            job = self.poses.start(key, video, rec.sha256, backend)
        if job is None:
            return JSONResponse({"state": "none", "backend": backend})
        return JSONResponse(
            {"state": job.state, "backend": backend, "done": job.done, "total": job.total,
             "code": job.code, "message": job.message},
            202 if job.state == "running" else 200,
        )  # fmt: skip

    # -- annotation API --------------------------------------------------------------------------
    def _rec(self, request: Request) -> Recording | None:
        return self.catalog.get(request.path_params["rid"])

    def _reviewable(self, request: Request) -> tuple[Recording | None, Response | None]:
        rec = self._rec(request)
        if rec is None:
            return None, _json_error(404, "not_found", "no such recording")
        if rec.status != "done":
            return None, _json_error(409, "not_screened", "only screened recordings are reviewed")
        return rec, None

    def annotation(self, request: Request) -> Response:
        rec, err = self._reviewable(request)
        if err:
            return err
        user = request.state.review_session.reviewer
        ann = self.store.annotation(rec.rid, user)
        senior = "senior" in self.roles(request)
        ann["history"] = self.store.history(rec.rid, 100, None if senior else user)
        ann["signed_off"] = self.store.signed_off(rec.rid)
        return JSONResponse(ann)

    async def _body(self, request: Request) -> dict:
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise ReviewInputError("request body too large")
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            raise ReviewInputError("the body is not JSON") from None
        if not isinstance(body, dict):
            raise ReviewInputError("the body must be a JSON object")
        return body

    async def set_fields(self, request: Request) -> Response:
        rec, err = self._reviewable(request)
        if err:
            return err
        try:
            changes = (await self._body(request)).get("changes")
            if not isinstance(changes, dict) or not changes or len(changes) > 50:
                raise ReviewInputError("send {'changes': {field: {'value', 'base_rev'}}}")
            parsed = {}
            for name, ch in changes.items():
                if not isinstance(ch, dict) or "value" not in ch:
                    raise ReviewInputError("each change is {'value': ..., 'base_rev': N}")
                base = ch.get("base_rev")
                if base is not None and not isinstance(base, int):
                    raise ReviewInputError("base_rev is the revision the change was made on")
                parsed[name] = (ch["value"], base)
            reviewer = request.state.review_session.reviewer
            fields, overwrote = await run_in_threadpool(
                self.store.set_fields, rec.rid, reviewer, parsed
            )
        except ReviewInputError as e:
            return _json_error(400, "invalid", str(e))
        except Locked as e:
            return _locked(e)
        return JSONResponse({"fields": fields, "overwrote": overwrote})

    async def add_interval(self, request: Request) -> Response:
        rec, err = self._reviewable(request)
        if err:
            return err
        try:
            b = await self._body(request)
            iv = await run_in_threadpool(
                self.store.add_interval, rec.rid, request.state.review_session.reviewer,
                b.get("id") or uuid.uuid4().hex, b.get("start_s"), b.get("end_s"),
                rec.summary.get("duration_s"),
            )  # fmt: skip
        except ReviewInputError as e:
            return _json_error(400, "invalid", str(e))
        except Locked as e:
            return _locked(e)
        return JSONResponse({"interval": iv}, 201)

    async def edit_interval(self, request: Request) -> Response:
        rec, err = self._reviewable(request)
        if err:
            return err
        iid = request.path_params["iid"]
        reviewer = request.state.review_session.reviewer
        try:
            if request.method == "DELETE":
                base = request.query_params.get("base_rev")
                over = await run_in_threadpool(
                    self.store.delete_interval, rec.rid, reviewer, iid,
                    int(base) if base and base.isdigit() else None,
                )  # fmt: skip
                return JSONResponse({"deleted": iid, "overwrote": over})
            b = await self._body(request)
            base = b.get("base_rev")
            iv, over = await run_in_threadpool(
                self.store.update_interval, rec.rid, reviewer, iid, b.get("start_s"),
                b.get("end_s"), base if isinstance(base, int) else None,
                rec.summary.get("duration_s"),
            )  # fmt: skip
            return JSONResponse({"interval": iv, "overwrote": over})
        except ReviewInputError as e:
            return _json_error(400, "invalid", str(e))
        except NotFound:
            return _json_error(404, "not_found", "no such interval")
        except Locked as e:
            return _locked(e)
        except Gone as e:
            return _json_error(409, "deleted", "another reviewer deleted this interval; your "
                               "change was not saved", by=e.by, at=e.at)  # fmt: skip

    # -- sign-off, outcomes, agreement, settings -------------------------------------------------
    async def _form(self, request: Request) -> dict[str, str]:
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise ReviewInputError("request body too large")
        return {k: v[0] for k, v in parse_qs(raw.decode("utf-8", "replace")).items()}

    def _form_error(self, request: Request, rec: Recording, status: int, msg: str) -> Response:
        return self.render(request, "error.html", status, title="Not saved", message=msg,
                           back=f"{_root(request)}/r/{rec.rid}")  # fmt: skip

    async def sign_off(self, request: Request) -> Response:
        """The senior's final verdict (a form): category, group, note, the FMs intervals of
        one assessor (``intervals_from``: a name, ``final`` to keep the final's, or empty:
        none), and for an amendment of a signed-off verdict its ``reason``."""
        rec, err = self._reviewable(request)
        if err:
            return err
        if "senior" not in self.roles(request):
            return self.forbidden(request, "senior")
        senior = request.state.review_session.reviewer
        try:
            form = await self._form(request)
            src = form.get("intervals_from") or ""
            owner = FINAL if src == "final" else src
            reviews = self.store.reviews(rec.rid)
            if src and owner not in reviews:
                raise ReviewInputError("the FMs intervals come from a review of this recording")
            ivs = reviews[owner]["intervals"] if src else []
            amend = form.get("action") == "amend"
            final = await run_in_threadpool(
                self.store.sign_off, rec.rid, senior, form.get("category"),
                form.get("group"), form.get("note") or None,
                [(i["start_s"], i["end_s"]) for i in ivs],
                (form.get("reason") or "") if amend else None, rec.summary.get("duration_s"),
            )  # fmt: skip
        except ReviewInputError as e:
            return self._form_error(request, rec, 400, f"{e}.")
        except Locked as e:
            return self._form_error(request, rec, 403, f"Already signed off by {e.by}: a "
                                    "change is an amendment with a reason.")  # fmt: skip
        if self.fhir_outbox is not None:
            reason = (form.get("reason") or "").strip() if amend else None
            await run_in_threadpool(self.push_sign_off, rec, senior, final, reason)
        return RedirectResponse(f"{_root(request)}/r/{rec.rid}#signoff", 303)

    def push_sign_off(self, rec: Recording, senior: str, final: dict,
                      reason: str | None) -> str | None:  # fmt: skip
        """Queue the signed-off verdict for the EHR: the result's DiagnosticReport ``final``
        (``amended`` with a ``reason``) with ``senior`` as its interpreter and verifier. The
        sign-off stands whatever happens here; the outbox delivers (and re-delivers) it.
        Returns the outbox's answer (None: nothing queued)."""
        from mam.batch.fhir import row_result_id
        from mam.errors import MamError
        from mam.fhir import FhirContext
        from mam.fhir.bundle import signed_off_bundle

        if rec.key is None or rec.status != "done":
            return None
        verdict = {k: (final["fields"].get(k) or {}).get("value") for k in ("category", "group")}
        try:
            result_id = row_result_id(rec.key, rec.path, rec.id)
            sha = rec.sha256 if re.fullmatch(r"[0-9a-f]{64}", rec.sha256 or "") else None
            ctx = FhirContext(result_id=result_id, content_sha256=sha)
            bundle = signed_off_bundle(
                None if (first := self._first_bundle(result_id)) else rec.result(), ctx,
                self.fhir_codes, verdict, senior, "amended" if reason else "final", reason,
                preliminary=first,
            )  # fmt: skip
            outcome = self.fhir_outbox.enqueue(bundle)
        except (MamError, OSError, ValueError) as e:  # never the identifiers: the error class
            logger.warning("FHIR sign-off not queued (%s)", type(e).__name__)
            return None
        if self.fhir_worker is not None:
            self.fhir_worker.wake()
        logger.info("FHIR sign-off %s", outcome)
        return outcome

    def _first_bundle(self, result_id: str) -> dict | None:
        """The result's Bundle in the batch's ``results.fhir.ndjson`` (with the subject, order
        and accession the manifest gave), else None."""
        from mam.batch.fhir import RESULTS_FHIR

        path = self.config.out_dir / RESULTS_FHIR
        if not path.is_file():
            return None
        needle = json.dumps(result_id)
        with open(path, encoding="utf-8") as f:
            for line in f:
                if needle in line:
                    bundle = json.loads(line)
                    if (bundle.get("identifier") or {}).get("value") == result_id:
                        return bundle
        return None

    async def set_outcome(self, request: Request) -> Response:
        """Follow-up outcome of a recording (senior or admin): CP at 2 years and its source."""
        rec = self._rec(request)
        if rec is None:
            return _json_error(404, "not_found", "no such recording")
        if not {"senior", "admin"} & self.roles(request):
            return self.forbidden(request, "senior or admin")
        try:
            form = await self._form(request)
            changes = {"cp_2y": (form.get("cp_2y") or None, None),
                       "outcome_source": (form.get("outcome_source") or "", None)}  # fmt: skip
            await run_in_threadpool(self.store.set_fields, rec.rid,
                                    request.state.review_session.reviewer, changes,
                                    OUTCOME)  # fmt: skip
        except ReviewInputError as e:
            return self._form_error(request, rec, 400, f"{e}.")
        return RedirectResponse(f"{_root(request)}/r/{rec.rid}#outcome", 303)

    def agreement_page(self, request: Request) -> Response:
        """Agreement between the assessors and of each with the model, and of the signed-off
        verdicts with the model, over the recordings reviewed so far (senior or admin)."""
        if not {"senior", "admin"} & self.roles(request):
            return self.forbidden(request, "senior or admin")
        touched = self.store.summaries()
        pairs, versus, finals, rows = [], [], [], []
        for rec in self.catalog.all():
            if rec.rid not in touched or rec.status != "done":
                continue
            reviews = self.store.reviews(rec.rid)
            final = reviews.pop(FINAL, None)
            done = {k: v for k, v in reviews.items()
                    if v["fields"].get("state", {}).get("value") == "done"}  # fmt: skip
            result = rec.result()
            a = assessors_agreement(rec.id, result, done)
            pairs += a["pairs"]
            versus += a["model"]
            signed = final and final["fields"].get("state", {}).get("value") == "signed_off"
            if signed:
                finals.append(agreement_row(rec.id, result, final))
            if done or signed:
                rows.append({"rec": rec, "pairs": a["pairs"], "model": a["model"],
                             "final": finals[-1] if signed else None})  # fmt: skip
        return self.render(request, "agreement.html", rows=rows,
                           summary=summarise_assessors(pairs, versus),
                           finals=summarise(finals))  # fmt: skip

    async def set_blind(self, request: Request) -> Response:
        """Blind review for this worklist on or off (admin; ``--blind`` cannot be undone)."""
        if "admin" not in self.roles(request):
            return self.forbidden(request, "admin")
        form = await self._form(request)
        await run_in_threadpool(self.store.set_setting, "blind", form.get("blind") == "1")
        self.log(request, "blind", request.state.review_session.reviewer,
                 "on" if form.get("blind") == "1" else "off")  # fmt: skip
        return RedirectResponse(_root(request) + "/", 303)

    # -- the assistance study --------------------------------------------------------------------
    def study_page(self, request: Request, status: int = 200, message: str = "") -> Response:
        """The user's study worklist (only the sessions due now, with counts of those waiting
        out their washout); for an admin also every study and the form to create one."""
        user = request.state.review_session.reviewer
        roles = self.roles(request)
        mine = []
        for st in S.list_studies(self.store):
            if user in st.assessors:
                ss = S.sessions(self.store, st, user)
                mine.append({"study": st, "due": [s for s in ss if s["state"] == "due"],
                             "waiting": sum(s["state"] == "waiting" for s in ss),
                             "done": sum(s["state"] == "done" for s in ss)})  # fmt: skip
        every = S.list_studies(self.store) if {"admin", "senior"} & roles else []
        return self.render(request, "study.html", status, mine=mine, every=every,
                           message=message, orders=S.ORDERS, arm_labels=S.ARM_LABELS,
                           users=sorted(self.auth.users()))  # fmt: skip

    async def create_study(self, request: Request) -> Response:
        """An admin defines a study (a form): ``name``, ``recordings`` (ledger ids or rids, one
        a line; empty: every screened recording), ``assessors`` (names, comma-separated),
        ``order``, ``seed``, ``washout_days``, ``washout_recordings``."""
        if "admin" not in self.roles(request):
            return self.forbidden(request, "admin")
        form = await self._form(request)
        screened = [r for r in self.catalog.all() if r.status == "done"]
        by_id = {**{r.id: r.rid for r in screened}, **{r.rid: r.rid for r in screened}}
        wanted = [x.strip() for x in (form.get("recordings") or "").splitlines() if x.strip()]
        unknown = sum(x not in by_id for x in wanted)
        names = [a.strip() for a in (form.get("assessors") or "").split(",") if a.strip()]
        try:
            if unknown:
                raise S.StudyError(f"{unknown} of the recordings are not screened recordings "
                                   "of this worklist")  # fmt: skip
            if not all(self.auth.known(a) for a in names):
                raise S.StudyError("every assessor must be a user of this app")
            await run_in_threadpool(
                lambda: S.create_study(
                    self.store, form.get("name") or "",
                    [by_id[x] for x in wanted] or [r.rid for r in screened], names,
                    order=form.get("order") or "random", seed=form.get("seed") or 0,
                    washout_days=form.get("washout_days") or 0,
                    washout_recordings=form.get("washout_recordings") or 0,
                    by=request.state.review_session.reviewer,
                )
            )  # fmt: skip
        except S.StudyError as e:
            return self.study_page(request, 400, f"Study not created: {e}.")
        return RedirectResponse(_root(request) + "/study", 303)

    def _study_of(self, request: Request):
        try:
            return S.get_study(self.store, request.path_params["study"])
        except S.UnknownStudy:
            return None

    async def study_session(self, request: Request) -> Response:
        """One session of a study: the recording without the model's output, or with its top
        clips by P(FMs); the form records the assessor's group. Only a due session opens."""
        study, rec = self._study_of(request), self._rec(request)
        arm = request.path_params["arm"]
        user = request.state.review_session.reviewer
        if study is None or rec is None or arm not in S.ARMS or rec.rid not in study.recordings:
            return self.render(request, "error.html", 404, title="No such session",
                               message="This study has no such session.")  # fmt: skip
        back = f"{_root(request)}/study"
        if request.method == "POST":
            form = await self._form(request)
            try:
                await run_in_threadpool(S.record_verdict, self.store, study, user, rec.rid, arm,
                                        form.get("group") or "")  # fmt: skip
            except S.NotDue:
                return self.render(request, "error.html", 409, title="Not due",
                                   message="This session is not on your study worklist now.",
                                   back=back)  # fmt: skip
            except S.StudyError as e:
                return self.render(request, "error.html", 400, title="Not saved",
                                   message=f"{e}.", back=back)  # fmt: skip
            return RedirectResponse(back, 303)
        if (rec.rid, arm) not in S.due(self.store, study, user):
            return self.render(request, "error.html", 409, title="Not due",
                               message="This session is not on your study worklist now: done "
                               "already, not yours, or still inside its washout.",
                               back=back)  # fmt: skip
        result = rec.result()
        clips = list(result.top_fms_clips) if arm == "with" else []
        video = rec.kind == "video" and self.catalog.locate(rec) is not None
        unusable = arm == "with" and result.classification.label == "indeterminate"
        return self.render(request, "study_session.html", study=study, rec=rec, arm=arm,
                           arm_label=S.ARM_LABELS[arm], clips=clips, video=video,
                           groups=GROUPS, unusable=unusable)  # fmt: skip

    def study_report(self, request: Request) -> Response:
        """The study's report (senior or admin): against the signed-off verdicts."""
        if not {"senior", "admin"} & self.roles(request):
            return self.forbidden(request, "senior or admin")
        study = self._study_of(request)
        if study is None:
            return self.render(request, "error.html", 404, title="No such study",
                               message="There is no study of that name.")  # fmt: skip
        rep = S.report(self.store, study)
        if "application/json" in request.headers.get("accept", ""):
            return JSONResponse(rep)
        return self.render(request, "study_report.html", rep=rep, arms=S.ARMS,
                           arm_labels=S.ARM_LABELS)  # fmt: skip

    # -- export ----------------------------------------------------------------------------------
    def start_export(self, request: Request) -> Response:
        if "admin" not in self.roles(request):
            return self.forbidden(request, "admin")
        job = self.export
        with job.lock:
            if job.state != "running":
                stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
                folder = self.config.exports_dir / f"export-{stamp}-{secrets.token_hex(2)}"
                job.state, job.done, job.total, job.folder = "running", 0, 0, folder
                job.summary, job.message = None, ""
                job.by, job.at = request.state.review_session.reviewer, time.time()
                job.client = _client(request)
                job.save()
                self.log(request, "export", job.by, "started")
                threading.Thread(target=self._run_export, args=(folder,), daemon=True,
                                 name="review-export").start()  # fmt: skip
        if "application/json" in request.headers.get("accept", ""):
            return JSONResponse(job.as_dict(), 202)
        return RedirectResponse(_root(request) + "/export", 303)

    def _run_export(self, folder: Path) -> None:
        job = self.export

        def progress(done: int, total: int) -> None:
            job.done, job.total = done, total

        try:
            s = export_annotations(self.catalog, self.store, folder, progress)
            job.summary, job.state = s.as_dict(), "done"
        except ExportError as e:
            job.state, job.message = "failed", str(e)
        except Exception as e:  # noqa: BLE001 - reported on the page
            job.state, job.message = "failed", f"the export failed ({type(e).__name__})"
            logger.warning("review: export failed (%s)", type(e).__name__)
        try:
            job.save()
            self.store.log_event("export", job.by, job.client, job.state)
        except Exception as e:  # noqa: BLE001 - the page still shows the job
            logger.warning("review: export job not saved (%s)", type(e).__name__)

    def export_status(self, request: Request) -> Response:
        if "admin" not in self.roles(request):
            return self.forbidden(request, "admin")
        return JSONResponse(self.export.as_dict())

    def export_download(self, request: Request) -> Response:
        job = self.export
        reviewer = request.state.review_session.reviewer
        if "admin" not in self.roles(request):
            self.log(request, "download", reviewer, "forbidden")
            return self.forbidden(request, "admin")
        if job.state != "done" or job.folder is None or not job.folder.is_dir():
            self.log(request, "download", reviewer, "no_export")
            return _json_error(404, "no_export", "no finished export to download")
        self.log(request, "download", reviewer, "ok")
        archive = job.folder.with_suffix(".zip")
        if not archive.is_file():
            # A temporary name of its own: two downloads at once never write into one file.
            tmp = archive.with_name(f".{archive.name}.{uuid.uuid4().hex}.part")
            try:
                with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
                    for f in sorted(job.folder.rglob("*")):
                        if f.is_file():
                            z.write(f, f"{job.folder.name}/{f.relative_to(job.folder).as_posix()}")
                tmp.replace(archive)
            finally:
                tmp.unlink(missing_ok=True)
        return FileResponse(archive, media_type="application/zip",
                            filename=f"mam-review-{job.folder.name}.zip")  # fmt: skip


def _locked(e: Locked) -> Response:
    return _json_error(403, "signed_off", f"this recording was signed off by {e.by}: your review "
                       "is locked; a senior can amend the final verdict with a reason",
                       by=e.by, at=e.at)  # fmt: skip


def _duration(result) -> float:
    ends = [c.end_s for c in result.clips]
    return round(max([result.quality.duration_s, *ends]) if ends else result.quality.duration_s, 3)


def _timeline(result) -> dict:
    """Geometry of the server-rendered SVG timeline: clip bars at their P(FMs), a hit area per
    clip (from its start to the next clip's), the 0.5 line, time ticks."""
    W, top, h = 1000.0, 18.0, 92.0
    dur = max(_duration(result), 1.0)

    def x(t: float) -> float:
        return round(t / dur * W, 2)

    ranks = {c.index: r for r, c in enumerate(result.top_fms_clips, start=1)}
    clips = sorted(result.clips, key=lambda c: c.start_s)
    items = []
    for k, c in enumerate(clips):
        nxt = clips[k + 1].start_s if k + 1 < len(clips) else c.end_s
        y = round(top + (1 - c.fms_probability) * h, 2)
        items.append({
            "i": c.index, "start": c.start_s, "end": c.end_s, "p": c.fms_probability,
            "x0": x(c.start_s), "x1": x(c.end_s), "hx": x(c.start_s),
            "hw": max(x(nxt) - x(c.start_s), 1.0), "y": y, "rank": ranks.get(c.index),
        })  # fmt: skip
    step = next((s for s in (5, 10, 15, 30, 60, 120, 300, 600, 900, 1800) if dur / s <= 12), 3600)
    ticks = [{"x": x(t), "label": mmss(t)} for t in range(0, int(dur) + 1, step)]
    return {"W": W, "clips": items, "ticks": ticks, "y50": top + 0.5 * h, "dur": dur}


def create_app(config: ReviewConfig) -> Starlette:
    """The review app for ``config`` (a Starlette ASGI app; ``app.state.review`` holds the
    :class:`ReviewApp`)."""
    review = ReviewApp(config)
    rid = "{rid:str}"
    routes = [
        Route("/login", review.login, methods=["GET", "POST"]),
        Route("/logout", review.logout, methods=["POST"]),
        Route("/", review.worklist),
        Route(f"/r/{rid}", review.recording),
        Route(f"/r/{rid}/video", review.video),
        Route(f"/r/{rid}/pose", review.pose, methods=["GET", "POST"]),
        Route(f"/api/r/{rid}", review.annotation),
        Route(f"/api/r/{rid}/fields", review.set_fields, methods=["PUT"]),
        Route(f"/api/r/{rid}/intervals", review.add_interval, methods=["POST"]),
        Route(
            f"/api/r/{rid}/intervals/{{iid:str}}", review.edit_interval, methods=["PATCH", "DELETE"]
        ),  # fmt: skip
        Route("/export", review.export_page),
        Route("/export", review.start_export, methods=["POST"]),
        Route("/export/status", review.export_status),
        Route("/export/download", review.export_download),
        Route("/audit", review.audit_page),
        Route("/agreement", review.agreement_page),
        Route(f"/r/{rid}/signoff", review.sign_off, methods=["POST"]),
        Route(f"/r/{rid}/outcome", review.set_outcome, methods=["POST"]),
        Route("/settings/blind", review.set_blind, methods=["POST"]),
        Route("/study", review.study_page),
        Route("/study", review.create_study, methods=["POST"]),
        Route("/study/{study:str}/report", review.study_report),
        Route(
            f"/study/{{study:str}}/{rid}/{{arm:str}}", review.study_session, methods=["GET", "POST"]
        ),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]

    async def not_found(request: Request, exc) -> Response:
        return _json_error(getattr(exc, "status_code", 404), "not_found", "no such page")

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        review.start()
        yield
        review.close()

    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found},
                    lifespan=lifespan)  # fmt: skip
    app.state.review = review
    gated = Gate(app, review)
    gated.state = app.state  # type: ignore[attr-defined]
    return gated  # type: ignore[return-value]
