"""Results that know their limits: the shipped weights' domain check and abstention.

All inputs are pose files made here from seeds (cheap enough for CI); the rendered-video
evaluation is ``python recipes/demo_weights.py`` (README, model card). Bounds: at least 95% of
recordings unlike the training data flagged, at most 5% (at least 90% in domain) of simulator
pose files of any seed flagged, and those classified as their truth says. A model
without the gate, or a gate that passes everything or nothing, fails one of them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mam.gma import FMS_CATEGORIES
from mam.pose.precomputed import validate_pose_array
from mam.screening import DEFAULT_WEIGHTS, Screener, ScreeningOptions
from mam.synth import shifted
from mam.synth.motion import SimParams, simulate_infant
from mam.synth.real_motion import default_data_path

SECONDS = 40.0


@pytest.fixture(scope="module")
def screener() -> Screener:
    return Screener(DEFAULT_WEIGHTS)


@pytest.fixture(scope="module")
def real_motion() -> Path:
    """The real infant motion the shifted sets draw on (shipped in mam/synth/data)."""
    path = Path(default_data_path())
    if not path.is_file():
        pytest.skip(f"real infant motion not found: {path} (mam/synth/data/ or MAM_DEMO_POSES)")
    return path


def _screen(screener, joints, infant=None):
    return screener.screen_pose(validate_pose_array(joints), infant)


def _synth(seed: int, n: int, params: SimParams | None = None):
    rng = np.random.default_rng(seed)
    return [
        simulate_infant(rng, f"s{i}", FMS_CATEGORIES[i % 4], SECONDS, params or SimParams())
        for i in range(n)
    ]


def test_the_weights_describe_what_they_were_trained_on(screener):
    d = screener.meta.domain
    assert d is not None and {"video", "pose_file"} <= set(d.kinds)
    for kind in d.kinds.values():
        assert kind.recordings >= 50 and np.isfinite(kind.motion.threshold)
        assert np.isfinite(kind.embedding.threshold) and kind.clip_threshold > 0
    held = screener.meta.provenance["domain"]["heldout_flagged"]
    assert all(0.0 <= share <= 0.05 for share in held.values()), held


@pytest.mark.parametrize("seed", [101, 202])
def test_simulator_pose_files_stay_in_domain_and_are_classified_by_their_truth(screener, seed):
    sims = _synth(seed, 24) + _synth(seed + 1, 8, SimParams().widened())
    results = [_screen(screener, s.joints) for s in sims]
    in_domain = np.array([r.domain.in_domain for r in results])
    assert in_domain.mean() >= 0.9, [r.classification.reasons for r in results]
    right = [r.classification.label == s.group for r, s in zip(results, sims) if r.domain.in_domain]
    assert np.mean(right) >= 0.9
    for r in results:
        if r.domain.in_domain:  # every number of a result the model speaks for is usable
            assert r.probabilities_usable and r.classification.reasons == []
            assert len(r.domain.clip_scores) == len(r.clips)


def _shifted_sets(seed: int) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    cats = FMS_CATEGORIES * 2
    return {
        "real motion alone (external infants)": [
            shifted.real_only(rng, SECONDS, "external") for _ in range(6)
        ],
        "real motion alone (training infants)": [
            shifted.real_only(rng, SECONDS, "train") for _ in range(6)
        ],
        "another camera view": [shifted.other_view(rng, c, SECONDS) for c in cats[:6]],
        "heavy jitter": [shifted.jittered(rng, c, SECONDS) for c in cats[:6]],
        "an adult-sized skeleton": [shifted.adult_sized(rng, c, SECONDS) for c in cats[:6]],
    }


def test_recordings_unlike_the_training_data_are_flagged_and_indeterminate(screener, real_motion):
    sets = _shifted_sets(7)
    flagged, total = 0, 0
    for name, recordings in sets.items():
        for joints in recordings:
            r = _screen(screener, joints)
            total += 1
            if not r.domain.in_domain:
                flagged += 1
                assert r.classification.label == "indeterminate", name
                assert r.fms_category == "indeterminate" and not r.probabilities_usable
                assert r.classification.reasons and r.warnings[0].startswith("Result indeterminate")
    assert flagged / total >= 0.95, (flagged, total)


def test_without_the_gate_the_same_recordings_get_confident_labels(screener, real_motion):
    """The gate, not the network, is what stops a confident answer on real motion alone: with
    abstention off the model says normal or risk, marked as not to be used."""
    research = Screener(DEFAULT_WEIGHTS, ScreeningOptions(abstain=False))
    rng = np.random.default_rng(8)
    for _ in range(3):
        r = _screen(research, shifted.real_only(rng, SECONDS, "external"))
        assert r.classification.label in ("normal", "risk")
        assert not r.domain.in_domain and not r.probabilities_usable
        assert r.warnings[0].startswith("Abstention is off")


def test_a_still_skeleton_has_no_movement_to_assess(screener):
    sim = _synth(3, 1)[0]
    still = np.repeat(sim.joints[:1], 300, axis=0)
    r = _screen(screener, still)
    assert r.classification.label == "indeterminate" and not r.probabilities_usable
    assert any("no movement" in why for why in r.classification.reasons)


def test_weights_without_a_domain_record_never_claim_to_be_in_domain(screener, monkeypatch):
    monkeypatch.setattr(screener.meta, "domain", None)
    r = _screen(screener, _synth(4, 1)[0].joints)
    assert r.classification.label == "indeterminate" and r.domain.score is None
    assert "no record of the data they were trained on" in r.classification.reasons[0]


def test_poor_tracking_is_indeterminate(screener):
    sim = _synth(5, 1)[0]
    joints = sim.joints.copy()
    joints[np.random.default_rng(0).random(len(joints)) < 0.3] = np.nan  # 70% tracked
    r = _screen(screener, joints)
    assert r.classification.label == "indeterminate"
    assert any("tracked in only" in why for why in r.classification.reasons)


def test_instance_tensors_are_checked_by_their_embeddings(screener):
    """Bare tensors have no motion statistics: the embedding check alone, against the nearest
    kind the weights know; real motion alone is still flagged."""
    from mam.features import build_instances
    from mam.pose.base import PoseSequence
    from mam.pose.representation import model_input

    def tensors(joints):
        seq = PoseSequence(joints, np.ones(joints.shape[:2], np.float32), source="precomputed")
        x = model_input(seq, screener.meta.representation)
        return build_instances(x, screener.meta.normalizer).tensors

    ok = screener.score_instances(tensors(np.nan_to_num(_synth(6, 1)[0].joints)))
    fields = screener.summarize(ok, "instances")
    assert fields["domain"].motion_score is None and fields["domain"].in_domain
    rng = np.random.default_rng(9)
    away = screener.score_instances(tensors(shifted.jittered(rng, "continuous", SECONDS, 0.03)))
    assert not screener.summarize(away, "instances")["domain"].in_domain
