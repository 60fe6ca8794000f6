"""The service's Prometheus metrics: prefix ``mam_``, unit suffixes, no identifiers in labels.

Served on ``/metrics`` beside BentoML's own. ``prometheus_client`` is imported only when the
metrics are first built (inside a BentoML worker): it decides at import whether to write the
multi-process files that let one ``/metrics`` report every worker process.

Labels are drawn from fixed sets (endpoint names, protocols, error codes, outcomes); nothing of a
request, a recording or an infant ever becomes a label value.
"""

from __future__ import annotations

import logging
import math
import os
from functools import lru_cache
from typing import Any

from service.errors import OVERLOADED

logger = logging.getLogger(__name__)

PREFIX = "mam_"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
FPS_BUCKETS = (5, 10, 20, 40, 60, 80, 120, 160, 240, 320, 640)

# -- what the model answers (model-quality monitoring) ---------------------------------------------
# Every label value below comes from these fixed sets; a result only ever picks one of them.
KINDS = ("video", "pose_file", "instances")  # mam.domain.kind_of, or tensors given by the caller
CLASSIFICATIONS = ("normal", "risk", "indeterminate")
REASONS = (
    "out_of_domain",  # the domain check: motion statistics or clip embeddings unlike training
    "unknown_kind",  # a kind of input the weights hold no domain record of
    "no_domain_record",  # weights without any domain record: the check cannot run
    "insufficient_tracking",  # the quality gate (mam.screening.MIN_TRACKED_FOR_RESULT)
    "no_movement",  # a still skeleton
    "other",  # a reason this table does not know yet (tests keep it unused)
)
EXPECTED_OUTCOMES = ("risk", "out_of_domain")
SHARE_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
DOMAIN_BUCKETS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)
TRACKED_BUCKETS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 1.0)
# Clinicians' agreement with the model (AgreementCollector): fixed names here too.
MEASURES = ("sensitivity", "specificity")
CLINICIAN_GROUPS = ("risk", "normal", "no_group", "split")  # mam.review.agreement's


@lru_cache(maxsize=1)
def _reason_table() -> tuple[dict[str, str], tuple[tuple[str, str], ...]]:
    """(exact sentence -> code, (sentence prefix, code)) from the modules that write them."""
    from mam import domain, screening

    exact = {s: "out_of_domain" for pair in domain._REASONS.values() for s in pair}
    exact[domain.EMBEDDING_REASON] = "out_of_domain"
    exact[screening.NO_DOMAIN] = "no_domain_record"
    exact["no clip embeddings were computed"] = "no_domain_record"
    exact[screening.STILL] = "no_movement"
    prefixes = (
        ("the infant was tracked in only", "insufficient_tracking"),
        ("the model was never trained on this kind of input", "unknown_kind"),
    )
    return exact, prefixes


def reason_code(reason: str) -> str:
    """The one mapping of a result's reason (a sentence for people) to a label value."""
    exact, prefixes = _reason_table()
    if reason in exact:
        return exact[reason]
    return next((code for p, code in prefixes if reason.startswith(p)), "other")


def result_kind(result) -> str:
    """``instances`` for tensors given by the caller (no quality), else the domain check's kind."""
    if getattr(result, "quality", None) is None:
        return "instances"
    kind = result.domain.kind
    return kind if kind in KINDS else "video"


def expected_rates(meta) -> dict[tuple[str, str], tuple[float, int]]:
    """``(kind, outcome) -> (rate, recordings)``: what the weights measured on infants they never
    trained on, for ``outcome`` risk or out_of_domain. Only rates the weights store, or that
    follow exactly from stored counts; nothing for the rest.

    * out_of_domain: ``provenance.domain.heldout_flagged`` (share of the calibration hold-out the
      domain check flags), with ``heldout`` recordings;
    * risk: a kind's stored operating point (``provenance.calibration.operating_point``, written
      by recalibration): the share called risk on those recordings is
      ``(risk * sensitivity + normal * (1 - specificity)) / infants``;
    * ``provenance.heldout_results[kind]`` (``recordings`` and a rate per outcome), where
      training records the rates directly, takes precedence."""
    prov = getattr(meta, "provenance", None) or {}
    out: dict[tuple[str, str], tuple[float, int]] = {}
    dom = prov.get("domain") or {}
    for kind, rate in (dom.get("heldout_flagged") or {}).items():
        n = (dom.get("heldout") or {}).get(kind)
        out[kind, "out_of_domain"] = (float(rate), int(n or 0))
    for kind, op in ((prov.get("calibration") or {}).get("operating_point") or {}).items():
        try:
            n, risk = int(op["infants"]), int(op["risk_infants"])
            called = risk * op["sensitivity"] + (n - risk) * (1 - op["specificity"])
            out[kind, "risk"] = (called / n, n)
        except (KeyError, TypeError, ZeroDivisionError):
            continue
    for kind, rec in (prov.get("heldout_results") or {}).items():
        for outcome in EXPECTED_OUTCOMES:
            if isinstance(rec, dict) and rec.get(outcome) is not None:
                out[kind, outcome] = (float(rec[outcome]), int(rec.get("recordings") or 0))
    return {
        k: v
        for k, v in out.items()
        if k[0] in KINDS and k[1] in EXPECTED_OUTCOMES and 0 <= v[0] <= 1 and math.isfinite(v[0])
    }


