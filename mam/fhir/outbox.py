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
* A delivered entry keeps its digest, not its Bundle: the file holds patient references only
  while it has to.

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
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mam.errors import DependencyMissingError, InputError, MamError
from mam.remote import read_secret, require_https

logger = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
OUTBOX = "fhir-outbox.sqlite"
ENV_OUTBOX = "MAM_FHIR_OUTBOX"
RETRY_STATUS = frozenset({401, 403, 408, 425, 429, 500, 502, 503, 504})
STATES = ("pending", "delivered", "given_up")
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

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
    "result_id_of",
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
    status: int | None  # None: no answer (connection, timeout, token endpoint)
    retry_after: float | None = None
    error: str | None = None  # an error class name or code, never a message


class FhirClient:
    """POSTs transaction Bundles to ``base_url`` (checked by ``check_url``) with ``auth``
    (``StaticToken``, ``ClientCredentials`` or None); a 401 refreshes the token once."""

    def __init__(self, base_url: str, auth=None, timeout_s: float = 30.0, transport=None) -> None:
        import httpx

        self.base_url = check_url(base_url)
        self.auth, self.timeout_s = auth, timeout_s
        self.http = httpx.Client(timeout=timeout_s, transport=transport)

    def check_auth(self) -> None:
        """Get a token now (``FhirTokenError``, ``InvalidFhirAuthError`` when that fails)."""
        if self.auth is not None:
            self.auth.header(self.http)

    def send(self, bundle: dict, timeout_s: float | None = None) -> Answer:
        """One transaction; never raises for the network's, the server's or the token's
        failures (they are the ``Answer``)."""
        import httpx

        body = json.dumps(bundle, separators=(",", ":")).encode()
        timeout = min(self.timeout_s, timeout_s) if timeout_s else self.timeout_s
        for refreshed in (False, True):
            headers = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}
            try:
                if self.auth is not None:
                    headers["Authorization"] = self.auth.header(self.http)
                r = self.http.post(self.base_url, content=body, headers=headers, timeout=timeout)
            except MamError as e:
                return Answer(None, error=e.code)
            except (httpx.HTTPError, OSError) as e:
                return Answer(None, error=type(e).__name__)
            if r.status_code == 401 and self.auth is not None and not refreshed:
                self.auth.invalidate()
                continue
            after = r.headers.get("retry-after", "").strip()
            return Answer(r.status_code, float(after) if after.isdigit() else None)
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        self.http.close()


# -- the outbox --------------------------------------------------------------------------------
def default_outbox_path() -> Path:
    """``MAM_FHIR_OUTBOX``; else beside the audit file (``MAM_AUDIT_FILE``) when that is a
    file; else ``fhir-outbox.sqlite`` in the current folder."""
    if os.environ.get(ENV_OUTBOX):
        return Path(os.environ[ENV_OUTBOX])
    audit = os.environ.get("MAM_AUDIT_FILE", "")
    if audit and audit not in ("-", "off"):
        return Path(audit).parent / OUTBOX
    return Path(OUTBOX)


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
    reason: str | None = None  # of a give-up: "rejected" (a final 4xx) or "expired"


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
    delivered_at REAL
);
CREATE INDEX IF NOT EXISTS entries_due ON entries (state, next_at);
"""


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
        except (sqlite3.Error, OSError) as e:
            raise OutboxError(f"cannot open the FHIR outbox {self.path} ({type(e).__name__}: "
                              f"{e})") from None  # fmt: skip

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
        with self._tx() as db:
            row = db.execute("SELECT digest FROM entries WHERE result_id=?", (rid,)).fetchone()
            if row is None:
                db.execute("INSERT INTO entries (result_id, digest, bundle, state, created_at, "
                           "next_at) VALUES (?, ?, ?, 'pending', ?, ?)",
                           (rid, digest, text, now, now))  # fmt: skip
                return "queued"
            if row[0] == digest:
                return "duplicate"
            db.execute("UPDATE entries SET digest=?, bundle=?, correction=1, state='pending', "
                       "reason=NULL, attempts=0, created_at=?, next_at=?, lease_until=0, "
                       "last_status=NULL, last_error=NULL, delivered_at=NULL WHERE result_id=?",
                       (digest, text, now, now, rid))  # fmt: skip
            return "correction"

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
            return db.execute(sql, args).rowcount

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
        """Each entry's result id, state and delivery record (never its Bundle)."""
        sql = ("SELECT result_id, state, reason, correction, attempts, created_at, next_at, "
               "last_status, last_error, delivered_at FROM entries")  # fmt: skip
        args: tuple = ()
        if state is not None:
            sql, args = sql + " WHERE state=?", (state,)
        with self._lock:
            cur = self._db.execute(sql + " ORDER BY created_at, result_id", args)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row)) for row in cur.fetchall()]

    def next_due(self) -> float | None:
        """When the next pending entry is due (None: nothing pending)."""
        with self._lock:
            row = self._db.execute("SELECT MIN(MAX(next_at, lease_until)) FROM entries "
                                   "WHERE state='pending'").fetchone()  # fmt: skip
        return row[0]

    # -- delivering --------------------------------------------------------------------------
    def _claim(self, now: float, lease_s: float) -> tuple[str, str, dict, bool] | None:
        with self._tx() as db:
            row = db.execute("SELECT result_id, digest, bundle, correction FROM entries "
                             "WHERE state='pending' AND next_at<=? AND lease_until<=? "
                             "ORDER BY next_at LIMIT 1", (now, now)).fetchone()  # fmt: skip
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
        final = answer.status is not None and not ok and answer.status not in RETRY_STATUS
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
                reason = "rejected" if final else "expired"
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
    once after ``wake()`` (call it after ``enqueue``), at least every ``poll_s`` (entries a
    sibling process enqueued). ``drain(timeout)`` delivers what is due up to the deadline, then
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
        return self

    def wake(self) -> None:
        self._wake.set()

    def _end(self) -> float | None:
        return time.time() if self._stop.is_set() else self._deadline

    def _run(self) -> None:
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
