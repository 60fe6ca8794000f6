"""The durable FHIR outbox: every result's Bundle reaches the site's FHIR server, or stays visible.

A Bundle is first written to a SQLite file (``Outbox``; WAL, every write its own committed
transaction, like the batch ledger), then delivered from there (``Outbox.deliver`` once, or an
``OutboxWorker`` thread in the background). So a server outage, a crash or a restart loses
nothing: what was not acknowledged by the server is sent at the next pass, by this process or the
next one on the same file.

* One entry per result id. Enqueuing the same content again is a no-op (nothing new is sent); other
  content under the same id is a *correction*: it replaces the entry (pending or delivered) and
  is sent as conditional updates (``mam.fhir.bundle.as_correction``), so the server's resources
  are updated, not left as they were.
* A failed delivery (no answer, 401 after one token refresh, 403, 408, 425, 429, 5xx) is tried
  again after an exponential, jittered back-off (``Retry-After`` honoured up to the cap). After
  ``max_attempts`` tries or ``max_age_s`` an entry is *given up*; a final answer (any other 4xx:
  the server will not take this Bundle as it is) gives it up at once. A given-up entry is kept,
  listed (``status``) and re-triable (``retry``); nothing is ever dropped silently.
* Delivery is at least once: an entry is leased while it is sent, and a lease left by a killed
  process runs out and the entry is sent again. That is safe because every resource is created
  conditionally on its identifier (a transaction that arrived although its answer was lost creates
  nothing new).
* Entries of the same result (the same DiagnosticReport identifier, ``result_key``: a result's
  first Bundle, its sign-off, its amendments) are delivered in the order they were queued: an
  entry is due only when no earlier entry of its result is still pending (waiting for a retry
  or being sent), so a retried sign-off (``final``) never lands after a later amendment
  (``amended``) and turns the EHR back. An earlier entry that was *given up* blocks nothing (the
  later ones go on); retrying it (``retry``) puts it back in its place, before any later entry
  of its result still pending, but it cannot undo one already delivered.
* A delivered entry keeps its digest, not its Bundle: the file holds patient references only
  while it has to.

Conditional references (``Patient?identifier=SYSTEM|VALUE`` as the subject, ``ServiceRequest?
identifier=...`` as ``basedOn``) are resolved by the sender (``FhirClient``, mode ``client``,
the default), since many servers, EHR endpoints among them, store them as written instead of
resolving them in a transaction: before each delivery every one is searched for on the same
server (``Type?identifier=SYSTEM|VALUE``, as ``POST Type/_search``, which keeps the identifier
out of URLs and their logs). Exactly one match: the reference is rewritten to
``Type/<id>`` in the request (the queued entry stays as it was, so the next try searches again).
No match: the entry waits and is retried with back-off (``no Patient with that identifier yet``:
the patient may not be registered yet) until it is given up as any failing entry. More than
one: given up at once (reason ``ambiguous``), as a transaction the server resolved would be
refused. A site whose server resolves conditional references itself sets the mode ``server``
(``MAM_FHIR_RESOLVE_REFERENCES=server``): the Bundle is sent as written.

``FhirClient`` POSTs a transaction to the base URL: ``https`` is required except on loopback
(``InsecureFhirUrlError``); the Authorization is a static bearer token (``StaticToken``, a token
file re-read at every request, so a rotated secret is picked up) or OAuth2 client credentials as
in SMART Backend Services (``ClientCredentials``: ``client_secret_basic``, or ``private_key_jwt``
with PyJWT), the token cached until shortly before it expires.

Nothing of a Bundle, a server's answer (an OperationOutcome may quote the data), a token or a
secret is logged; log lines carry counts, outcomes, HTTP statuses and error class names only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

from mam.errors import DependencyMissingError, InputError, MamError
from mam.remote import read_secret, require_https

logger = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
FORM = "application/x-www-form-urlencoded"
OUTBOX = "fhir-outbox.sqlite"
RETRY_STATUS = frozenset({401, 403, 408, 425, 429, 500, 502, 503, 504})
STATES = ("pending", "delivered", "given_up")
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ENV_RESOLVE = "MAM_FHIR_RESOLVE_REFERENCES"
RESOLVE_MODES = ("client", "server")
# A conditional reference: a resource type, then a search (``Patient?identifier=SYSTEM|VALUE``).
CONDITIONAL_REFERENCE = re.compile(r"^([A-Z][A-Za-z]{1,63})\?(\S+)$")

__all__ = [
    "ClientCredentials",
    "Delivery",
    "FhirClient",
    "FhirTokenError",
    "InsecureFhirUrlError",
    "InvalidFhirAuthError",
    "InvalidFhirBundleError",
    "InvalidFhirUrlError",
    "Outbox",
    "OutboxEntryNotFoundError",
    "OutboxError",
    "OutboxWorker",
    "StaticToken",
    "default_outbox_path",
    "make_auth",
    "resolve_mode",
    "result_id_of",
    "result_key_of",
]


class InvalidFhirUrlError(InputError):
    """No FHIR (or token) URL, or not an absolute http(s) one."""

    code = "invalid_fhir_url"


class InsecureFhirUrlError(InvalidFhirUrlError):
    """A plain ``http://`` FHIR or token URL to another host: tokens and results would travel in
    the clear."""

    code = "insecure_fhir_url"


class InvalidFhirAuthError(InputError):
    """Incomplete or unreadable FHIR credentials (the secret itself is never echoed)."""

    code = "invalid_fhir_auth"


class FhirTokenError(MamError):
    """The token endpoint gave no token (wrong credentials, unreachable, not an OAuth2 answer)."""

    code = "fhir_token_error"


class InvalidFhirBundleError(InputError):
    """Input to push that is not a transaction Bundle with a result id (no content is echoed)."""

    code = "invalid_fhir_bundle"


class OutboxError(MamError):
    """The outbox file cannot be opened, read or written."""

    code = "fhir_outbox_error"


class OutboxEntryNotFoundError(InputError):
    code = "fhir_outbox_entry_not_found"


# -- URLs and credentials ----------------------------------------------------------------------
def check_url(url: str, what: str = "FHIR base URL") -> str:
    """``url`` if it is https, or http on loopback; else ``InsecureFhirUrlError``."""
    return require_https(url, what, InvalidFhirUrlError, InsecureFhirUrlError)


def _read_secret(path: str | Path, what: str) -> str:
    return read_secret(path, what, InvalidFhirAuthError)


class StaticToken:
    """A bearer token, given or read from a file (a mounted secret) at every request."""

    def __init__(self, token: str | None = None, token_file: str | Path | None = None) -> None:
        if token is None and token_file is None:
            raise InvalidFhirAuthError("a static token needs a token or a token file")
        self._token, self._file = token, Path(token_file) if token_file else None

    def header(self, http) -> str:
        token = _read_secret(self._file, "token") if self._file else self._token
        return f"Bearer {token}"

    def invalidate(self) -> None:
        """Nothing to refresh: the file is re-read anyway."""


def _load_key(pem: str):
    """A PEM private key and the SMART algorithm for it (ES384 for EC, else RS384)."""
    try:
        import jwt  # noqa: F401 - checked here: it signs the assertions
        from cryptography.hazmat.primitives.asymmetric import ec, rsa
        from cryptography.hazmat.primitives.serialization import load_pem_private_key
    except ImportError:
        raise DependencyMissingError(
            "private_key_jwt needs PyJWT with cryptography: pip install 'pyjwt[crypto]'"
        ) from None
    try:
        key = load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError):
        raise InvalidFhirAuthError("the private key is not an unencrypted PEM key") from None
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key, "ES384"
    if isinstance(key, rsa.RSAPrivateKey):
        return key, "RS384"
    raise InvalidFhirAuthError("the private key must be RSA or EC (SMART: RS384 or ES384)")


class ClientCredentials:
    """OAuth2 client credentials (SMART Backend Services): ``client_secret_basic`` with a secret,
    or ``private_key_jwt`` with a PEM private key (RS384 or ES384, as SMART asks; needs PyJWT).
    The access token is kept until ``margin_s`` before its ``expires_in``."""

    def __init__(
        self,
        token_url: str,
        client_id: str,
        client_secret: str | None = None,
        client_secret_file: str | Path | None = None,
        private_key_file: str | Path | None = None,
        key_id: str | None = None,
        scope: str = "system/*.write",
        margin_s: float = 30.0,
    ) -> None:
        if not client_id:
            raise InvalidFhirAuthError("OAuth2 client credentials need a client id")
        given = [x is not None for x in (client_secret, client_secret_file, private_key_file)]
        if sum(given) != 1:
            raise InvalidFhirAuthError(
                "OAuth2 client credentials need exactly one of a client secret (file) and a "
                "private key"
            )
        self.token_url = check_url(token_url, "token URL")
        self.client_id, self.scope, self.margin_s, self.key_id = client_id, scope, margin_s, key_id
        self._secret = client_secret
        if client_secret_file is not None:
            self._secret = _read_secret(client_secret_file, "client secret")
        self._key = None
        if private_key_file is not None:
            self._key, self._alg = _load_key(_read_secret(private_key_file, "private key"))
            self._assertion()  # a key that cannot sign shows now, not at the first push
        self._token: str | None = None
        self._expires = 0.0
        self._lock = threading.Lock()

    def _assertion(self) -> str:
        import jwt

        now = int(time.time())
        claims = {"iss": self.client_id, "sub": self.client_id, "aud": self.token_url,
                  "exp": now + 240, "iat": now, "jti": uuid.uuid4().hex}  # fmt: skip
        headers = {"kid": self.key_id} if self.key_id else None
        try:
            return jwt.encode(claims, self._key, algorithm=self._alg, headers=headers)
        except (ValueError, TypeError, jwt.PyJWTError) as e:
            raise InvalidFhirAuthError(
                f"the private key cannot sign ({type(e).__name__})"
            ) from None

    def _fetch(self, http) -> None:
        import httpx

        data = {"grant_type": "client_credentials", "scope": self.scope}
        auth = None
        if self._key is not None:
            data |= {"client_assertion_type": JWT_BEARER, "client_assertion": self._assertion()}
        else:
            auth = httpx.BasicAuth(self.client_id, self._secret)
        try:
            r = http.post(self.token_url, data=data, auth=auth,
                          headers={"Accept": "application/json"})  # fmt: skip
        except (httpx.HTTPError, OSError) as e:
            raise FhirTokenError(
                f"the token endpoint did not answer ({type(e).__name__})"
            ) from None
        if r.status_code != 200:
            raise FhirTokenError(f"the token endpoint answered {r.status_code}")
        try:
            body = r.json()
            token = body["access_token"]
            expires_in = float(body.get("expires_in", 300))
        except (ValueError, KeyError, TypeError):
            raise FhirTokenError("the token endpoint's answer holds no access_token") from None
        self._token, self._expires = token, time.monotonic() + expires_in - self.margin_s

    def header(self, http) -> str:
        with self._lock:
            if self._token is None or time.monotonic() >= self._expires:
                self._fetch(http)
            return f"Bearer {self._token}"

    def invalidate(self) -> None:
        with self._lock:
            self._token = None


def make_auth(
    token: str | None = None,
    token_file: str | Path | None = None,
    client_id: str | None = None,
    token_url: str | None = None,
    client_secret_file: str | Path | None = None,
    private_key_file: str | Path | None = None,
    key_id: str | None = None,
    scope: str | None = None,
):
    """The Authorization source the options name (None: none); ``InvalidFhirAuthError`` for
    a mix that cannot be meant (a static token and client credentials, half of either)."""
    oauth = [client_id, token_url, client_secret_file, private_key_file, key_id]
    if any(x is not None for x in oauth):
        if token is not None or token_file is not None:
            raise InvalidFhirAuthError("give a static token or OAuth2 client credentials, not both")
        if client_id is None or token_url is None:
            raise InvalidFhirAuthError("OAuth2 client credentials need a client id and a token URL")
        return ClientCredentials(token_url, client_id, client_secret_file=client_secret_file,
                                 private_key_file=private_key_file, key_id=key_id,
                                 scope=scope or "system/*.write")  # fmt: skip
    if token is not None or token_file is not None:
        return StaticToken(token, token_file)
    return None


# -- the HTTP client ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Answer:
    status: int | None  # None: no answer (connection, timeout, token endpoint, no match yet)
    retry_after: float | None = None
    error: str | None = None  # an error class name or code, or a fixed text: never data
    give_up: str | None = None  # a reason to give the entry up at once ("ambiguous")


def resolve_mode(value: str | None = None) -> str:
    """How conditional references are resolved: ``client`` (by the outbox, before sending; the
    default) or ``server`` (sent as written). ``value``, else ``MAM_FHIR_RESOLVE_REFERENCES``."""
    from mam.fhir.codes import InvalidFhirConfigError

    if value is None:
        from mam.settings import current

        value = current().fhir_resolve_references
    mode = (value or "client").strip().lower()
    if mode not in RESOLVE_MODES:
        raise InvalidFhirConfigError(f"{ENV_RESOLVE} must be one of {', '.join(RESOLVE_MODES)}")
    return mode


def conditional_references(bundle: dict) -> list[str]:
    """Every distinct conditional reference (``Type?search``) in the Bundle's resources."""
    found: dict[str, None] = {}

    def walk(x) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                if k == "reference" and isinstance(v, str) and CONDITIONAL_REFERENCE.match(v):
                    found[v] = None
                else:
                    walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk([e.get("resource") for e in bundle.get("entry") or ()])
    return list(found)


