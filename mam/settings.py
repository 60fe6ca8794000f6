"""Every ``MAM_*`` environment variable, declared once with its type, default and meaning.

The CLI, ``mam batch``, the review app and the library read configuration only through
:func:`current`; the service's settings (``service/settings.py``) subclass :class:`MamSettings`
and add what only the service reads. Nothing else in ``mam/`` or ``service/`` reads the
environment (a test greps for it), so a variable's name, type and default are found here.

``current()`` builds the settings once per state of the environment: they are cached under the
``MAM_*`` variables' current values, so a change (``monkeypatch.setenv`` in a test, a caller
setting a variable on purpose) is seen at the next call with no reset to remember, while an
unchanged environment costs a scan of it (tens of microseconds) instead of a pydantic build
(about 2 ms). The settings are frozen, as a shared cached object must be. The service reads its
own settings once at import instead (``service.settings.get_settings``): BentoML fixes its
batching parameters when the service class is defined.

A malformed value is a typed error (:class:`InvalidSettingError`, naming the variable but never
its value, which may be a secret) wherever settings are read: a deployment with a typo fails at
once rather than when the variable is first needed. An empty variable counts as unset.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from mam.errors import InputError

PREFIX = "MAM_"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class InvalidSettingError(InputError):
    """A ``MAM_*`` environment variable holds a value of the wrong type or range."""

    code = "invalid_setting"


class InvalidKeyHashesError(InvalidSettingError):
    """``MAM_API_KEY_HASHES`` (or its file) holds something other than SHA-256 hex digests."""

    code = "invalid_api_key_hashes"


def parse_key_hashes(text: str, source: str) -> frozenset[str]:
    """SHA-256 hex digests separated by commas or lines (``#`` starts a comment line), lower
    case; any other entry is an :class:`InvalidKeyHashesError` naming ``source`` but not the
    entry (it may be a key pasted where its digest belongs). The one parser of accepted keys,
    for the service and ``mam review`` alike."""
    out = set()
    for line in text.splitlines():
        if line.strip().startswith("#"):
            continue
        for entry in line.split(","):
            h = entry.strip().lower()
            if h and not _HEX64.match(h):
                raise InvalidKeyHashesError(
                    f"{source}: an entry is not a SHA-256 hex digest (64 hex characters; "
                    "mam serve --hash-key KEY prints one)"
                )
            if h:
                out.add(h)
    return frozenset(out)


def _flag(v) -> bool:
    """1/true/yes/on (any case): True; anything else, as before these settings: False."""
    return str(v).strip().lower() in _TRUE


def _demo_weights() -> Path:
    from mam.shipped import models_dir

    return models_dir() / "mam_demo.json"


def _default_pose_backend() -> str:
    from mam.pose.base import DEFAULT_POSE_BACKEND

    return DEFAULT_POSE_BACKEND


class MamSettings(BaseSettings):
    """The ``MAM_*`` variables of the CLI, batch, the review app and the library (field
    ``pose_stride`` is ``MAM_POSE_STRIDE``)."""

    model_config = SettingsConfigDict(
        env_prefix=PREFIX,
        extra="ignore",
        protected_namespaces=(),
        env_ignore_empty=True,
        str_strip_whitespace=True,
        frozen=True,
    )

    # -- model and data ---------------------------------------------------------------------------
    weights: Path | None = Field(
        None, description="NAME.json of the weights; None: the shipped demo weights."
    )
    demo_poses: Path | None = Field(
        None, description="Real infant motion for mam synth; None: the copy in the package."
    )

    # -- pose estimation --------------------------------------------------------------------------
    pose_backend: str = Field(
        default_factory=_default_pose_backend, description="Pose estimator for recordings."
    )
    pose_runtime: str | None = Field(
        None, description="Where pose networks run (onnxruntime, tensorrt, ...); None: auto."
    )
    pose_device: str | None = Field(None, description="cpu or cuda for pose networks; None: auto.")
    pose_cache: Path | None = Field(
        None, description="Pose networks converted on this machine; None: ~/.cache/mam/pose."
    )
    pose_stride: int = Field(
        1, description="Pose every Nth frame, interpolated (opt-in speed candidate; <1 means 1)."
    )
    hrnet_weights: Path | None = Field(
        None, description="The site's fine-tuned HRNet checkpoint (hrnet-videopose3d backend)."
    )
    lifter_weights: Path | None = Field(
        None, description="The 2D-to-3D lifter (hrnet-videopose3d); None: the shipped one."
    )

    # -- clip network runtime ---------------------------------------------------------------------
    runtime: str | None = Field(None, description="tensorrt | onnxruntime | pytorch; None: auto.")
    runtime_threads: int = Field(
        0, ge=0, description="CPU threads of ONNX Runtime sessions; 0: the usable CPUs."
    )
    torch_compile: bool = Field(
        False, description="1: torch.compile the clip network on CUDA (pytorch runtime)."
    )
    engine_cache: Path | None = Field(
        None, description="TensorRT engines built on this machine; None: ~/.cache/mam/engines."
    )

    # -- serving (mam serve passes these to the service) ------------------------------------------
    grpc_host: str = Field(
        "127.0.0.1", description="gRPC bind address: loopback, as `mam serve --host`."
    )
    grpc_port: int = Field(8001, ge=0, le=65535, description="KServe v2 gRPC port (0: off).")

    # -- authentication: digests of accepted keys, never the keys; the key a client sends --------
    api_key: SecretStr | None = Field(
        None, description="The key mam batch --service sends (its audit lines carry its id)."
    )
    api_key_hashes: str = Field("", description="Comma-separated SHA-256 hex digests of keys.")
    api_key_hashes_file: Path | None = Field(None, description="Mounted secret, one per line.")

    # -- audit trail ------------------------------------------------------------------------------
    audit_file: str | None = Field(
        None, description="Audit trail (mam/audit.py): '-' stdout, a path (rotated), or 'off'; "
        "None: each command's own default (the service '-', mam batch OUT/audit.jsonl, mam "
        "screen none)."
    )  # fmt: skip
    audit_max_mb: float = Field(100.0, gt=0, description="Size at which the audit file rotates.")
    audit_backups: int = Field(10, ge=0, description="Rotated audit files kept.")

    # -- the review app ---------------------------------------------------------------------------
    review_dir: Path | None = Field(
        None, description="The service mounts the review app over this mam batch --out folder."
    )
    review_archive: Path | None = Field(None, description="Where the ledger's paths start.")
    review_db: str | None = Field(
        None, description="SQLAlchemy URL of the review database; None: DIR/review.sqlite."
    )
    review_users: Path | None = Field(
        None, description="The reviewers' user list; None: DIR/review_users."
    )
    review_secure_cookie: bool | None = Field(
        None, description="1: session cookies always Secure; 0: never; unset: when https."
    )
    review_blind: bool = Field(
        False, description="1: blind review for the whole deployment (model shown after one's own)."
    )

    # -- FHIR -------------------------------------------------------------------------------------
    fhir_codes_file: Path | None = Field(
        None, description="A site's own FHIR codes and unit, JSON (mam/fhir/codes.py)."
    )
    fhir_unit: Literal["%", "1"] | None = Field(
        None, description="UCUM unit of probabilities in FHIR; None: the codes file's, else %."
    )
    fhir_base_url: str | None = Field(
        None, description="A site's FHIR server: results (the service) and sign-offs (review) "
        "are pushed there; the default of mam fhir push --base-url. None: no push."
    )  # fmt: skip
    fhir_token_file: Path | None = Field(
        None, description="Mounted secret holding the FHIR server's bearer token (read per push)."
    )
    fhir_token: SecretStr | None = Field(None, description="The bearer token itself (a Secret).")
    fhir_client_id: str | None = Field(
        None, description="OAuth2 client credentials (SMART Backend Services): the client id."
    )
    fhir_token_url: str | None = Field(None, description="OAuth2 token endpoint.")
    fhir_client_secret_file: Path | None = Field(
        None, description="Mounted secret: the client secret (client_secret_basic)."
    )
    fhir_private_key_file: Path | None = Field(
        None, description="Mounted secret: the client's private key (private_key_jwt)."
    )
    fhir_outbox: Path | None = Field(
        None, description="The durable FHIR outbox, SQLite (mam.fhir.outbox); default beside "
        "MAM_AUDIT_FILE when that is a file, else fhir-outbox.sqlite in the working folder."
    )  # fmt: skip
    fhir_push_attempts: int = Field(
        100, ge=1, le=10000, description="Tries before a Bundle is given up (kept in the "
        "outbox, re-sent with mam fhir outbox retry)."
    )  # fmt: skip
    fhir_push_timeout_s: float = Field(30.0, gt=0, description="Per FHIR request.")
    fhir_push_backoff_s: float = Field(
        2.0, ge=0, description="First wait before a retry; doubles (jittered), at most 15 min."
    )
    fhir_resolve_references: Literal["client", "server"] | None = Field(
        None, description="Conditional references resolved by mam (client, the default) or "
        "sent as written for the server to resolve (server) (mam.fhir.outbox)."
    )  # fmt: skip
    fhir_drain_s: float = Field(
        10.0, ge=0, description="On shutdown, how long due Bundles are still delivered; the rest "
        "stay in the outbox for the next start."
    )  # fmt: skip

    # -- DICOMweb ---------------------------------------------------------------------------------
    dicomweb_base_url: str | None = Field(
        None, description="The PACS's DICOMweb root: the default of mam dicom store --base-url."
    )
    dicomweb_token_file: Path | None = Field(
        None, description="Mounted secret: the PACS's bearer token."
    )
    dicomweb_basic_auth_file: Path | None = Field(
        None, description="Mounted secret: user:password for the PACS (HTTP Basic)."
    )

    # -- parsing ----------------------------------------------------------------------------------
    @field_validator("torch_compile", "review_blind", mode="before")
    @classmethod
    def _lenient_flag(cls, v):
        return _flag(v)

    @field_validator("review_secure_cookie", mode="before")
    @classmethod
    def _tri_state(cls, v):
        """1/true/yes: True; 0/false/no: False; anything else: None (Secure when https)."""
        if v is None or isinstance(v, bool):
            return v
        raw = str(v).strip().lower()
        return True if raw in _TRUE else False if raw in _FALSE else None

    @field_validator("pose_stride")
    @classmethod
    def _at_least_one(cls, v: int) -> int:
        return max(1, v)

    @field_validator("api_key_hashes")
    @classmethod
    def _hex_digests(cls, v: str) -> str:
        parse_key_hashes(v, PREFIX + "API_KEY_HASHES")
        return v

    # -- derived ----------------------------------------------------------------------------------
    def key_hashes(self) -> frozenset[str]:
        """The accepted keys' digests: ``MAM_API_KEY_HASHES`` and the lines of
        ``MAM_API_KEY_HASHES_FILE`` (read now: a mounted secret can change)."""
        hashes = parse_key_hashes(self.api_key_hashes, PREFIX + "API_KEY_HASHES")
        f = self.api_key_hashes_file
        if f is None:
            return hashes
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidKeyHashesError(
                f"MAM_API_KEY_HASHES_FILE {f}: cannot read it ({type(e).__name__})"
            ) from None
        return hashes | parse_key_hashes(text, f"MAM_API_KEY_HASHES_FILE {f}")

    def fhir_outbox_path(self) -> Path:
        """``fhir_outbox``, else beside the audit file when that is a file, else
        ``fhir-outbox.sqlite`` in the working folder."""
        from mam.fhir.outbox import OUTBOX

        if self.fhir_outbox is not None:
            return self.fhir_outbox
        if self.audit_file and self.audit_file not in ("-", "off"):
            return Path(self.audit_file).parent / OUTBOX
        return Path(OUTBOX)

    def fhir_auth(self) -> dict:
        """The FHIR push credentials as ``mam.fhir.outbox.make_auth`` options (those set)."""
        token = self.fhir_token.get_secret_value() if self.fhir_token else None
        opts = {
            "token": token,
            "token_file": self.fhir_token_file,
            "client_id": self.fhir_client_id,
            "token_url": self.fhir_token_url,
            "client_secret_file": self.fhir_client_secret_file,
            "private_key_file": self.fhir_private_key_file,
        }
        return {k: v for k, v in opts.items() if v is not None}

    def api_key_value(self) -> str | None:
        return self.api_key.get_secret_value() if self.api_key else None


def env_name(field: str) -> str:
    """The environment variable of a settings field (``pose_stride`` -> ``MAM_POSE_STRIDE``)."""
    return PREFIX + field.upper()


def invalid_setting(e: ValidationError) -> InvalidSettingError:
    """A pydantic validation error as the typed error, naming each variable but no value."""
    parts = []
    for err in e.errors(include_input=False, include_url=False):
        name = env_name(str(err["loc"][0])) if err.get("loc") else "a MAM_* variable"
        parts.append(f"{name}: {err['msg']}")
    return InvalidSettingError("; ".join(parts) or "a MAM_* environment variable is malformed")


def current() -> MamSettings:
    """The settings as the environment holds them now (cached per state of the ``MAM_*``
    variables; see the module docstring). ``InvalidSettingError`` when one is malformed."""
    # The one read of the environment for configuration: the key of the cache.
    key = tuple(sorted((k, v) for k, v in os.environ.items() if k[:4].upper() == PREFIX))
    return _build(key)


@lru_cache(maxsize=8)
def _build(key: tuple) -> MamSettings:
    try:
        return MamSettings()
    except ValidationError as e:
        raise invalid_setting(e) from None
