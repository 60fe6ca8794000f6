"""Model-quality monitoring: what the model answers on ``/metrics`` (results by classification
and reason, histograms of P(risk), FMs frequency, domain score, tracked fraction), the weights'
validation-time rates as gauges, and the drift alerts of k8s/monitoring/prometheusrule.yaml
evaluated, as written, on the service's scraped counters: quiet on in-domain traffic, firing on
a run of out-of-domain recordings."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("bentoml")
yaml = pytest.importorskip("yaml")
promql = pytest.importorskip("promql_parser")

from mam.model.weights import load_meta  # noqa: E402
from mam.screening import NO_DOMAIN, STILL, default_weights  # noqa: E402
from service import metrics as M  # noqa: E402
from tests.service_helpers import (  # noqa: E402
    API_KEY,
    in_process_service,
    multipart,
    npy_bytes,
    simulated,
)

AUTH = {"Authorization": f"Bearer {API_KEY}"}
RULES = Path(__file__).resolve().parent.parent / "k8s" / "monitoring" / "prometheusrule.yaml"
MIN_RESULTS = 20  # the alerts' minimum count of results in their window
HISTOGRAMS = ("risk_probability", "fms_frequency", "domain_score", "tracked_fraction")


# -- a small PromQL evaluator: instant queries over two scrapes -----------------------------------
# ``increase(x[w])`` is the counter's growth between the two scrapes (the window holds exactly
# them); every other selector reads the later scrape. Series carry the target label namespace,
# as the Prometheus Operator adds it.
Series = dict[frozenset, float]


def scrape(client) -> dict[str, Series]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, Series] = {}
    for fam in text_string_to_metric_families(client.get("/metrics").text):
        for s in fam.samples:
            if s.name.startswith("mam_"):
                labels = frozenset({**s.labels, "namespace": "mam"}.items())
                out.setdefault(s.name, {})[labels] = s.value
    return out


def _select(vs, samples: dict[str, Series]) -> Series:
    out = {}
    for labels, v in samples.get(vs.name, {}).items():
        d = dict(labels)
        ok = True
        for m in vs.matchers.matchers:
            got, op = d.get(m.name, ""), str(m.op)
            if op.endswith("Re"):
                hit = re.fullmatch(m.value, got) is not None
                ok &= hit if op == "MatchOp.Re" else not hit
            else:
                ok &= (got == m.value) if op == "MatchOp.Equal" else (got != m.value)
        if ok:
            out[labels] = v
    return out


def _key(labels: frozenset, names, include: bool) -> frozenset:
    return frozenset((k, v) for k, v in labels if (k in names) == include)


def _binary(op: str, a: float, b: float) -> float | bool:
    if op in ("+", "-", "*"):
        return a + b if op == "+" else a - b if op == "-" else a * b
    if op == "/":
        return a / b if b else (math.nan if a == 0 or math.isnan(a) else math.copysign(math.inf, a))
    return {">": a > b, "<": a < b, ">=": a >= b, "<=": a <= b, "==": a == b, "!=": a != b}[op]


def evaluate(node, before: dict[str, Series], after: dict[str, Series]):
    """A float (scalar) or ``Series`` for the subset of PromQL the alerts use."""
    ev = lambda n: evaluate(n, before, after)  # noqa: E731
    if isinstance(node, promql.NumberLiteral):
        return float(node.val)
    if isinstance(node, promql.ParenExpr):
        return ev(node.expr)
    if isinstance(node, promql.VectorSelector):
        return _select(node, after)
    if isinstance(node, promql.UnaryExpr):
        x = ev(node.expr)
        return -x if isinstance(x, float) else {k: -v for k, v in x.items()}
    if isinstance(node, promql.Call):
        name = node.func.name
        if name == "increase":
            vs = node.args[0].vector_selector
            old = _select(vs, before)
            return {k: v - old.get(k, 0.0) for k, v in _select(vs, after).items()}
        fn = {"sqrt": math.sqrt, "abs": abs}[name]
        x = ev(node.args[0])
        return {k: (fn(v) if v >= 0 or name == "abs" else math.nan) for k, v in x.items()}
    if isinstance(node, promql.AggregateExpr):
        x = ev(node.expr)
        include = node.modifier is None or str(node.modifier.type).endswith("By")
        names = set(node.modifier.labels) if node.modifier else set()
        groups: dict[frozenset, list[float]] = {}
        for k, v in x.items():
            groups.setdefault(_key(k, names, include), []).append(v)
        agg = {"sum": sum, "max": max, "min": min, "count": len}[str(node.op)]
        return {k: float(agg(v)) for k, v in groups.items()}
    assert isinstance(node, promql.BinaryExpr), type(node)
    op, lhs, rhs = str(node.op), ev(node.lhs), ev(node.rhs)
    mod = node.modifier
    keep_bool = bool(mod and mod.return_bool)
    comparison = op in (">", "<", ">=", "<=", "==", "!=")
    if isinstance(lhs, float) and isinstance(rhs, float):
        return float(_binary(op, lhs, rhs))
    if isinstance(lhs, float) or isinstance(rhs, float):
        out = {}
        for k, v in (rhs if isinstance(lhs, float) else lhs).items():
            a, b = (lhs, v) if isinstance(lhs, float) else (v, rhs)
            r = _binary(op, a, b)
            if not comparison or keep_bool:
                out[k] = float(r)
            elif r:
                out[k] = v
        return out
    matching = mod.matching if mod else None
    names = set(matching.labels) if matching else set()
    include = matching is not None and str(matching.type).endswith("Include")
    if not include:
        names.add("__name__")  # ignoring(): every label but these (no names here anyway)
    right = {_key(k, names, include): v for k, v in rhs.items()}
    if op in ("and", "unless"):
        return {k: v for k, v in lhs.items() if (_key(k, names, include) in right) == (op == "and")}
    out = {}
    for k, v in lhs.items():
        other = right.get(_key(k, names, include))
        if other is None:
            continue
        r = _binary(op, v, other)
        if not comparison or keep_bool:
            out[k] = float(r)
        elif r:
            out[k] = v
    return out


def alert_fires(name: str, before, after) -> dict[str, float]:
    """``kind -> value`` of the series the alert's expression returns (its for: aside)."""
    rule = yaml.safe_load(RULES.read_text())
    (r,) = [r for g in rule["spec"]["groups"] for r in g["rules"] if r.get("alert") == name]
    out = evaluate(promql.parse(r["expr"]), before, after)
    return {dict(k).get("kind"): v for k, v in out.items()}