def _rewritten(value, refs: dict[str, str]):
    if isinstance(value, dict):
        return {k: (refs.get(v, v) if k == "reference" and isinstance(v, str)
                    else _rewritten(v, refs)) for k, v in value.items()}  # fmt: skip
    if isinstance(value, list):
        return [_rewritten(v, refs) for v in value]
    return value


class FhirClient:
    """POSTs transaction Bundles to ``base_url`` (checked by ``check_url``) with ``auth``
    (``StaticToken``, ``ClientCredentials`` or None); a 401 refreshes the token once.
    ``resolve``: ``client`` resolves conditional references before sending (see the module
    docstring), ``server`` sends them as written; None: ``resolve_mode()``."""

    def __init__(self, base_url: str, auth=None, timeout_s: float = 30.0, transport=None,
                 resolve: str | None = None) -> None:  # fmt: skip
        import httpx

        self.base_url = check_url(base_url).rstrip("/")
        self.auth, self.timeout_s = auth, timeout_s
        self.resolve = resolve_mode(resolve)
        self.http = httpx.Client(timeout=timeout_s, transport=transport)

    def check_auth(self) -> None:
        """Get a token now (``FhirTokenError``, ``InvalidFhirAuthError`` when that fails)."""
        if self.auth is not None:
            self.auth.header(self.http)

    def _request(self, method: str, url: str, timeout: float, **kw):
        """One request with the Authorization; a 401 refreshes the token and tries once more."""
        headers = {"Accept": FHIR_JSON, **kw.pop("headers", {})}
        for refreshed in (False, True):
            if self.auth is not None:
                headers["Authorization"] = self.auth.header(self.http)
            r = self.http.request(method, url, headers=headers, timeout=timeout, **kw)
            if r.status_code != 401 or self.auth is None or refreshed:
                return r
            self.auth.invalidate()
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _answer(r) -> Answer:
        after = r.headers.get("retry-after", "").strip()
        return Answer(r.status_code, float(after) if after.isdigit() else None)

    def resolved(self, bundle: dict, timeout_s: float | None = None) -> tuple[dict, Answer | None]:
        """``bundle`` with each conditional reference replaced by the ``Type/<id>`` of its one
        match on the server (a copy; the same Bundle when it has none), or the ``Answer`` that
        stops the delivery: no match yet (retried), more than one (given up), the search failed
        (as a failed POST would be). Raises what ``send`` catches."""
        refs = conditional_references(bundle)
        if not refs:
            return bundle, None
        timeout = min(self.timeout_s, timeout_s) if timeout_s else self.timeout_s
        found: dict[str, str] = {}
        for ref in refs:
            kind, query = CONDITIONAL_REFERENCE.match(ref).groups()
            params = [*parse_qsl(query, keep_blank_values=True), ("_count", "2")]
            # POST _search (FHIR's other form of a search, which servers must support too):
            # the identifier travels in the body, never in a URL that proxies and logs keep.
            r = self._request("POST", f"{self.base_url}/{kind}/_search", timeout,
                              content=urlencode(params).encode(),
                              headers={"Content-Type": FORM})  # fmt: skip
            if r.status_code != 200:
                return bundle, self._answer(r)
            by = "with that identifier" if query.startswith("identifier=") else "matching it"
            try:
                body = r.json()
                matches = [e["resource"] for e in body.get("entry") or ()
                           if (e.get("search") or {}).get("mode", "match") == "match"]  # fmt: skip
                total = body.get("total") or len(matches)
                ids = {m["id"] for m in matches if m.get("resourceType") == kind}
            except (ValueError, KeyError, TypeError, AttributeError):
                return bundle, Answer(None, error=f"the search for the {kind} is no FHIR Bundle")
            if not matches:
                return bundle, Answer(None, error=f"no {kind} {by} yet")
            if total > 1 or len(matches) > 1:
                return bundle, Answer(None, error=f"more than one {kind} {by} (ambiguous)",
                                      give_up="ambiguous")  # fmt: skip
            if len(ids) != 1 or not isinstance(rid := ids.pop(), str):
                return bundle, Answer(None, error=f"the search for the {kind} gave no id")
            found[ref] = f"{kind}/{rid}"
        return {**bundle, "entry": _rewritten(bundle["entry"], found)}, None

    def send(self, bundle: dict, timeout_s: float | None = None) -> Answer:
        """One transaction (its conditional references resolved first in mode ``client``);
        never raises for the network's, the server's or the token's failures (they are the
        ``Answer``)."""
        import httpx

        timeout = min(self.timeout_s, timeout_s) if timeout_s else self.timeout_s
        try:
            if self.resolve == "client":
                bundle, stop = self.resolved(bundle, timeout)
                if stop is not None:
                    return stop
            body = json.dumps(bundle, separators=(",", ":")).encode()
            r = self._request("POST", self.base_url, timeout, content=body,
                              headers={"Content-Type": FHIR_JSON})  # fmt: skip
        except MamError as e:
            return Answer(None, error=e.code)
        except (httpx.HTTPError, OSError) as e:
            return Answer(None, error=type(e).__name__)
        return self._answer(r)

    def close(self) -> None:
        self.http.close()


