"""The service's Prometheus metrics: prefix ``mam_``, unit suffixes, no identifiers in labels.

Served on ``/metrics`` beside BentoML's own. ``prometheus_client`` is imported only when the
metrics are first built (inside a BentoML worker): it decides at import whether to write the
multi-process files that let one ``/metrics`` report every worker process.

Labels are drawn from fixed sets (endpoint names, protocols, error codes, outcomes); nothing of a
request, a recording or an infant ever becomes a label value.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

from service.errors import OVERLOADED

PREFIX = "mam_"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
FPS_BUCKETS = (5, 10, 20, 40, 60, 80, 120, 160, 240, 320, 640)


class Metrics:
    def __init__(self) -> None:
        import prometheus_client as pc  # deferred: see the module docstring

        def gauge(name: str, doc: str, labels=(), mode: str = "livesum") -> Any:
            kw = {"multiprocess_mode": mode} if os.environ.get("PROMETHEUS_MULTIPROC_DIR") else {}
            return pc.Gauge(PREFIX + name, doc, labels, **kw)

        ep = ("endpoint", "protocol")
        self.requests = pc.Counter(
            PREFIX + "requests_total",
            "Requests by endpoint, protocol and outcome code.",
            (*ep, "code"),
        )
        self.errors = pc.Counter(
            PREFIX + "request_errors_total", "Failed requests by error code.", (*ep, "code")
        )
        self.request_seconds = pc.Histogram(
            PREFIX + "request_duration_seconds",
            "End-to-end request latency.",
            ep,
            buckets=LATENCY_BUCKETS,
        )
        self.queue_wait_seconds = pc.Histogram(
            PREFIX + "queue_wait_seconds",
            "Time instances waited for the adaptive batcher (call time minus batch compute).",
            buckets=LATENCY_BUCKETS,
        )
        self.compute_seconds = pc.Histogram(
            PREFIX + "model_compute_seconds",
            "Clip-network time per executed batch.",
            buckets=LATENCY_BUCKETS,
        )
        self.pose_seconds = pc.Histogram(
            PREFIX + "pose_seconds",
            "Decode and pose estimation per recording.",
            buckets=LATENCY_BUCKETS,
        )
        self.batch_rows = pc.Histogram(
            PREFIX + "batch_rows",
            "Instances (rows) per executed clip-network batch.",
            buckets=ROW_BUCKETS,
        )
        self.in_flight = gauge("requests_in_flight", "Requests being handled.", ("protocol",))
        self.queue_rows = gauge(
            "queue_depth_rows", "Instances sent to the batcher and not yet answered."
        )
        self.video_jobs = gauge(
            "video_jobs", "Recordings waiting for or in pose estimation.", ("state",)
        )
        self.load_shed = pc.Counter(
            PREFIX + "load_shed_total", "Requests refused with 503 to protect latency.", ep
        )
        self.videos = pc.Counter(PREFIX + "videos_total", "Recordings processed.", ("outcome",))
        self.video_seconds = pc.Counter(
            PREFIX + "video_seconds_total", "Seconds of recording screened."
        )
        self.pose_frames = pc.Counter(PREFIX + "pose_frames_total", "Frames through pose.")
        self.clip_fallback = pc.Counter(
            PREFIX + "clip_fallback_total",
            "Clip-network calls run in the entry worker because ClipModel was unreachable "
            "(it stops first on shutdown).",
        )
        self.pose_fps = pc.Histogram(
            PREFIX + "pose_frames_per_second",
            "Pose throughput per recording.",
            buckets=FPS_BUCKETS,
        )
        self.model_info = gauge(
            "model_info",
            "The loaded model (value 1).",
            ("name", "version", "backend", "precision", "device"),
            mode="max",
        )
        # FHIR push (issue 17): outcome is one of ok, failed (gave up after retries), rejected
        # (a final 4xx from the site's server), skipped (no subject given).
        self.fhir_push = pc.Counter(
            PREFIX + "fhir_push_total", "Results pushed to the site's FHIR server.", ("outcome",)
        )
        for outcome in ("ok", "failed", "rejected", "skipped"):  # exported at 0 from the start
            self.fhir_push.labels(outcome=outcome)
        self.fhir_push_retries = pc.Counter(
            PREFIX + "fhir_push_retries_total", "FHIR push attempts that were retried."
        )
        self.fhir_push_pending = gauge("fhir_push_pending", "FHIR pushes queued or in flight.")

    def observe_request(
        self, endpoint: str, protocol: str, code: str, seconds: float | None = None
    ) -> None:
        """One finished request, whatever the protocol: count, errors, shedding, latency."""
        labels = {"endpoint": endpoint, "protocol": protocol}
        self.requests.labels(**labels, code=code).inc()
        if seconds is not None:
            self.request_seconds.labels(**labels).observe(seconds)
        if code != "ok":
            self.errors.labels(**labels, code=code).inc()
        if code == OVERLOADED:
            self.load_shed.labels(**labels).inc()


@lru_cache(maxsize=1)
def get_metrics() -> Metrics:
    return Metrics()
