"""Settings of the review app: given by ``mam review`` or, in the screening service, from the
``MAM_REVIEW_*`` variables (``mam.settings``, where both read them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mam.review.auth import USERS_FILE
from mam.settings import current

EXPORTS_DIR = "review_exports"


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
    fhir_base_url: str | None = field(default_factory=lambda: current().fhir_base_url)
    fhir_outbox: Path | None = field(default_factory=lambda: current().fhir_outbox)
    fhir_auth: dict = field(default_factory=lambda: current().fhir_auth())

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
        s = current()
        if s.review_dir is None:
            return None
        return cls(out_dir=s.review_dir, archive_root=s.review_archive, db_url=s.review_db,
                   users_file=s.review_users, key_hashes=key_hashes,
                   secure_cookie=s.review_secure_cookie, blind=s.review_blind)  # fmt: skip
