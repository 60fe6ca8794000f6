"""Clinicians' agreement on ``/metrics``: finished reviews in the review store move the gauges of
sensitivity, specificity, clip kappa and counts (service.metrics.AgreementCollector, computed at
scrape time), and MamClinicianAgreementLow of k8s/monitoring/prometheusrule.yaml, evaluated as
written on scraped samples, fires only below the validated band with enough recordings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
promql = pytest.importorskip("promql_parser")

from mam.model.weights import load_meta  # noqa: E402
from mam.review.catalog import Catalog  # noqa: E402
from mam.review.store import ReviewStore  # noqa: E402
from mam.screening import default_weights  # noqa: E402
from service import metrics as M  # noqa: E402
from tests import review_helpers as H  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "k8s" / "monitoring" / "prometheusrule.yaml"
ALERT = "MamClinicianAgreementLow"
DAY = 86400.0


@pytest.fixture(scope="module", autouse=True)
def multiprocess_mode(prometheus_dir):
    """prometheus_client fixes its multi-process mode when first imported (here, maybe, in the
    session): as the in-process services of other test files need it. Nothing here writes."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PROMETHEUS_MULTIPROC_DIR", str(prometheus_dir))
        yield


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> H.Batch:
    """Six simulated infants screened by the batch runner (the demo weights call some risk and
    some normal), and one more row whose result is indeterminate."""
    b = H.make_batch(tmp_path_factory.mktemp("agree"), infants=6, video=False)

    def indeterminate(doc):
        doc["classification"]["label"] = "indeterminate"
        doc["classification"]["reasons"] = ["the infant was tracked in only 40% of frames"]

    b.rids["indeterminate"] = H.add_video_row(b.out, b.archive, mutate=indeterminate)
    return b


class Clock:
    def __init__(self) -> None:
        import time

        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def collector(batch, digest=None, clock=None, window_days=30.0):
    """A collector over a fresh catalog and store, as another process (or a restart) opens
    them; its own registry, scraped as Prometheus does."""
    import prometheus_client as pc

    meta, _, _ = load_meta(default_weights())
    col = M.AgreementCollector(digest=lambda: digest or meta.digest, clock=clock)
    store = ReviewStore(H.config(batch).database_url)
    col.watch(Catalog(batch.out, batch.archive), store, window_days * DAY)
    registry = pc.CollectorRegistry()
    registry.register(col)

    def scrape() -> dict[str, dict[frozenset, float]]:
        from prometheus_client.parser import text_string_to_metric_families

        out: dict[str, dict[frozenset, float]] = {}
        for fam in text_string_to_metric_families(pc.generate_latest(registry).decode()):
            for s in fam.samples:
                labels = frozenset({**s.labels, "namespace": "mam"}.items())
                out.setdefault(s.name, {})[labels] = s.value
        return out

    return scrape, store


def value(samples, name: str, **labels) -> float | None:
    got = [v for k, v in samples.get(name, {}).items()
           if all(dict(k).get(a) == b for a, b in labels.items())]  # fmt: skip
    assert len(got) <= 1, (name, labels)
    return got[0] if got else None


def ratio(samples, measure: str) -> tuple[float | None, float | None]:
    """(live value, recordings behind it) for pose files."""
    return (
        value(samples, "mam_clinician_agreement_ratio", kind="pose_file", measure=measure),
        value(samples, "mam_clinician_agreement_recordings", kind="pose_file", measure=measure),
    )


def labelled(batch) -> dict[str, list]:
    """The screened recordings by the model's label; normal ones with most FMs clips first."""
    out: dict[str, list] = {"risk": [], "normal": [], "indeterminate": []}
    for rec in Catalog(batch.out, batch.archive).all():
        out[rec.result().classification.label].append(rec)
    out["normal"].sort(key=lambda r: -sum(c.fms_probability > 0.5 for c in r.result().clips))
    return out


def review(store, rec, who: str, group: str, state: str = "done") -> None:
    store.set_fields(rec.rid, who, {"group": (group, None), "state": (state, None)})


def fires(samples, validated: dict, least: int | None = None) -> set[tuple[str, str]]:
    """``(kind, measure)`` of the series the alert's expression returns (its for: aside), on
    ``samples`` plus the validated gauges ``{(kind, measure): value}``; ``least``: the minimum
    count of recordings in place of the rule's."""
    from tests.test_model_monitoring import evaluate

    rule = yaml.safe_load(RULES.read_text())
    (r,) = [r for g in rule["spec"]["groups"] for r in g["rules"] if r.get("alert") == ALERT]
    expr = r["expr"]
    if least is not None:
        expr, n = expr.replace(">= 20", f">= {least}"), expr.count(">= 20")
        assert n == 1
    series = {
        frozenset({"kind": k, "measure": m, "namespace": "mam"}.items()): v
        for (k, m), v in validated.items()
    }
    merged = {**samples, "mam_validated_agreement_ratio": series}
    out = evaluate(promql.parse(expr), merged, merged)
    return {(dict(k)["kind"], dict(k)["measure"]) for k in out}