def growth(before, after, name: str, **labels) -> float:
    def total(samples):
        return sum(
            v
            for k, v in samples.get(name, {}).items()
            if all(dict(k).get(a) == b for a, b in labels.items())
        )

    return total(after) - total(before)


# -- the reason table and the expectations (no service) -------------------------------------------
def test_every_reason_the_library_writes_has_its_own_code():
    from mam import domain

    meta, _, _ = load_meta(default_weights())
    emb = np.zeros((2, meta.config.embed_dim))
    unknown = meta.domain.check("a_kind_never_trained_on", emb, None).reasons
    sentences = {
        "out_of_domain": [s for pair in domain._REASONS.values() for s in pair]
        + [domain.EMBEDDING_REASON],
        "no_movement": [STILL],
        "no_domain_record": [NO_DOMAIN],
        "unknown_kind": unknown,
    }
    for code, said in sentences.items():
        assert said and {M.reason_code(s) for s in said} == {code}, code
    assert M.reason_code("a sentence no module writes") == "other"
    assert set(sentences) | {"insufficient_tracking", "other"} == set(M.REASONS)


def test_expected_rates_are_only_what_the_weights_store():
    meta, _, _ = load_meta(default_weights())
    dom = meta.provenance["domain"]
    rates = M.expected_rates(meta)
    assert rates == {
        (k, "out_of_domain"): (dom["heldout_flagged"][k], dom["heldout"][k])
        for k in dom["heldout_flagged"]
    }
    # fit() stores no share called risk, so nothing is exported for it; a recalibrated kind's
    # operating point gives it exactly: 30 recordings, 12 at risk, 9 of them found (sensitivity
    # 0.75), 3 of the 18 normal called risk (specificity 15/18).
    assert not any(o == "risk" for _, o in rates)
    meta.provenance["calibration"]["operating_point"] = {
        "video": {"infants": 30, "risk_infants": 12, "sensitivity": 9 / 12, "specificity": 15 / 18}
    }
    rate, n = M.expected_rates(meta)["video", "risk"]
    assert n == 30 and rate == pytest.approx((9 + 3) / 30)
    meta.provenance = {}
    assert M.expected_rates(meta) == {}


