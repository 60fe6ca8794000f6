"""The paper's Table 2 baselines: EML (McCay et al.'s pose histograms + ensemble) and the infant
data alone, on MAM's folds and metrics."""

from __future__ import annotations

from unittest.mock import MagicMock

import numpy as np
import pytest

from mam.errors import InsufficientTrackingError
from mam.synth import simulate_infant
from mam.training.baselines import (
    DIRECTION_BINS,
    METHODS,
    ORIENTATION_BINS,
    TABLE_COLUMNS,
    cross_validate_baselines,
    eml_feature_matrix,
    eml_features,
    external_baselines,
    paper_table,
)
from mam.training.train import TrainConfig, TrainRecord


def _records(n_per_group: int, seed: int, duration_s: float = 60.0) -> list[TrainRecord]:
    """Simulated infants with known truth: normal with continuous FMs, risk with none."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(2 * n_per_group):
        sim = simulate_infant(rng, f"b{i}", ("continuous", "absent")[i % 2], duration_s)
        info = [sim.sex == "male", sim.gestational_age_weeks, sim.birth_weight_g,
                sim.corrected_age_weeks]  # fmt: skip
        out.append(TrainRecord(sim.infant_id, sim.joints, sim.group, info=np.asarray(info, float)))
    return out


@pytest.fixture(scope="module")
def records() -> list[TrainRecord]:
    return _records(12, seed=3)


@pytest.fixture(scope="module")
def cv(records) -> dict[str, dict]:
    return cross_validate_baselines(records, folds=4, seed=0)


def _shuffled(records: list[TrainRecord], seed: int) -> list[TrainRecord]:
    groups = np.random.default_rng(seed).permutation([r.group for r in records])
    return [
        TrainRecord(r.infant_id, r.joints, str(g), info=r.info) for r, g in zip(records, groups)
    ]


def test_eml_learns_fidgety_movements_and_shuffled_labels_do_not(records, cv):
    assert cv["EML"]["auc"] >= 0.8
    shuffled = [
        cross_validate_baselines(_shuffled(records, s), folds=4, seed=0)["EML"]["auc"]
        for s in range(6)
    ]
    assert np.mean(shuffled) <= 0.65


def test_histograms_are_normalised_and_per_recording(records):
    x = eml_feature_matrix(records[:6])
    n_bones = 16
    hojo = x[:, : n_bones * ORIENTATION_BINS].reshape(6, n_bones, ORIENTATION_BINS)
    hojd = x[:, n_bones * ORIENTATION_BINS :].reshape(6, -1, DIRECTION_BINS)
    np.testing.assert_allclose(hojo.sum(-1), 1.0, atol=1e-9)
    np.testing.assert_allclose(hojd.sum(-1), 1.0, atol=1e-9)
    assert (x >= 0).all() and x.std(axis=0).max() > 0.01  # they differ between infants
    np.testing.assert_array_equal(eml_feature_matrix(records[:6][::-1]), x[::-1])


def test_a_still_joint_and_untracked_frames_follow_the_explicit_rules(records):
    joints = records[0].joints.copy()
    joints[:, 13] = joints[:, 12] + joints[0, 13] - joints[0, 12]  # left wrist moves with elbow
    joints[::7] = np.nan  # untracked frames are skipped
    f = eml_features(TrainRecord("x", joints, "normal"))
    assert np.isfinite(f).all()
    hist = f[16 * ORIENTATION_BINS :].reshape(-1, DIRECTION_BINS)
    np.testing.assert_allclose(hist.sum(-1), 1.0, atol=1e-9)
    # the forearm keeps one orientation: its HOJO2D is one bin
    forearm = f[: 16 * ORIENTATION_BINS].reshape(-1, ORIENTATION_BINS)[12]
    assert forearm.max() == pytest.approx(1.0)


def test_a_recording_without_tracked_frames_is_a_typed_error(records):
    blank = TrainRecord("secret_id", np.full_like(records[0].joints, np.nan), "risk")
    with pytest.raises(InsufficientTrackingError) as e:
        cross_validate_baselines([*records, blank], folds=4, seed=0)
    assert e.value.code == "insufficient_tracking"
    assert "25 of 25" in str(e.value) and "secret_id" not in str(e.value)


def test_too_few_infants_to_fit_is_a_typed_error(records):
    from mam.training.dataset import DatasetError

    with pytest.raises(DatasetError, match="at least 2 risk infants"):
        external_baselines([r for r in records if r.group == "normal"] + records[1:2], records, 0)
    four = [r for r in records if r.group == "normal"][:2] + [
        r for r in records if r.group == "risk"
    ][:2]
    with pytest.raises(DatasetError, match="each training fold"):
        cross_validate_baselines(four, folds=2, seed=0)


def test_folds_are_those_of_mams_cross_validation(records, cv, monkeypatch):
    """MAM's own ``cross_validate`` with training and scoring stubbed out: the infants it
    scores in each fold are the ones each baseline scores in that fold."""
    import mam.model.weights
    import mam.training.evaluate as ev
    import mam.training.fitting

    class Seen(Exception):
        pass

    seen: list[list[str]] = []

    def evaluate(weights, recs, *a, **k):
        seen.append([r.infant_id for r in recs])
        if len(seen) == 4:
            raise Seen
        return {}

    fit = lambda *a, **k: (MagicMock(), MagicMock())  # noqa: E731
    save = lambda *a, **k: None  # noqa: E731
    for module in (mam.training.fitting, ev):  # wherever cross_validate finds them
        monkeypatch.setattr(module, "fit", fit, raising=False)
    for module in (mam.model.weights, ev):
        monkeypatch.setattr(module, "save_weights", save, raising=False)
    monkeypatch.setattr(ev, "evaluate", evaluate)
    with pytest.raises(Seen):
        ev.cross_validate(records, TrainConfig(seed=0), folds=4)
    for name in METHODS:
        assert [f["per_infant"]["id"] for f in cv[name]["folds"]] == seen


def test_infant_data_learns_preterm_risk_and_imputes_the_prevalence():
    train = _records(40, seed=5, duration_s=12.0)
    test = _records(20, seed=6, duration_s=12.0)
    test[0].info = None
    ext = external_baselines(train, test, seed=0)
    assert set(ext) == set(METHODS)
    info = ext["infant data"]
    # the simulator makes risk infants more preterm (GA 33 vs 36.5 weeks)
    assert info["auc"] >= 0.65
    assert info["per_infant"]["risk_probability"][0] == pytest.approx(0.5)
    assert info["threshold"] == pytest.approx(0.5)


def test_paper_table_has_every_method_and_column(cv):
    text = paper_table(cv)
    header = text.splitlines()[0]
    assert all(c in header for c, _ in TABLE_COLUMNS)
    for name in METHODS:
        row = next(line for line in text.splitlines() if line.startswith(name))
        assert row.count("±") == len(TABLE_COLUMNS)
        assert f"{cv[name]['auc']:.3f} ± {cv[name]['auc_sd']:.3f}" in row
    ext = paper_table({"EML": cv["EML"]["folds"][0]})
    assert "±" not in ext and f"{cv['EML']['folds'][0]['auc']:.3f}" in ext
