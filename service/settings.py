"""Service settings: ``mam.settings.MamSettings`` (every ``MAM_*`` variable the library, the CLI,
batch and review read) and what only the service reads, from the same ``MAM_*`` environment.

They are read once at import: BentoML fixes the batching parameters when the service class is
defined, so a change needs a restart, which is also what Kubernetes does with a ConfigMap.
"""

from __future__ import annotations

import logging
from functools import lru_cache

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from mam.audit import STDOUT, key_digest
from mam.screening import DEFAULT_WEIGHTS
from mam.settings import MamSettings, invalid_setting
from mam.video import VideoLimits

logger = logging.getLogger(__name__)


class Settings(MamSettings):
    """The service's settings; the shared ones (weights, pose backend, runtime, gRPC address, API
    key digests, FHIR, audit) are declared in ``mam.settings``."""

    model_config = SettingsConfigDict(frozen=False)  # read once and kept, not shared per call

    device: str = Field("auto", description="The clip network's device: auto, cpu or cuda.")
    precision: str = Field("fp32", description="The clip network's precision: fp32 or fp16.")

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

    # Authentication (the accepted keys' digests: mam.settings).
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

    agreement_window_days: float = Field(
        30.0, gt=0, description="Rolling window of the clinicians' agreement gauges (days of "
        "finished reviews; service/metrics.py AgreementCollector)."
    )  # fmt: skip

    @field_validator("pose_backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        from mam.pose import available_backends

        if v not in available_backends():
            raise ValueError(f"MAM_POSE_BACKEND must be one of {available_backends()}")
        return v

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

    @model_validator(mode="after")
    def _weights(self) -> Settings:
        """Unset ``MAM_WEIGHTS``: the shipped demo weights (``mam.screening.default_weights``)."""
        if self.weights is None:
            self.weights = DEFAULT_WEIGHTS
        return self

    def fhir_codes(self):
        from mam.fhir import FhirCodes

        return FhirCodes.load(self.fhir_codes_file, self.fhir_unit)

    def audit_log(self):
        from mam.audit import AuditLog

        return AuditLog.from_settings(self, STDOUT)  # the service's default: stdout

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
    """The service's settings; a malformed variable is ``InvalidSettingError`` (its name, never
    its value), as for the CLI."""
    try:
        return Settings()
    except ValidationError as e:
        raise invalid_setting(e) from None