# -- the outbox --------------------------------------------------------------------------------
def default_outbox_path() -> Path:
    """``MAM_FHIR_OUTBOX``; else beside the audit file (``MAM_AUDIT_FILE``) when that is a
    file; else ``fhir-outbox.sqlite`` in the current folder."""
    from mam.settings import current

    return current().fhir_outbox_path()


def result_id_of(bundle: dict) -> str:
    """The result id a Bundle carries (``Bundle.identifier``, as ``build_bundle`` writes it)."""
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise InvalidFhirBundleError("not a FHIR Bundle")
    if bundle.get("type") != "transaction":
        raise InvalidFhirBundleError("not a transaction Bundle")
    value = (bundle.get("identifier") or {}).get("value")
    if not isinstance(value, str) or not value:
        raise InvalidFhirBundleError("the Bundle has no identifier (the result id)")
    return value


def result_key_of(bundle: dict) -> str:
    """What entries of the same result share, delivered in the order queued: the identifier of
    the Bundle's DiagnosticReport (``SYSTEM|VALUE``; the same in a result's first Bundle, its
    sign-off and amendments), else the Bundle's result id."""
    for e in bundle.get("entry") or ():
        res = e.get("resource") or {}
        if res.get("resourceType") == "DiagnosticReport" and res.get("identifier"):
            i = res["identifier"][0]
            return f"{i.get('system', '')}|{i.get('value', '')}"
    return result_id_of(bundle)