def test_risk_band_alert_fires_both_ways_and_only_with_a_stored_expectation():
    """MamRiskRateOutOfBand on counters as a recalibrated kind would export them: the weights
    called 40% of their held-out video recordings risk."""

    def hour(risk: int, normal: int, indeterminate: int = 0, expected: float | None = 0.4):
        def s(**labels):
            return frozenset({**labels, "namespace": "mam"}.items())

        counts = {"risk": risk, "normal": normal, "indeterminate": indeterminate}
        out = {
            "mam_results_total": {
                s(kind="video", classification=c): float(n) for c, n in counts.items()
            }
        }
        if expected is not None:
            out["mam_expected_result_rate"] = {s(kind="video", outcome="risk"): expected}
        return out

    start = hour(0, 0)
    assert alert_fires("MamRiskRateOutOfBand", start, hour(16, 24)) == {}
    assert alert_fires("MamRiskRateOutOfBand", start, hour(20, 20, indeterminate=40)) == {}
    assert set(alert_fires("MamRiskRateOutOfBand", start, hour(36, 4))) == {"video"}  # all-risk
    assert set(alert_fires("MamRiskRateOutOfBand", start, hour(1, 39))) == {"video"}  # never
    assert alert_fires("MamRiskRateOutOfBand", start, hour(36, 4, expected=None)) == {}
    assert alert_fires("MamRiskRateOutOfBand", start, hour(9, 1)) == {}  # too few labelled
    assert set(alert_fires("MamMostlyRisk", start, hour(38, 2, expected=None))) == {"video"}


# -- through the service --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(tmp_path_factory, prometheus_dir):
    from starlette.testclient import TestClient

    tmp = tmp_path_factory.mktemp("svc")
    with in_process_service(tmp, prometheus_dir) as app_module:
        with TestClient(app_module.Screening.to_asgi()) as c:
            yield c


@pytest.fixture(scope="module")
def poses():
    """Simulated infants as pose files that the library's domain check passes (in-domain
    traffic), and the same poses far out of domain: each joint jittered by 5 cm every frame (a
    trace no pose model the weights learned from makes)."""
    from mam.pose.base import PoseSequence
    from mam.screening import Screener

    screener = Screener()
    inside = []
    for seed, category in enumerate(["continuous", "intermittent"] * 4):
        joints = simulated(category, seed)[1]
        seq = PoseSequence(joints, np.ones(joints.shape[:2], np.float32), source="precomputed")
        if screener.screen_pose(seq).domain.in_domain:
            inside.append(joints)
    assert len(inside) >= 3
    rng = np.random.default_rng(0)
    outside = [(j + rng.normal(0, 0.05, j.shape)).astype(np.float32) for j in inside]
    return inside, outside


