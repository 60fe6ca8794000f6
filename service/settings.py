"""Service settings, from ``MAM_*`` environment variables (pydantic-settings, as FastAPI does).

They are read once at import: BentoML fixes the batching parameters when the service class is
defined, so a change needs a restart, which is also what Kubernetes does with a ConfigMap.
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from mam.audit import key_digest
from mam.pose.base import DEFAULT_POSE_BACKEND
from mam.screening import default_weights
from mam.video import VideoLimits

logger = logging.getLogger(__name__)

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MAM_", extra="ignore", protected_namespaces=())

    weights: Path = Field(default_factory=default_weights, description="NAME.json of the weights.")
    pose_backend: str = Field(
        default_factory=lambda: DEFAULT_POSE_BACKEND, description="Pose estimator for recordings."
    )
    runtime: str | None = Field(None, description="tensorrt | onnxruntime | pytorch; None: auto.")
    device: str = "auto"
    precision: str = "fp32"

    # Adaptive batching of the clip network (one batcher for REST and gRPC).
    max_batch_size: int = Field(64, ge=1, le=1024, description="Instances per executed batch.")
    max_latency_ms: int = Field(
        20_000, ge=10, description="BentoML's budget: calls predicted to wait longer get 503."
    )
    max_tensor_requests: int = Field(
        16,
        ge=1,
        description="Tensor and pose requests (REST and gRPC) handled at once per worker; more "
        "get 503 before their body is read (service/admission.py).",
    )
    max_queued_instances: int = Field(
        256,
        ge=1,
        description="Tensor and pose requests get 503 while this many instances wait for or run "
        "in the batcher (video jobs count but are never refused here). About 1.2 s of work at "
        "the CPU saturation measured with loadtest/ (214 clips/s, 2 cores); raise it on GPUs.",
    )
    clip_workers: int = Field(1, ge=1, description="Processes running the clip network.")

    grpc_host: str = Field(
        "127.0.0.1", description="gRPC bind address: loopback, as `mam serve --host`."
    )
    grpc_port: int = Field(8001, ge=0, le=65535, description="KServe v2 gRPC port (0: off).")

    # Authentication: SHA-256 hex digests of the accepted API keys, never the keys themselves.
    api_key_hashes: str = Field("", description="Comma-separated SHA-256 hex digests of keys.")
    api_key_hashes_file: Path | None = Field(None, description="Mounted secret, one per line.")
    auth_disabled: bool = Field(False, description="Local development only.")

    # Limits.
    max_upload_mb: float = Field(512.0, gt=0)
    max_duration_s: float = Field(VideoLimits().max_duration_s, gt=0)
    max_resolution: int = Field(VideoLimits().max_width, gt=0, description="Width/height, px.")
    max_instances: int = Field(1024, ge=1, description="Instances per tensors-in request.")
    max_pose_frames: int = Field(25 * 60 * 30, ge=240, description="Frames per pose-in request.")
    request_timeout_s: float = Field(600.0, gt=0, description="Synchronous video requests.")
    task_timeout_s: float = Field(3600.0, gt=0, description="Submitted video tasks.")
    tensor_timeout_s: float = Field(120.0, gt=0, description="Tensors and pose requests.")
    video_concurrency: int = Field(1, ge=1, description="Recordings decoded and posed at once.")
    video_queue: int = Field(8, ge=0, description="Recordings waiting beyond those; more: 503.")
    body_timeout_s: float = Field(
        600.0, gt=0, description="Time a client has to send a whole request body; 408 after."
    )

    # -- hospital integration: FHIR output and push, audit trail ----------------------------------
    fhir_codes_file: Path | None = Field(
        None, description="A site's own FHIR codes and unit, JSON (mam/fhir/codes.py)."
    )
    fhir_unit: Literal["%", "1"] = Field("%", description="UCUM unit of probabilities in FHIR.")
    fhir_base_url: str | None = Field(
        None, description="A site's FHIR server: each screening result with a subject is "
        "POSTed there as a transaction when it is made (None: no push)."
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
    fhir_drain_s: float = Field(
        10.0, ge=0, description="On shutdown, how long due Bundles are still delivered; the rest "
        "stay in the outbox for the next start."
    )  # fmt: skip
    agreement_window_days: float = Field(
        30.0, gt=0, description="Rolling window of the clinicians' agreement gauges (days of "
        "finished reviews; service/metrics.py AgreementCollector)."
    )  # fmt: skip
    audit_file: str = Field(
        "-", description="Audit trail (mam/audit.py): '-' stdout, a path (rotated), or 'off'."
    )
    audit_max_mb: float = Field(100.0, gt=0, description="Size at which the audit file rotates.")
    audit_backups: int = Field(10, ge=0, description="Rotated audit files kept.")

    @field_validator("pose_backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        from mam.pose import available_backends

        if v not in available_backends():
            raise ValueError(f"MAM_POSE_BACKEND must be one of {available_backends()}")
        return v

    @field_validator("api_key_hashes")
    @classmethod
    def _hex_digests(cls, v: str) -> str:
        for h in filter(None, (x.strip().lower() for x in v.split(","))):
            if not _HEX64.match(h):
                raise ValueError("MAM_API_KEY_HASHES must be SHA-256 hex digests (64 hex chars)")
        return v

    def key_hashes(self) -> frozenset[str]:
        hashes = {x.strip().lower() for x in self.api_key_hashes.split(",") if x.strip()}
        if self.api_key_hashes_file is not None:
            for line in self.api_key_hashes_file.read_text().splitlines():
                line = line.strip().lower()
                if line and not line.startswith("#"):
                    if not _HEX64.match(line):
                        raise ValueError(f"{self.api_key_hashes_file}: not a SHA-256 hex digest")
                    hashes.add(line)
        return frozenset(hashes)

    @field_validator("fhir_base_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        from mam.errors import MamError
        from mam.fhir.outbox import check_url

        if not v:
            return None
        try:  # https, or http on loopback only: results are health data
            return check_url(v, "MAM_FHIR_BASE_URL")
        except MamError as e:
            raise ValueError(str(e)) from None

    def fhir_outbox_path(self) -> Path:
        """``fhir_outbox``, else beside the audit file, else the working folder."""
        if self.fhir_outbox is not None:
            return self.fhir_outbox
        if self.audit_file not in ("-", "off"):
            return Path(self.audit_file).with_name("fhir-outbox.sqlite")
        return Path("fhir-outbox.sqlite")

    def fhir_codes(self):
        from mam.fhir import FhirCodes

        return FhirCodes.load(self.fhir_codes_file, self.fhir_unit)

    def audit_log(self):
        from mam.audit import AuditLog

        return AuditLog(self.audit_file, int(self.audit_max_mb * 2**20), self.audit_backups)

    def video_limits(self) -> VideoLimits:
        return VideoLimits(
            max_duration_s=self.max_duration_s,
            max_width=self.max_resolution,
            max_height=self.max_resolution,
            max_file_bytes=int(self.max_upload_mb * 2**20),
        )


def hash_key(key: str) -> str:
    """What to put in ``MAM_API_KEY_HASHES`` for a key (``mam serve --hash-key`` prints it)."""
    return key_digest(key)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