def digest_of(bundle: dict) -> str:
    """What makes two Bundles of a result the same: their entries, less when they were built
    (a Bundle built again for the same result is no correction)."""
    from mam.fhir.bundle import content_digest

    return content_digest(bundle.get("entry") or [])


@dataclass(frozen=True)
class Delivery:
    """What one delivery attempt of an entry came to."""

    result_id: str
    outcome: str  # "ok", "retry" (failed, tried again later) or "given_up"
    attempts: int
    status: int | None
    reason: str | None = None  # of a give-up: "rejected" (a final 4xx), "ambiguous" (a
    # conditional reference with more than one match) or "expired"


_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    result_id TEXT PRIMARY KEY,
    digest TEXT NOT NULL,
    bundle TEXT,
    correction INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'given_up')),
    reason TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    next_at REAL NOT NULL,
    lease_until REAL NOT NULL DEFAULT 0,
    last_status INTEGER,
    last_error TEXT,
    delivered_at REAL,
    result_key TEXT,
    seq INTEGER
);
CREATE INDEX IF NOT EXISTS entries_due ON entries (state, next_at);
"""
# Files written before entries were ordered per result gain the columns (old rows: queue order).
_ADDED = {"result_key": "TEXT", "seq": "INTEGER"}
_INDEX = "CREATE INDEX IF NOT EXISTS entries_key ON entries (result_key, seq)"
# Due: pending, its wait over, not leased, and no earlier entry of its result still pending.
_FIRST_OF_KEY = ("NOT EXISTS (SELECT 1 FROM entries p WHERE p.state='pending' AND "
                 "p.result_key=entries.result_key AND p.seq<entries.seq)")  # fmt: skip

# In-process workers by outbox file: an enqueue wakes each, whichever Outbox object it came
# through (the review app mounted in the service queues sign-offs the service's worker sends).
_WORKERS: dict[str, weakref.WeakSet] = {}
_WORKERS_LOCK = threading.Lock()


def _file_key(path: Path) -> str:
    return os.path.realpath(path)


def _wake_workers(path: Path) -> None:
    with _WORKERS_LOCK:
        workers = list(_WORKERS.get(_file_key(path), ()))
    for w in workers:
        w.wake()


class Outbox:
    """The outbox file (see the module docstring). Safe to share between threads and
    processes.

    Args:
        path: the SQLite file (``default_outbox_path()``).
        max_attempts, max_age_s: when a failing entry is given up.
        backoff_s, max_backoff_s: the first wait after a failure; doubles, jittered, capped.
        lease_s: how long an entry being sent is held from other senders.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        max_attempts: int = 100,
        max_age_s: float = 3 * 86400.0,
        backoff_s: float = 2.0,
        max_backoff_s: float = 900.0,
        lease_s: float = 120.0,
    ) -> None:
        self.path = Path(path) if path is not None else default_outbox_path()
        self.max_attempts, self.max_age_s = max_attempts, max_age_s
        self.backoff_s, self.max_backoff_s, self.lease_s = backoff_s, max_backoff_s, lease_s
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None,
                                       check_same_thread=False)  # fmt: skip
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self._migrate()
        except (sqlite3.Error, OSError) as e:
            raise OutboxError(f"cannot open the FHIR outbox {self.path} ({type(e).__name__}: "
                              f"{e})") from None  # fmt: skip

    def _migrate(self) -> None:
        def missing() -> set[str]:
            return set(_ADDED) - {r[1] for r in self._db.execute("PRAGMA table_info(entries)")}

        if missing():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for name in sorted(missing()):  # read again: another process may have done it
                    self._db.execute(f"ALTER TABLE entries ADD COLUMN {name} {_ADDED[name]}")
                self._db.execute("UPDATE entries SET seq=rowid WHERE seq IS NULL")
                rows = self._db.execute(
                    "SELECT result_id, bundle FROM entries WHERE "
                    "result_key IS NULL AND bundle IS NOT NULL"
                ).fetchall()
                for rid, text in rows:
                    self._db.execute("UPDATE entries SET result_key=? WHERE result_id=?",
                                     (result_key_of(json.loads(text)), rid))  # fmt: skip
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        self._db.execute(_INDEX)

    @contextlib.contextmanager
    def _tx(self):
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                raise OutboxError(f"the FHIR outbox {self.path} failed ({type(e).__name__}: "
                                  f"{e})") from None  # fmt: skip

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- writing -----------------------------------------------------------------------------
    def enqueue(self, bundle: dict | str | bytes, result_id: str | None = None,
                now: float | None = None) -> str:  # fmt: skip
        """Keep ``bundle`` for delivery. Returns ``"queued"`` (new), ``"duplicate"`` (the same
        content is already pending, delivered or given up: nothing changes) or ``"correction"``
        (other content under a known result id: it replaces that entry and is sent as
        conditional updates)."""
        if isinstance(bundle, (str, bytes)):
            try:
                bundle = json.loads(bundle)
            except ValueError:
                raise InvalidFhirBundleError("not JSON") from None
        rid = result_id_of(bundle)
        if result_id is not None and result_id != rid:
            raise InvalidFhirBundleError("the Bundle's identifier is not the result id given")
        now = time.time() if now is None else now
        digest, text = digest_of(bundle), json.dumps(bundle, separators=(",", ":"))
        key = result_key_of(bundle)
        with self._tx() as db:
            row = db.execute("SELECT digest FROM entries WHERE result_id=?", (rid,)).fetchone()
            if row is not None and row[0] == digest:
                return "duplicate"
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM entries").fetchone()[0]
            if row is None:
                db.execute("INSERT INTO entries (result_id, digest, bundle, state, created_at, "
                           "next_at, result_key, seq) VALUES (?, ?, ?, 'pending', ?, ?, ?, ?)",
                           (rid, digest, text, now, now, key, seq))  # fmt: skip
                outcome = "queued"
            else:  # a correction is queued now: it goes after what its result already has
                db.execute("UPDATE entries SET digest=?, bundle=?, correction=1, "
                           "state='pending', reason=NULL, attempts=0, created_at=?, next_at=?, "
                           "lease_until=0, last_status=NULL, last_error=NULL, "
                           "delivered_at=NULL, result_key=?, seq=? WHERE result_id=?",
                           (digest, text, now, now, key, seq, rid))  # fmt: skip
                outcome = "correction"
        _wake_workers(self.path)
        return outcome

    def retry(self, result_id: str | None = None, now: float | None = None) -> int:
        """Make a given-up entry (or, without an id, every one) pending again, due now, with a
        fresh count of attempts and age. Returns how many."""
        now = time.time() if now is None else now
        with self._tx() as db:
            if result_id is not None:
                self._state_of(db, result_id)
            sql = ("UPDATE entries SET state='pending', reason=NULL, attempts=0, created_at=?, "
                   "next_at=?, lease_until=0 WHERE state='given_up'")  # fmt: skip
            args: tuple = (now, now)
            if result_id is not None:
                sql, args = sql + " AND result_id=?", (now, now, result_id)
            n = db.execute(sql, args).rowcount
        if n:
            _wake_workers(self.path)
        return n

    def give_up(self, result_id: str) -> bool:
        """Stop sending a pending entry (kept, re-triable). False when it was not pending."""
        with self._tx() as db:
            self._state_of(db, result_id)
            sql = ("UPDATE entries SET state='given_up', reason='by hand' "
                   "WHERE result_id=? AND state='pending'")  # fmt: skip
            n = db.execute(sql, (result_id,)).rowcount
            return n == 1

    @staticmethod
    def _state_of(db, result_id: str) -> str:
        row = db.execute("SELECT state FROM entries WHERE result_id=?", (result_id,)).fetchone()
        if row is None:
            raise OutboxEntryNotFoundError("no outbox entry has that result id")
        return row[0]

    # -- reading -----------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM entries GROUP BY state").fetchall()
        return {s: 0 for s in STATES} | dict(rows)

    def entries(self, state: str | None = None) -> list[dict]:
        """Each entry's result id, state and delivery record (never its Bundle), in the order
        queued; ``waits_for_earlier``: pending behind an earlier entry of its result."""
        sql = ("SELECT result_id, state, reason, correction, attempts, created_at, next_at, "
               "last_status, last_error, delivered_at, "
               f"(state='pending' AND NOT {_FIRST_OF_KEY}) AS waits_for_earlier "
               "FROM entries")  # fmt: skip
        args: tuple = ()
        if state is not None:
            sql, args = sql + " WHERE state=?", (state,)
        with self._lock:
            cur = self._db.execute(sql + " ORDER BY seq, created_at, result_id", args)
            names = [d[0] for d in cur.description]
            rows = [dict(zip(names, row)) for row in cur.fetchall()]
        for r in rows:
            r["waits_for_earlier"] = bool(r["waits_for_earlier"])
        return rows

    def next_due(self) -> float | None:
        """When the next pending entry is due (None: nothing pending); an entry waiting for an
        earlier one of its result is due when that one is sent."""
        with self._lock:
            row = self._db.execute(
                "SELECT MIN(MAX(next_at, lease_until)) FROM entries "
                f"WHERE state='pending' AND {_FIRST_OF_KEY}"
            ).fetchone()
        return row[0]

    # -- delivering --------------------------------------------------------------------------
    def _claim(self, now: float, lease_s: float) -> tuple[str, str, dict, bool] | None:
        with self._tx() as db:
            row = db.execute("SELECT result_id, digest, bundle, correction FROM entries "
                             "WHERE state='pending' AND next_at<=? AND lease_until<=? AND "
                             f"{_FIRST_OF_KEY} ORDER BY next_at, seq LIMIT 1",
                             (now, now)).fetchone()  # fmt: skip
            if row is None:
                return None
            db.execute("UPDATE entries SET lease_until=? WHERE result_id=?",
                       (now + lease_s, row[0]))  # fmt: skip
        return row[0], row[1], json.loads(row[2]), bool(row[3])

    def _wait_s(self, attempts: int, retry_after: float | None) -> float:
        delay = self.backoff_s * 2 ** (attempts - 1) * (0.5 + random.random())
        if retry_after is not None:
            delay = max(delay, retry_after)
        return min(delay, self.max_backoff_s)

    def _record(self, rid: str, digest: str, answer: Answer, now: float) -> Delivery | None:
        ok = answer.status is not None and 200 <= answer.status < 300
        final = answer.give_up is not None or (
            answer.status is not None and not ok and answer.status not in RETRY_STATUS
        )
        with self._tx() as db:
            row = db.execute("SELECT attempts, created_at FROM entries WHERE result_id=? AND "
                             "digest=?", (rid, digest)).fetchone()  # fmt: skip
            if row is None:  # replaced by a correction while it was sent: that one goes next
                return None
            attempts, created = row[0] + 1, row[1]
            common = (attempts, answer.status, answer.error)
            if ok:
                db.execute("UPDATE entries SET state='delivered', bundle=NULL, attempts=?, "
                           "last_status=?, last_error=?, delivered_at=?, lease_until=0 "
                           "WHERE result_id=?", (*common, now, rid))  # fmt: skip
                return Delivery(rid, "ok", attempts, answer.status)
            expired = attempts >= self.max_attempts or now - created >= self.max_age_s
            if final or expired:
                reason = answer.give_up or ("rejected" if final else "expired")
                db.execute("UPDATE entries SET state='given_up', reason=?, attempts=?, "
                           "last_status=?, last_error=?, lease_until=0 WHERE result_id=?",
                           (reason, *common, rid))  # fmt: skip
                return Delivery(rid, "given_up", attempts, answer.status, reason)
            next_at = now + self._wait_s(attempts, answer.retry_after)
            db.execute("UPDATE entries SET attempts=?, last_status=?, last_error=?, next_at=?, "
                       "lease_until=0 WHERE result_id=?", (*common, next_at, rid))  # fmt: skip
            return Delivery(rid, "retry", attempts, answer.status)

    def deliver(
        self,
        client: FhirClient,
        now: Callable[[], float] = time.time,
        deadline: float | Callable[[], float | None] | None = None,
        on_delivery: Callable[[Delivery], None] | None = None,
    ) -> dict[str, int]:
        """Send every entry due now, once each, until none is due or ``deadline`` (a
        ``time.time()`` value, or a function giving one or None, read before each entry)
        passes. Returns the count of each outcome."""
        from mam.fhir.bundle import as_correction

        counts = {"ok": 0, "retry": 0, "given_up": 0}
        start = now()
        while True:
            end = deadline() if callable(deadline) else deadline
            if end is not None and now() >= end:
                break
            claimed = self._claim(start, self.lease_s)  # only what was due when the pass began
            if claimed is None:
                break
            rid, digest, bundle, correction = claimed
            remaining = None if end is None else max(end - now(), 0.1)
            answer = client.send(as_correction(bundle) if correction else bundle, remaining)
            d = self._record(rid, digest, answer, now())
            if d is None:
                continue
            counts[d.outcome] += 1
            if d.outcome != "ok":
                logger.warning("FHIR delivery %s after %d attempt(s), status %s%s", d.outcome,
                               d.attempts, d.status,
                               f" ({answer.error})" if answer.error else "")  # fmt: skip
            if on_delivery is not None:
                on_delivery(d)
        if any(counts.values()):
            logger.info("FHIR outbox pass: %d delivered, %d to retry, %d given up",
                        counts["ok"], counts["retry"], counts["given_up"])  # fmt: skip
        return counts