def validated_agreement(meta) -> dict[tuple[str, str], tuple[float, int]]:
    """``(kind, measure) -> (value, recordings)``: the sensitivity and specificity the weights
    were validated at, where they store them: a kind's calibrated operating point
    (``provenance.calibration.operating_point``: infants at risk behind the sensitivity, the
    others behind the specificity), or ``provenance.heldout_results[kind]`` when it holds
    ``sensitivity``/``specificity`` (with ``risk_infants``/``normal_infants``), which takes
    precedence. Nothing for the rest: no band, no alert."""
    prov = getattr(meta, "provenance", None) or {}
    out: dict[tuple[str, str], tuple[float, int]] = {}
    for kind, op in ((prov.get("calibration") or {}).get("operating_point") or {}).items():
        try:
            n, risk = int(op["infants"]), int(op["risk_infants"])
            out[kind, "sensitivity"] = (float(op["sensitivity"]), risk)
            out[kind, "specificity"] = (float(op["specificity"]), n - risk)
        except (KeyError, TypeError, ValueError):
            continue
    for kind, rec in (prov.get("heldout_results") or {}).items():
        for measure, n_key in (("sensitivity", "risk_infants"), ("specificity", "normal_infants")):
            if isinstance(rec, dict) and rec.get(measure) is not None:
                out[kind, measure] = (float(rec[measure]), int(rec.get(n_key) or 0))
    return {
        k: v for k, v in out.items() if k[0] in KINDS and 0 <= v[0] <= 1 and math.isfinite(v[0])
    }


# The agreement collector's gauge families: key -> (name without prefix, help, label names).
AGREEMENT_FAMILIES = {
    "ratio": ("clinician_agreement_ratio", "Sensitivity and specificity of the model's risk "
              "label against the clinicians' finished verdicts in the window (indeterminate "
              "results excluded); absent without verdicts.", ("kind", "measure")),
    "n": ("clinician_agreement_recordings", "Recordings behind each agreement ratio "
          "(clinicians' risk, resp. normal, with a model label).", ("kind", "measure")),
    "kappa": ("clinician_agreement_clip_kappa", "Median Cohen's kappa of FMs clips, clinicians "
              "against the model, over the reviews in the window.", ("kind",)),
    "kappa_n": ("clinician_agreement_clip_kappa_reviews", "Reviews behind the clip kappa.",
                ("kind",)),
    "verdicts": ("clinician_verdicts", "Recordings with a finished clinicians' verdict in the "
                 "window, by the clinicians' group (risk, normal, no_group, split) and the "
                 "model's label.", ("kind", "clinician", "model")),
    "other": ("clinician_verdicts_other_model", "Finished verdicts in the window on results of "
              "other weights than the loaded ones (not counted above).", ()),
    "window": ("clinician_agreement_window_seconds", "The rolling window of the agreement "
               "gauges (MAM_AGREEMENT_WINDOW_DAYS).", ()),
}  # fmt: skip


