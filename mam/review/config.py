"""Settings of the review app: given by ``mam review`` or, in the screening service, read from
``MAM_REVIEW_*`` environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from mam.review.auth import USERS_FILE

EXPORTS_DIR = "review_exports"


def secure_cookie_setting() -> bool | None:
    """``MAM_REVIEW_SECURE_COOKIE``: 1/true/yes: always ``Secure``; 0/false/no: never; unset
    (or anything else): ``Secure`` when the request came over https. Read by ``mam review`` and
    the service alike."""
    raw = (os.environ.get("MAM_REVIEW_SECURE_COOKIE") or "").strip().lower()
    if raw in ("1", "true", "yes"):
        return True
    if raw in ("0", "false", "no"):
        return False
    return None


def blind_setting() -> bool:
    """``MAM_REVIEW_BLIND``: 1/true/yes: blind review for the whole deployment."""
    return (os.environ.get("MAM_REVIEW_BLIND") or "").strip().lower() in ("1", "true", "yes")


def _env(name: str) -> str | None:
    return (os.environ.get(name) or "").strip() or None


# make_auth option -> the service's environment variable (the same MAM_FHIR_* settings).
FHIR_AUTH_ENV = {
    "token": "MAM_FHIR_TOKEN",
    "token_file": "MAM_FHIR_TOKEN_FILE",
    "client_id": "MAM_FHIR_CLIENT_ID",
    "token_url": "MAM_FHIR_TOKEN_URL",
    "client_secret_file": "MAM_FHIR_CLIENT_SECRET_FILE",
    "private_key_file": "MAM_FHIR_PRIVATE_KEY_FILE",
}


def fhir_auth_from_env() -> dict:
    """The FHIR push credentials the service would use, as ``make_auth`` options."""
    return {k: v for k, name in FHIR_AUTH_ENV.items() if (v := _env(name)) is not None}


@dataclass
class ReviewConfig:
    """Args:
    out_dir: a ``mam batch --out`` folder (its ``ledger.sqlite``; the review database, pose
        cache and exports go beside it unless told otherwise).
    archive_root: where the ledger's paths start (``mam batch``'s INPUT folder or a manifest's
        folder); None: recordings are listed but cannot be played or re-posed.
    db_url: SQLAlchemy URL of the review database (``postgresql+psycopg://...``); None:
        ``DIR/review.sqlite``.
    users_file: the reviewers' user list; None: ``DIR/review_users``.
    key_hashes: SHA-256 digests of the service keys that may log in (as passwords).
    secure_cookie: send the session cookie with ``Secure``; None: when the request is https.
    session_ttl_s: a session's lifetime from login.
    exports_dir: where the export button writes; None: ``DIR/review_exports``.
    blind: blind review for everyone: the model's result is shown to a user only once they
        have marked their own review of the recording done (or it is signed off).
    fhir_base_url: where a sign-off or amendment is pushed as a ``final`` / ``amended``
        DiagnosticReport (through the durable outbox); None: no push. Default: the service's
        ``MAM_FHIR_BASE_URL``.
    fhir_outbox: the outbox file; None: the service's (``MAM_FHIR_OUTBOX``, else beside the
        audit file).
    fhir_auth: options of ``mam.fhir.outbox.make_auth`` (default: the service's
        ``MAM_FHIR_TOKEN``, ``MAM_FHIR_TOKEN_FILE``, ``MAM_FHIR_CLIENT_ID``, ...).
    """

    out_dir: Path
    archive_root: Path | None = None
    db_url: str | None = None
    users_file: Path | None = None
    key_hashes: frozenset[str] = field(default_factory=frozenset)
    secure_cookie: bool | None = None
    session_ttl_s: float = 12 * 3600.0
    exports_dir: Path | None = None
    blind: bool = False
    fhir_base_url: str | None = field(default_factory=lambda: _env("MAM_FHIR_BASE_URL"))
    fhir_outbox: Path | None = field(
        default_factory=lambda: Path(p) if (p := _env("MAM_FHIR_OUTBOX")) else None
    )
    fhir_auth: dict = field(default_factory=lambda: fhir_auth_from_env())

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        if self.archive_root is not None:
            self.archive_root = Path(self.archive_root)
        self.users_file = Path(self.users_file or self.out_dir / USERS_FILE)
        self.exports_dir = Path(self.exports_dir or self.out_dir / EXPORTS_DIR)

    @property
    def database_url(self) -> str:
        from mam.review.store import default_url

        return self.db_url or default_url(self.out_dir)

    @classmethod
    def from_env(cls, key_hashes: frozenset[str] = frozenset()) -> ReviewConfig | None:
        """``MAM_REVIEW_DIR`` (required, else None: no review app), ``MAM_REVIEW_ARCHIVE``,
        ``MAM_REVIEW_DB``, ``MAM_REVIEW_USERS``, ``MAM_REVIEW_SECURE_COOKIE`` (1/0),
        ``MAM_REVIEW_BLIND`` (1: blind review)."""
        out = os.environ.get("MAM_REVIEW_DIR")
        if not out:
            return None
        return cls(
            out_dir=Path(out),
            archive_root=Path(os.environ["MAM_REVIEW_ARCHIVE"])
            if os.environ.get("MAM_REVIEW_ARCHIVE") else None,
            db_url=os.environ.get("MAM_REVIEW_DB") or None,
            users_file=Path(os.environ["MAM_REVIEW_USERS"])
            if os.environ.get("MAM_REVIEW_USERS") else None,
            key_hashes=key_hashes,
            secure_cookie=secure_cookie_setting(),
            blind=blind_setting(),
        )  # fmt: skip