class OutboxWorker:
    """Delivers an ``Outbox`` in a background thread: a pass whenever something is due, at
    once after ``wake()`` (every ``enqueue`` in this process on the same file wakes it, through
    whichever ``Outbox`` it came), at least every ``poll_s`` (entries a sibling process
    enqueued). ``drain(timeout)`` delivers what is due up to the deadline, then
    stops: what is left stays in the file for the next start."""

    def __init__(self, outbox: Outbox, client: FhirClient, poll_s: float = 30.0,
                 on_delivery: Callable[[Delivery], None] | None = None) -> None:  # fmt: skip
        self.outbox, self.client, self.poll_s = outbox, client, poll_s
        self.on_delivery = on_delivery
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._deadline: float | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> OutboxWorker:
        self._thread = threading.Thread(target=self._run, name="fhir-outbox", daemon=True)
        self._thread.start()
        with _WORKERS_LOCK:
            _WORKERS.setdefault(_file_key(self.outbox.path), weakref.WeakSet()).add(self)
        return self

    def wake(self) -> None:
        self._wake.set()

    def _end(self) -> float | None:
        return time.time() if self._stop.is_set() else self._deadline

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            with _WORKERS_LOCK:
                _WORKERS.get(_file_key(self.outbox.path), weakref.WeakSet()).discard(self)

    def _loop(self) -> None:
        while True:
            draining = self._deadline is not None
            try:
                self.outbox.deliver(self.client, deadline=self._end,
                                    on_delivery=self.on_delivery)  # fmt: skip
            except Exception:  # noqa: BLE001 - the worker must outlive any one failure
                logger.exception("FHIR outbox pass failed")
            if self._stop.is_set() or draining:
                return
            due = self.outbox.next_due()
            wait = self.poll_s if due is None else min(self.poll_s, max(due - time.time(), 0.05))
            self._wake.wait(wait)
            self._wake.clear()

    def drain(self, timeout: float) -> dict[str, int]:
        """Deliver what is due within ``timeout`` seconds, then stop the thread. Returns the
        outbox's counts afterwards."""
        self._deadline = time.time() + timeout
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout + self.client.timeout_s + 1)
        return self.outbox.counts()

    def stop(self) -> None:
        """Stop after the current request, without a drain."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(self.client.timeout_s + 1)