class AgreementCollector:
    """Clinicians' agreement with the model, computed at scrape time from the review store and
    the batch ledger (a Prometheus custom collector: ``collect()`` yields gauge families), so
    every process and every restart sees the same figures, whoever wrote the reviews.

    Counted: screened recordings whose clinicians' verdict was finished within the window
    (:func:`mam.review.agreement.clinicians_verdicts`: the signed-off verdict, else the done
    assessors' shared group) and whose result the loaded model made (same digest; others are
    only counted in ``mam_clinician_verdicts_other_model``). Until :meth:`watch` is given a
    review app it yields the families without samples. Labels: kind, measure, clinician and
    model from fixed sets; never a recording, a reviewer or an infant. It follows
    prometheus_client's collector protocol (``describe``, ``collect``) without subclassing its
    ``Collector``: importing prometheus_client here would fix the metrics mode too early.
    """

    def __init__(self, window_s: float = 30 * 86400.0, digest=lambda: None, clock=None) -> None:
        import time

        self.source = None
        self.window_s = window_s
        self.digest = digest
        self.clock = clock or time.time
        self._cache: tuple[tuple | None, list[dict]] = (None, [])

    def watch(self, catalog, store, window_s: float | None = None) -> None:
        """Read agreement from ``catalog`` (the ledger's recordings) and ``store`` (reviews)."""
        self.source = (catalog, store)
        if window_s is not None:
            self.window_s = window_s
        self._cache = (None, [])

    def _rows(self) -> list[dict]:
        from mam.review.agreement import clinicians_verdicts

        catalog, store = self.source
        stamp, recs = catalog.snapshot()
        key = (stamp, store.audit_count())  # every review change writes an audit row
        if key != self._cache[0]:
            self._cache = (key, clinicians_verdicts(recs, store))
        return self._cache[1]

    def _families(self) -> dict:
        from prometheus_client.core import GaugeMetricFamily

        return {
            k: GaugeMetricFamily(PREFIX + name, doc, labels=labels)
            for k, (name, doc, labels) in AGREEMENT_FAMILIES.items()
        }

    def describe(self):
        return list(self._families().values())

    def collect(self):
        from mam.review.agreement import live_agreement

        fam = self._families()
        if self.source is not None:
            try:
                since = self.clock() - self.window_s
                rows = [r for r in self._rows() if r["at"] >= since]
                digest = self.digest()
                ours = [r for r in rows if digest is None or r["digest"] == digest]
                fam["other"].add_metric((), len(rows) - len(ours))
                fam["window"].add_metric((), self.window_s)
                for kind, a in sorted(live_agreement(ours).items()):
                    if kind not in KINDS:
                        continue
                    for (clinician, model), n in sorted(a["verdicts"].items()):
                        fam["verdicts"].add_metric((kind, clinician, model), n)
                    for m in MEASURES:
                        fam["n"].add_metric((kind, m), a[m + "_recordings"])
                        if a[m] is not None:
                            fam["ratio"].add_metric((kind, m), a[m])
                    fam["kappa_n"].add_metric((kind,), a["clip_kappa_reviews"])
                    if a["clip_kappa"] is not None:
                        fam["kappa"].add_metric((kind,), a["clip_kappa"])
            except Exception as e:  # noqa: BLE001 - a scrape never fails for the reviews
                logger.warning("clinician agreement metrics skipped: %s", type(e).__name__)
        yield from fam.values()


