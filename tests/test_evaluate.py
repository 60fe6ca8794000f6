"""Calibration, cross-validation, reports, and the paper's ablation on simulated infants."""

from __future__ import annotations

import numpy as np
import pytest

from mam.model.weights import save_weights
from mam.synth import SimParams, write_dataset
from mam.training.calibration import (
    category_thresholds,
    ece_if_calibrated,
    expected_calibration_error,
    fit_calibration,
    fit_platt,
    youden_threshold,
)
from mam.training.dataset import DatasetError, load_dataset
from mam.training.evaluate import (
    _rank_ap,
    _rank_auc,
    bootstrap_ci,
    cross_validate,
    evaluate,
    fold_indices,
    write_report,
)
from mam.training.fitting import fit
from mam.training.train import TrainConfig, compact_model_config


def _cfg(**kw) -> TrainConfig:
    base = dict(
        model=compact_model_config(), epochs=8, optimizer="adamw", lr=5e-4, max_lr=3e-3,
        ref_clips_per_step=16, instances_per_bag=8, seed=0, threads=2,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def test_platt_scaling_fixes_an_overconfident_score():
    rng = np.random.default_rng(0)
    normal = rng.random(2000) < 0.5
    true_logit = np.where(normal, 1.0, -1.0) + rng.normal(0, 1.0, 2000)
    z = 4 * true_logit  # four times too confident
    raw = 1 / (1 + np.exp(-z))
    cal = fit_platt(z, normal)
    # the Bayes log-odds are 2 x true signal, so the slope that undoes the stretch is 1/2
    assert cal.method == "platt" and 0.35 < cal.a < 0.65
    assert expected_calibration_error(cal.apply(z), normal) < 0.5 * expected_calibration_error(
        raw, normal
    )
    with pytest.raises(ValueError):
        fit_platt(z[:5], np.ones(5, bool))


def test_a_source_kind_with_squeezed_scores_gets_a_calibration_of_its_own():
    """Pose from video gives the same infants less extreme log-odds than clean pose files (issue
    14: video risk infants at P(risk) 0.1-0.5). A fit on both kinds together is under-confident
    on the video kind; the kind's own fit, on other infants of that kind, is not."""
    rng = np.random.default_rng(1)

    def infants(n, squeeze):
        normal = rng.random(n) < 0.5
        true_logit = np.where(normal, 1.5, -1.5) + rng.normal(0, 1.0, n)
        y = rng.random(n) < 1 / (1 + np.exp(-true_logit))  # outcomes drawn from the truth
        return squeeze * 3 * true_logit, np.full(n, np.nan), y

    files, videos, test = infants(1500, 1.0), infants(400, 0.3), infants(3000, 0.3)
    both = [np.concatenate([a, b]) for a, b in zip(files, videos)]
    overall = fit_calibration(*both)
    own = fit_calibration(*videos, label="platt (video)")
    z, _, y = test
    p_overall = overall.calibration_without_info.apply(z)
    p_own = own.calibration_without_info.apply(z)
    assert own.calibration.method == "platt (video)" and own.infants == 400
    assert expected_calibration_error(p_own, y) < 0.06
    assert expected_calibration_error(p_overall, y) > 2 * expected_calibration_error(p_own, y)


def test_the_calibration_error_comes_with_what_perfect_calibration_would_show():
    """On tens of infants the binned error of a perfectly calibrated score is far from 0; the
    reference tells that noise from miscalibration (a squeezed score fails, a true one does
    not) and shrinks with more infants."""
    rng = np.random.default_rng(3)
    p = 1 / (1 + np.exp(-rng.normal(0, 3, 60)))
    y = rng.random(60) < p  # outcomes drawn from p: calibrated by construction
    ref = ece_if_calibrated(p, y)
    assert ref["ece_if_calibrated"] > 0.05  # what 60 infants allow
    assert ref["ece_p_value"] > 0.05
    squeezed = 0.5 + 0.2 * (p - 0.5)  # under-confident, as video poses made the demo weights
    assert ece_if_calibrated(squeezed, y)["ece_p_value"] < 0.05
    big = 1 / (1 + np.exp(-rng.normal(0, 3, 2000)))
    assert ece_if_calibrated(big)["ece_if_calibrated"] < 0.5 * ref["ece_if_calibrated"]


def test_youden_and_category_thresholds():
    scores = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    t = youden_threshold(scores, [0, 0, 0, 1, 1, 1])
    assert 0.3 < t < 0.7
    th = category_thresholds(
        [0.95, 0.9, 0.6, 0.5, 0.1, 0.0],
        ["continuous", "continuous", "intermittent", "intermittent", "sporadic", "absent"],
    )
    assert 0.6 < th["continuous"] < 0.9 and 0.1 < th["intermittent"] < 0.5


def test_every_metric_has_a_bootstrap_interval_that_narrows_with_more_infants():
    """PPV, NPV, PR-AUC, accuracy, the median kappa and the FMs-frequency AUC get intervals
    beside AUC, sensitivity and specificity; each holds its point value, and 16 times the
    infants give intervals about 4 times narrower."""
    from sklearn.metrics import average_precision_score

    def draw(n, rng):
        y = rng.random(n) < 0.4
        p = np.clip(0.5 + np.where(y, 0.2, -0.2) + rng.normal(0, 0.2, n), 0, 1)
        return y, p, rng.random(n), [float(v) for v in rng.random(n)]

    rng = np.random.default_rng(5)
    y, p, f, k = draw(50, rng)
    ci = bootstrap_ci(y, p, 0.5, n=400, kappa=[None] + k[1:], freq=f)
    pred = p >= 0.5
    point = {"ppv": np.mean(y[pred]), "npv": np.mean(~y[~pred]), "pr_auc":
             average_precision_score(y, p), "median_kappa": np.median(k[1:])}  # fmt: skip
    for key, v in point.items():
        lo, hi = ci[f"{key}_ci"]
        assert lo <= v <= hi and hi - lo > 0.01, key
    assert ci["accuracy_ci"] and ci["fms_frequency_auc_ci"][0] < 0.5 < ci["fms_frequency_auc_ci"][1]
    big = bootstrap_ci(*draw(800, rng)[:2], 0.5, n=400)
    for key in ("ppv", "npv", "pr_auc"):
        assert np.diff(big[f"{key}_ci"])[0] < 0.5 * np.diff(ci[f"{key}_ci"])[0], key
    assert "median_kappa_ci" not in big  # no kappas given, no interval claimed


def test_the_bootstraps_fast_auc_and_average_precision_equal_sklearns():
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(0)
    for n in (3, 10, 60):
        for _ in range(50):
            y = rng.random(n) < 0.4
            if not 0 < y.sum() < n:
                continue
            s = np.round(rng.random(n), 1)  # with ties
            assert _rank_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
            assert _rank_ap(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_the_baselines_are_scored_on_the_cross_validation_folds(tmp_path):
    from mam.training.baselines import cross_validate_baselines

    recs = load_dataset(write_dataset(tmp_path / "d", infants=10, seed=4, duration_s=(20, 20)))
    splits = fold_indices([r.group for r in recs], 3, 7)
    for method in cross_validate_baselines(recs, 3, 7).values():
        for f, (_, te) in zip(method["folds"], splits, strict=True):
            assert f["per_infant"]["id"] == [recs[i].infant_id for i in te]


def test_a_fold_without_risk_infants_is_refused_before_training(tmp_path):
    recs = load_dataset(write_dataset(tmp_path / "d", infants=8, seed=1, duration_s=(20, 20)))
    with pytest.raises(DatasetError, match="a fold would have none"):
        cross_validate(recs, _cfg(epochs=1), folds=5)


def test_cross_validation_reports_mean_and_sd(tmp_path):
    recs = load_dataset(write_dataset(tmp_path / "d", infants=16, seed=2, duration_s=(25, 25)))
    res = cross_validate(recs, _cfg(epochs=1), folds=2, progress=False)
    assert res["k"] == 2 and len(res["folds"]) == 2
    assert sum(f["infants"] for f in res["folds"]) == 16
    assert res["auc"] == pytest.approx(np.mean([f["auc"] for f in res["folds"]]))
    assert res["auc_sd"] is not None and "median_kappa" in res
    # the folds are fold_indices' (what the baselines are scored on), none fitted on its infants
    splits = fold_indices([r.group for r in recs], 2, 0)
    for f, (_, te) in zip(res["folds"], splits):
        assert f["per_infant"]["id"] == [recs[i].infant_id for i in te]
    assert res["leakage"]["checked"] and not res["leakage"]["leaked"]
    assert res["pooled"]["infants"] == 16 and res["pooled"]["ppv_ci"] is not None
    files = write_report(res, tmp_path / "report", "cv")
    assert all(f.stat().st_size > 0 for f in files)
    assert files[-1].read_bytes()[:4] == b"\x89PNG"
    assert "| auc |" in (tmp_path / "report" / "cv.md").read_text()


@pytest.mark.slow
def test_reference_branch_and_closeness_raise_kappa(tmp_path):
    """Paper Fig. 3b: without the Ref Branch and the closeness loss, the clip-level agreement
    with annotated FMs drops. Direction only, on an external set from wider simulator ranges."""
    train = load_dataset(write_dataset(tmp_path / "t", infants=120, seed=7, duration_s=(60, 60)))
    ext = load_dataset(
        write_dataset(tmp_path / "e", 24, seed=8, duration_s=(60, 90), params=SimParams().widened())
    )
    cats = [r.fms_category for r in train]
    results = {}
    variants = {"full": {}, "ablation": dict(use_reference=False, use_closeness=False)}
    for name, kw in variants.items():
        model, meta = fit(train, _cfg(**kw), name=name, version="0", provenance={},
                          categories=cats, progress=False)  # fmt: skip
        results[name] = evaluate(save_weights(model, meta, tmp_path / name), ext)
    full, abl = results["full"], results["ablation"]
    assert full["median_kappa"] > abl["median_kappa"]
    assert full["median_kappa"] >= 0.6  # the paper's 0.601
    assert full["fms_frequency_auc"] >= 0.9
    assert full["auc"] >= 0.9


def test_recalibrate_gives_one_kind_its_own_fit_and_leaves_the_rest(tmp_path):
    """``recalibrate`` on recordings the weights never saw: the kind gets its own calibration
    (saved with the weights, used by the screener for that kind only); the network and the
    other kind's calibration are untouched; mixed kinds and too few infants are refused."""
    from mam.model.weights import load_weights
    from mam.screening import DEFAULT_WEIGHTS, Screener
    from mam.training.calibration import MIN_KIND_INFANTS
    from mam.training.fitting import InsufficientDataError, recalibrate

    model, meta = load_weights(DEFAULT_WEIGHTS)
    before = meta.to_dict()
    records = load_dataset(write_dataset(tmp_path / "d", MIN_KIND_INFANTS, 7, (30.0, 40.0)))
    with pytest.raises(InsufficientDataError, match="at least"):
        recalibrate(model, meta, records[:10], "pose_file")
    with pytest.raises(ValueError, match="kind"):
        recalibrate(model, meta, records, "video")
    meta = recalibrate(model, meta, records, "pose_file")
    own = meta.calibration_by_kind["pose_file"]
    assert own.infants == MIN_KIND_INFANTS and own.calibration.method == "platt (pose_file)"
    assert vars(meta.calibration) == before["calibration"]  # the overall fit and other kinds
    others = {k: v.to_dict() for k, v in meta.calibration_by_kind.items() if k != "pose_file"}
    assert others == {k: v for k, v in before["calibration_by_kind"].items() if k != "pose_file"}
    w = save_weights(model, meta, tmp_path / "recalibrated")
    sc = Screener(w)
    r = sc.screen_pose(records[0].pose())
    assert r.model.calibration == "platt (pose_file)"
    assert r.classification.threshold == pytest.approx(own.risk_threshold)