def test_finished_reviews_move_the_agreement_gauges(batch):
    recs = labelled(batch)
    assert len(recs["risk"]) >= 2 and len(recs["normal"]) >= 2 and recs["indeterminate"]
    clock = Clock()
    scrape, store = collector(batch, clock=clock)
    s = scrape()
    assert value(s, "mam_clinician_agreement_window_seconds") == 30 * DAY
    assert "mam_clinician_agreement_ratio" not in s and "mam_clinician_verdicts" not in s
    # A review in progress is no verdict; marked done, the model's risk call agrees.
    review(store, recs["risk"][0], "bob", "risk", state="in_progress")
    assert "mam_clinician_verdicts" not in scrape()
    review(store, recs["risk"][0], "bob", "risk")
    s = scrape()
    assert ratio(s, "sensitivity") == (1.0, 1)
    assert ratio(s, "specificity") == (None, 0)
    assert value(s, "mam_clinician_verdicts", clinician="risk", model="risk") == 1
    # No FMs marked where the model saw none in any clip: both labellings constant and equal.
    assert value(s, "mam_clinician_agreement_clip_kappa", kind="pose_file") == 1.0
    # An infant the clinicians judge at risk that the model called normal lowers sensitivity;
    # no FMs marked where the model saw FMs in every clip: kappa 0 for that review.
    assert all(c.fms_probability > 0.5 for c in recs["normal"][0].result().clips)
    review(store, recs["normal"][0], "bob", "risk")
    s = scrape()
    assert ratio(s, "sensitivity") == (0.5, 2)
    assert value(s, "mam_clinician_agreement_clip_kappa", kind="pose_file") == 0.5
    assert value(s, "mam_clinician_agreement_clip_kappa_reviews", kind="pose_file") == 2
    review(store, recs["normal"][1], "carol", "normal")
    assert ratio(scrape(), "specificity") == (1.0, 1)
    # Assessors who disagree give no verdict yet (split); the senior's sign-off settles it.
    review(store, recs["risk"][1], "bob", "risk")
    review(store, recs["risk"][1], "carol", "normal")
    s = scrape()
    assert value(s, "mam_clinician_verdicts", clinician="split", model="risk") == 1
    assert ratio(s, "sensitivity") == (0.5, 2)
    store.sign_off(recs["risk"][1].rid, "alice", "sporadic", "risk", None, [])
    s = scrape()
    assert value(s, "mam_clinician_verdicts", clinician="split", model="risk") is None
    assert value(s, "mam_clinician_verdicts", clinician="risk", model="risk") == 2
    assert ratio(s, "sensitivity") == (pytest.approx(2 / 3), 3)
    # Indeterminate results are counted, never as a disagreement.
    indeterminate = recs["indeterminate"][0]
    review(store, indeterminate, "bob", "risk")
    s = scrape()
    assert value(s, "mam_clinician_verdicts", clinician="risk", model="indeterminate") == 1
    assert ratio(s, "sensitivity") == (pytest.approx(2 / 3), 3)
    total = sum(s["mam_clinician_verdicts"].values())
    assert total == 5
    # Labels are fixed names only: never a recording, a reviewer or an infant.
    fixed = {"kind": set(M.KINDS), "measure": set(M.MEASURES),
             "clinician": set(M.CLINICIAN_GROUPS), "model": {"risk", "normal", "indeterminate"},
             "namespace": {"mam"}}  # fmt: skip
    for series in s.values():
        for labels in series:
            for k, v in labels:
                assert v in fixed[k], (k, v)
    # Another process, or a restart, reading the same store sees the same figures.
    again, _ = collector(batch, clock=clock)
    assert again() == s
    # Verdicts on results of other weights are not this model's agreement.
    other, _ = collector(batch, digest="0" * 64, clock=clock)
    o = other()
    assert "mam_clinician_verdicts" not in o and value(o, "mam_clinician_verdicts_other_model") == 5
    # Out of the rolling window, nothing is counted.
    clock.now += 31 * DAY
    late = scrape()
    assert "mam_clinician_verdicts" not in late
    assert value(late, "mam_clinician_verdicts_other_model") == 0
    clock.now -= 31 * DAY

    # The alert on these scraped samples: live sensitivity 2/3 on three recordings.
    band = {("pose_file", "sensitivity"): 0.9, ("pose_file", "specificity"): 0.8}
    assert fires(s, band) == set()  # too few recordings behind the figure
    assert fires(s, band, least=3) == {("pose_file", "sensitivity")}  # 0.67 < 0.9 - 0.15
    assert fires(s, {**band, ("pose_file", "sensitivity"): 0.8}, least=3) == set()  # in band
    assert fires(s, {}, least=1) == set()  # weights without a validated band: no alert
    # The senior's sign-off overrides the assessor: the disagreement goes, sensitivity rises.
    store.sign_off(recs["normal"][0].rid, "alice", "continuous", "normal", None, [])
    s = scrape()
    assert ratio(s, "sensitivity") == (1.0, 2) and ratio(s, "specificity") == (1.0, 2)
    assert fires(s, band, least=2) == set()