def post(client, path, field, array):
    files, form = multipart(field, npy_bytes(array), "application/octet-stream")
    r = client.post(path, files=files, data=form, headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


def screen_poses(client, joints: list[np.ndarray], n: int) -> list[dict]:
    return [post(client, "/screen_pose", "pose", joints[i % len(joints)]) for i in range(n)]


def test_metrics_show_what_the_model_answers(client, poses):
    meta, _, _ = load_meta(default_weights())
    before = scrape(client)
    tensors = simulated("absent", 7)[2]
    got = [post(client, "/screen_instances", "instances", tensors)]
    inside, _ = poses
    got += screen_poses(client, inside, 2)
    # A pose tracked in 70% of its frames: under the quality gate, so indeterminate.
    patchy = inside[0].copy()
    patchy[::10] = np.nan
    patchy[1::10] = np.nan
    patchy[2::10] = np.nan
    got.append(post(client, "/screen_pose", "pose", patchy))
    assert got[-1]["classification"]["label"] == "indeterminate"
    after = scrape(client)
    kinds = ["instances", "pose_file", "pose_file", "pose_file"]
    for kind in set(kinds):
        for c in M.CLASSIFICATIONS:
            want = sum(k == kind and g["classification"]["label"] == c for k, g in zip(kinds, got))
            assert growth(before, after, "mam_results_total", kind=kind, classification=c) == want
    assert growth(before, after, "mam_result_reasons_total", reason="insufficient_tracking") == 1
    # The four histograms; the tracked fraction only where there is a recording or pose.
    for h in HISTOGRAMS:
        n = growth(before, after, f"mam_result_{h}_count")
        assert n == (3 if h == "tracked_fraction" else 4), h
    assert growth(before, after, "mam_result_tracked_fraction_count", kind="instances") == 0
    assert growth(before, after, "mam_result_risk_probability_sum") == pytest.approx(
        sum(g["risk_probability"] for g in got), abs=1e-6
    )
    patchy_le = growth(before, after, "mam_result_tracked_fraction_bucket", le="0.8")
    assert patchy_le == 1  # only the patchy pose is tracked in at most 80% of its frames
    # Validation-time expectations: exactly the stored ones; model info names the digest.
    exp = after["mam_expected_result_rate"]
    assert {(dict(k)["kind"], dict(k)["outcome"]): v for k, v in exp.items()} == {
        k: r for k, (r, _) in M.expected_rates(meta).items()
    }
    assert meta.digest in {dict(k)["digest"] for k in after["mam_model_info"]}
    # Labels are fixed names only.
    fixed = {
        "kind": set(M.KINDS),
        "classification": set(M.CLASSIFICATIONS),
        "reason": set(M.REASONS),
        "outcome": set(M.EXPECTED_OUTCOMES),
    }
    for name, series in after.items():
        if name.startswith(("mam_result", "mam_expected")):
            for labels in series:
                for k, v in labels:
                    assert k in fixed and v in fixed[k] or k in ("le", "namespace", "pid"), (k, v)


def test_drift_alert_fires_on_out_of_domain_runs_and_not_on_in_domain_traffic(client, poses):
    inside, outside = poses
    t0 = scrape(client)
    ok = screen_poses(client, inside, MIN_RESULTS)
    t1 = scrape(client)
    bad = screen_poses(client, outside, MIN_RESULTS)
    t2 = scrape(client)
    assert all(g["domain"]["in_domain"] for g in ok)
    assert all(
        g["classification"]["label"] == "indeterminate" and not g["domain"]["in_domain"]
        for g in bad
    )
    # In-domain hour: no alert, although the window holds enough results.
    quiet = (
        "MamOutOfDomainRateHigh",
        "MamMostlyIndeterminate",
        "MamRiskRateOutOfBand",
        "MamMostlyRisk",
    )
    for name in quiet:
        assert alert_fires(name, t0, t1) == {}, name
    live = promql.parse(
        'sum by (namespace, kind) (increase(mam_result_reasons_total{reason="out_of_domain"}[1h]))'
        " / sum by (namespace, kind) (increase(mam_results_total[1h]))"
    )
    assert {dict(k)["kind"]: v for k, v in evaluate(live, t0, t1).items()}["pose_file"] == 0
    # An hour of out-of-domain recordings: the drift alert fires for their kind only, with the
    # live share as its value; so does the all-indeterminate one.
    fired = alert_fires("MamOutOfDomainRateHigh", t1, t2)
    assert set(fired) == {"pose_file"} and fired["pose_file"] == pytest.approx(1.0)
    assert set(alert_fires("MamMostlyIndeterminate", t1, t2)) == {"pose_file"}
    # Too few results in the window: no alert, whatever the share.
    few = screen_poses(client, outside, 3)
    assert len(few) == 3 and alert_fires("MamOutOfDomainRateHigh", t2, scrape(client)) == {}
    # Half and half over both hours: out-of-domain share 0.5, still far above the band.
    assert set(alert_fires("MamOutOfDomainRateHigh", t0, t2)) == {"pose_file"}