class Metrics:
    def __init__(self) -> None:
        import prometheus_client as pc  # deferred: see the module docstring

        def gauge(name: str, doc: str, labels=(), mode: str = "livesum") -> Any:
            # prometheus_client's own variable (set by BentoML), not a mam.settings one.
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
            "The loaded model (value 1); digest is the model digest (mam.model.weights).",
            ("name", "version", "digest", "backend", "precision", "device"),
            mode="max",
        )
        # What the model answers. kind: video, pose_file, instances; every series of the fixed
        # sets exists at 0 from the start, so rates see the first result too.
        self.results = pc.Counter(
            PREFIX + "results_total",
            "Screening results by kind of input and classification.",
            ("kind", "classification"),
        )
        self.result_reasons = pc.Counter(
            PREFIX + "result_reasons_total",
            "Results that carry a reason the model cannot speak for them (indeterminate), by "
            "reason code; a result counts once under each of its codes.",
            ("kind", "reason"),
        )
        hist = {
            "risk_probability": ("P(risk) of every result.", SHARE_BUCKETS),
            "fms_frequency": ("FMs frequency (share of clips with FMs).", SHARE_BUCKETS),
            "domain_score": ("Domain score (in domain while <= 1), where scored.", DOMAIN_BUCKETS),
            "tracked_fraction": (
                "Share of frames tracked (recordings and poses only).",
                TRACKED_BUCKETS,
            ),
        }
        self.result_hist = {
            k: pc.Histogram(PREFIX + "result_" + k, doc, ("kind",), buckets=b)
            for k, (doc, b) in hist.items()
        }
        for kind in KINDS:
            for c in CLASSIFICATIONS:
                self.results.labels(kind=kind, classification=c)
            for r in REASONS:
                self.result_reasons.labels(kind=kind, reason=r)
            for k, h in self.result_hist.items():
                if not (k == "tracked_fraction" and kind == "instances"):
                    h.labels(kind=kind)
        self.expected_rate = gauge(
            "expected_result_rate",
            "Share of results the weights gave on held-out infants (validation time), by kind "
            "and outcome (risk, out_of_domain); absent where the weights store none.",
            ("kind", "outcome"),
            mode="max",
        )
        self.expected_recordings = gauge(
            "expected_result_rate_recordings",
            "Held-out recordings behind each expected rate.",
            ("kind", "outcome"),
            mode="max",
        )
        self.validated = gauge(
            "validated_agreement_ratio",
            "Sensitivity and specificity the weights were validated at (calibrated operating "
            "point), by kind and measure; absent where the weights store none.",
            ("kind", "measure"),
            mode="max",
        )
        self.validated_recordings = gauge(
            "validated_agreement_recordings",
            "Held-out infants behind each validated ratio (at risk: sensitivity; not: "
            "specificity).",
            ("kind", "measure"),
            mode="max",
        )
        self.model_digest: str | None = None  # the loaded model's, once export_expectations ran
        # Clinicians' agreement: computed at scrape time from the review store (watch_agreement).
        self.agreement = AgreementCollector(digest=lambda: self.model_digest)
        if _WATCHED:
            self.agreement.watch(*_WATCHED[0])
        pc.REGISTRY.register(self.agreement)
        # FHIR push: outcome is one of ok, failed (given up after its tries, kept in the
        # outbox), rejected (a final 4xx from the site's server), skipped (no subject given).
        self.fhir_push = pc.Counter(
            PREFIX + "fhir_push_total", "Results pushed to the site's FHIR server.", ("outcome",)
        )
        for outcome in ("ok", "failed", "rejected", "skipped"):  # exported at 0 from the start
            self.fhir_push.labels(outcome=outcome)
        self.fhir_push_retries = pc.Counter(
            PREFIX + "fhir_push_retries_total", "FHIR push attempts that were retried."
        )
        # Every process reads the one outbox file's count: the largest is the truth, not the sum.
        self.fhir_push_pending = gauge("fhir_push_pending", "FHIR Bundles pending in the outbox.",
                                       mode="livemax")  # fmt: skip

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

    def observe_result(self, result) -> None:
        kind = result_kind(result)
        label = result.classification.label
        if label in CLASSIFICATIONS:
            self.results.labels(kind=kind, classification=label).inc()
        for code in sorted({reason_code(r) for r in result.classification.reasons}):
            self.result_reasons.labels(kind=kind, reason=code).inc()
        h = self.result_hist
        h["risk_probability"].labels(kind=kind).observe(result.risk_probability)
        h["fms_frequency"].labels(kind=kind).observe(result.fms_frequency)
        if result.domain.score is not None and math.isfinite(result.domain.score):
            h["domain_score"].labels(kind=kind).observe(result.domain.score)
        if kind != "instances":
            h["tracked_fraction"].labels(kind=kind).observe(result.quality.tracked_fraction)

    def export_expectations(self, meta) -> None:
        """The weights' validation-time rates (``expected_rates``) as gauges."""
        for (kind, outcome), (rate, n) in expected_rates(meta).items():
            self.expected_rate.labels(kind=kind, outcome=outcome).set(rate)
            self.expected_recordings.labels(kind=kind, outcome=outcome).set(n)
        for (kind, measure), (value, n) in validated_agreement(meta).items():
            self.validated.labels(kind=kind, measure=measure).set(value)
            self.validated_recordings.labels(kind=kind, measure=measure).set(n)
        self.model_digest = getattr(meta, "digest", None)


@lru_cache(maxsize=1)
def get_metrics() -> Metrics:
    return Metrics()


def observe_result(result) -> None:
    """Count one finished result (REST, gRPC, tasks). Metrics never fail a screening: an error
    here is logged by type only (nothing of the result)."""
    try:
        get_metrics().observe_result(result)
    except Exception as e:  # noqa: BLE001
        logger.warning("result metrics skipped: %s", type(e).__name__)


_WATCHED: list[tuple] = []  # (catalog, store, window_s) of the review app the service mounts


def watch_agreement(review, window_days: float) -> None:
    """Feed the agreement gauges from a review app (``create_app(...).state.review``: its
    catalog and store) over the last ``window_days``. Called when ``service.app`` is imported:
    the metrics are not built here (see the module docstring), they pick this up when built."""
    _WATCHED[:] = [(review.catalog, review.store, window_days * 86400.0)]
    if get_metrics.cache_info().currsize:
        get_metrics().agreement.watch(*_WATCHED[0])


def scrape_collectors() -> list:
    """Collectors computed at scrape time, for a registry built per scrape (multi-process
    ``/metrics``) beside ``MultiProcessCollector``; the default registry has them already."""
    return [get_metrics().agreement]