def test_alert_needs_enough_recordings_and_a_fall_below_the_band():
    def samples(live: float, n: int, pods: int = 2):
        def s(pod, **labels):
            return frozenset({**labels, "namespace": "mam", "pod": f"mam-{pod}"}.items())

        lab = {"kind": "video", "measure": "specificity"}
        return {
            "mam_clinician_agreement_ratio": {s(p, **lab): live for p in range(pods)},
            "mam_clinician_agreement_recordings": {s(p, **lab): float(n) for p in range(pods)},
        }

    band = {("video", "specificity"): 0.85}
    assert fires(samples(0.6, 40), band) == {("video", "specificity")}  # every pod reports it
    assert fires(samples(0.6, 19), band) == set()
    assert fires(samples(0.75, 40), band) == set()  # within the margin
    assert fires(samples(0.95, 40), band) == set()
    assert fires(samples(0.6, 40), {("video", "sensitivity"): 0.85}) == set()  # other measure
    assert fires(samples(0.6, 40), {("pose_file", "specificity"): 0.85}) == set()  # other kind


def test_validated_band_is_only_what_the_weights_store():
    meta, _, _ = load_meta(default_weights())
    assert M.validated_agreement(meta) == {}  # the demo weights store no operating point
    meta.provenance.setdefault("calibration", {})["operating_point"] = {
        "video": {"infants": 30, "risk_infants": 12, "sensitivity": 0.75, "specificity": 0.8}
    }
    assert M.validated_agreement(meta) == {
        ("video", "sensitivity"): (0.75, 12),
        ("video", "specificity"): (0.8, 18),
    }
    meta.provenance["heldout_results"] = {
        "video": {"recordings": 50, "sensitivity": 0.9, "risk_infants": 20},
        "not_a_kind": {"sensitivity": 0.5},
    }
    got = M.validated_agreement(meta)
    assert got[("video", "sensitivity")] == (0.9, 20) and ("not_a_kind", "sensitivity") not in got


SCRIPT = r"""
import json, warnings
warnings.simplefilter("ignore")
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient
import service.app as app

out = {}
with TestClient(app.Screening.to_asgi()) as c:
    for fam in text_string_to_metric_families(c.get("/metrics").text):
        for s in fam.samples:
            if s.name.startswith("mam_clinician"):
                out[s.name + json.dumps(s.labels, sort_keys=True)] = s.value
print("RESULT " + json.dumps(out))
"""


def test_the_service_exports_agreement_when_the_review_app_is_mounted(batch, tmp_path):
    """In a subprocess: the service reads MAM_REVIEW_DIR when ``service.app`` is imported."""
    from service.settings import hash_key
    from tests.service_helpers import API_KEY, service_env

    recs = labelled(batch)
    store = ReviewStore(H.config(batch).database_url)
    review(store, recs["normal"][-1], "dan", "normal")
    env = dict(os.environ) | service_env(hash_key(API_KEY)) | {
        "MAM_REVIEW_DIR": str(batch.out),
        "MAM_AGREEMENT_WINDOW_DAYS": "7",
        "BENTOML_HOME": str(tmp_path / "home"),
        "TMPDIR": str(tmp_path),
        "PYTHONPATH": str(REPO),
    }  # fmt: skip
    # As bentoml serve runs it: multi-process metrics, the scrape built from a fresh registry.
    (tmp_path / "prom").mkdir()
    env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "prom")
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, r.stderr[-3000:]
    got = json.loads(line[len("RESULT ") :])
    assert got["mam_clinician_agreement_window_seconds{}"] == 7 * DAY
    key = 'mam_clinician_agreement_recordings{"kind": "pose_file", "measure": "specificity"}'
    assert got[key] >= 1
