"""The infant-movement simulator (``mam.synth.motion``): its ground truth, its geometry, and how
honest it is against the real infant motion of ``shared/data/mam_demo_poses.npz`` (those tests
skip when ``shared/`` is not beside the repository).

THE SIMULATOR IS NOT PHYSIOLOGY; these tests only check that it does what it says.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mam.features import moving_average
from mam.skeleton import BONES, FPS, NUM_JOINTS
from mam.synth.motion import (
    CATEGORIES,
    GROUP_OF,
    SimParams,
    _forward_kinematics,
    mask_to_intervals,
    simulate_infant,
)
from mam.synth.real_motion import AXIS_SCALE, INFANT_BONES_M

PELVIS, THORAX = 0, 8


@pytest.fixture(scope="module")
def real_clips(demo_npz: Path) -> np.ndarray:
    """Real clips ``[495, 240, 17, 3]`` with the per-axis standardisation undone (DESIGN.md)."""
    with np.load(demo_npz) as data:
        return data["clips"].astype(np.float64) * AXIS_SCALE


@pytest.fixture(scope="module")
def sim_infants() -> list:
    """Two infants per category, 48 s each, fixed seeds."""
    out = []
    for i, cat in enumerate(CATEGORIES * 2):
        out.append(simulate_infant(np.random.default_rng(100 + i), f"s{i}", cat, duration_s=48.0))
    return out


def _bone_lengths(joints: np.ndarray) -> np.ndarray:
    """``[T, 17, 3]`` -> ``[T, 16]`` lengths of the skeleton's bones, in ``BONES`` order."""
    return np.stack([np.linalg.norm(joints[:, c] - joints[:, p], axis=-1) for p, c in BONES], 1)


def _rest_lengths() -> np.ndarray:
    return np.array([INFANT_BONES_M[b] for b in BONES])


# --- ground truth --------------------------------------------------------------------------------
@pytest.mark.parametrize("category", CATEGORIES)
def test_fms_share_within_category_range(category: str):
    lo, hi = SimParams().fms_share[category]
    for seed in range(4):
        s = simulate_infant(np.random.default_rng(seed), "x", category, duration_s=120.0)
        assert s.fms_mask.shape == (3000,) and s.fms_mask.dtype == bool
        share = s.fms_mask.mean()
        assert lo - 0.02 <= share <= hi + 0.02, (category, seed, share)
        assert s.category == category
        assert s.group == GROUP_OF[category]
    if category == "absent":
        assert not s.fms_mask.any() and s.fms_intervals_s == []


def test_groups_follow_the_paper():
    assert GROUP_OF == {
        "continuous": "normal",
        "intermittent": "normal",
        "sporadic": "risk",
        "absent": "risk",
    }
    # Ranges are ordered: continuous > intermittent > sporadic > absent, without overlap.
    shares = SimParams().fms_share
    for a, b in zip(CATEGORIES, CATEGORIES[1:]):
        assert shares[a][0] > shares[b][1]


def test_fms_intervals_match_mask():
    s = simulate_infant(np.random.default_rng(7), "x", "intermittent", duration_s=120.0)
    intervals = s.fms_intervals_s
    assert len(intervals) >= 1
    rebuilt = np.zeros_like(s.fms_mask)
    prev_end = -1.0
    for start, end in intervals:
        assert prev_end < start < end  # sorted, disjoint, not touching (runs are maximal)
        rebuilt[round(start * FPS) : round(end * FPS)] = True
        prev_end = end
    np.testing.assert_array_equal(rebuilt, s.fms_mask)
    assert sum(e - b for b, e in intervals) == pytest.approx(s.fms_mask.sum() / FPS)
    # The helper on a hand example.
    mask = np.array([1, 1, 0, 0, 1, 0, 1, 1, 1], bool)
    assert mask_to_intervals(mask, fps=2.0) == [(0.0, 1.0), (2.0, 2.5), (3.0, 4.5)]


def test_infant_data_in_plausible_ranges():
    for i, cat in enumerate(CATEGORIES):
        s = simulate_infant(np.random.default_rng(i), "x", cat, duration_s=12.0)
        assert 24.0 <= s.gestational_age_weeks <= 42.0
        assert 450 <= s.birth_weight_g <= 5000
        assert 9.0 <= s.corrected_age_weeks <= 20.0
        assert s.sex in ("male", "female")
        assert s.joints.shape == s.clean_joints.shape == (300, NUM_JOINTS, 3)


# --- geometry -----------------------------------------------------------------------------------
def test_forward_kinematics_gives_rest_lengths_times_scale():
    """Before the camera rotation: every bone is its rest length x body scale, in every frame,
    whatever the (unnormalised) directions."""
    rng = np.random.default_rng(0)
    dirs = rng.normal(size=(50, NUM_JOINTS, 3))
    pos = _forward_kinematics(dirs, 1.1)
    np.testing.assert_allclose(pos[:, PELVIS], 0.0)
    np.testing.assert_allclose(_bone_lengths(pos), np.tile(_rest_lengths() * 1.1, (50, 1)), 1e-9)


def test_clean_bone_lengths_constant_after_rotation():
    params = SimParams()
    for i, cat in enumerate(CATEGORIES):
        s = simulate_infant(np.random.default_rng(20 + i), "x", cat, duration_s=40.0)
        lengths = _bone_lengths(s.clean_joints.astype(np.float64))
        ratio = lengths / _rest_lengths()  # one body scale for every bone and every frame
        scale = np.median(ratio)
        assert params.body_scale[0] <= scale <= params.body_scale[1]
        np.testing.assert_allclose(ratio, scale, rtol=1e-5)
        # The clean pose really moves (constant lengths are not a frozen skeleton).
        assert np.ptp(s.clean_joints[:, 13], axis=0).max() > 0.01
        np.testing.assert_allclose(s.clean_joints[:, PELVIS], 0.0, atol=1e-7)


def test_camera_orientation_head_up_left_right():
    """Head toward the top of the image (-y) within the roll and tilt ranges; the infant's left
    on image right (+x); knees toward the camera (-z)."""
    for seed in range(6):
        s = simulate_infant(np.random.default_rng(seed), "x", "continuous", duration_s=12.0)
        j = s.clean_joints.astype(np.float64)
        up = (j[:, THORAX] - j[:, PELVIS]).mean(0)
        angle = np.degrees(np.arccos(-up[1] / np.linalg.norm(up)))
        assert angle < 40.0, angle
        assert (j[:, 4, 0] - j[:, 1, 0]).mean() > 0  # left hip right of the right hip
        assert (j[:, 11, 0] - j[:, 14, 0]).mean() > 0  # left shoulder right of the right one
        assert j[:, [2, 5], 2].mean() < 0  # knees toward the camera


def test_observed_pelvis_relative_with_whole_frame_dropouts():
    params = SimParams(dropouts_per_min=(6.0, 6.0))
    s = simulate_infant(np.random.default_rng(3), "x", "intermittent", 120.0, params)
    lost = np.isnan(s.joints)
    per_frame = lost.reshape(len(lost), -1)
    assert per_frame.any(), "expected some dropouts at 6 per minute"
    # A frame is either wholly lost or wholly tracked.
    assert np.all(per_frame.all(1) == per_frame.any(1))
    assert 0.001 < per_frame.all(1).mean() < 0.2
    assert np.isfinite(s.clean_joints).all()
    tracked = ~per_frame.any(1)
    assert np.all(s.joints[tracked, PELVIS] == 0.0)
    # Observation noise is small: millimetres against centimetre-scale bones.
    err = np.abs(s.joints[tracked] - s.clean_joints[tracked])
    assert 0 < np.median(err) < 0.005
    # The same holds with the default dropout rate (0-2 per minute).
    lost0 = np.isnan(simulate_infant(np.random.default_rng(3), "x", "absent", 60.0).joints)
    lost0 = lost0.reshape(len(lost0), -1)
    assert np.all(lost0.all(1) == lost0.any(1))


def test_reproducible_with_seed():
    a = simulate_infant(np.random.default_rng(42), "a", "sporadic", duration_s=30.0)
    b = simulate_infant(np.random.default_rng(42), "a", "sporadic", duration_s=30.0)
    c = simulate_infant(np.random.default_rng(43), "a", "sporadic", duration_s=30.0)
    np.testing.assert_array_equal(a.joints, b.joints)  # NaN positions included
    np.testing.assert_array_equal(a.clean_joints, b.clean_joints)
    np.testing.assert_array_equal(a.fms_mask, b.fms_mask)
    assert (a.sex, a.gestational_age_weeks, a.birth_weight_g, a.corrected_age_weeks) == (
        b.sex,
        b.gestational_age_weeks,
        b.birth_weight_g,
        b.corrected_age_weeks,
    )
    assert not np.allclose(a.clean_joints, c.clean_joints)


# --- the truth is in the signal ------------------------------------------------------------------
def _band(x: np.ndarray, lo: float, hi: float, fps: float = FPS) -> np.ndarray:
    spec = np.fft.rfft(x, axis=0)
    freqs = np.fft.rfftfreq(len(x), 1 / fps)
    spec[(freqs < lo) | (freqs > hi)] = 0
    return np.fft.irfft(spec, n=len(x), axis=0)


def _erode(mask: np.ndarray, frames: int) -> np.ndarray:
    """Frames whose whole +-``frames`` neighbourhood is in ``mask`` (away from bout edges)."""
    k = np.ones(2 * frames + 1)
    return np.convolve(mask.astype(float), k, "same") >= len(k) - 0.5


def test_fms_frames_carry_more_band_energy():
    """Observed joints (jitter included, no dropouts): FMs frames hold more 0.8-3 Hz energy than
    the same infant's non-FMs frames (measured ratios 2.2-7 over six seeds)."""
    params = SimParams(dropouts_per_min=(0.0, 0.0))
    for seed in range(3):
        s = simulate_infant(np.random.default_rng(seed), "x", "intermittent", 120.0, params)
        energy = (_band(s.joints.astype(np.float64), 0.8, 3.0) ** 2).sum(axis=(1, 2))
        fms, rest = _erode(s.fms_mask, 25), _erode(~s.fms_mask, 25)
        assert fms.sum() > 250 and rest.sum() > 250
        assert energy[fms].mean() > 1.5 * energy[rest].mean(), seed
    # And not in the slow band: writhing (0.1-0.6 Hz) goes on in both.
    slow = (_band(s.joints.astype(np.float64), 0.1, 0.5) ** 2).sum(axis=(1, 2))
    assert slow[fms].mean() < 1.5 * slow[rest].mean()


# --- honesty against real motion -----------------------------------------------------------------
def _speed_and_spread(joints: np.ndarray, fps: float = FPS) -> tuple[float, float]:
    """Median joint speed (per second) and median per-axis positional std over the clip, both in
    trunk lengths (median pelvis->thorax distance); pelvis-relative, pelvis itself left out."""
    j = joints - joints[:, :1]
    trunk = np.nanmedian(np.linalg.norm(j[:, THORAX] - j[:, PELVIS], axis=-1))
    speed = np.linalg.norm(np.diff(j, axis=0), axis=-1)[:, 1:] * fps
    spread = np.nanstd(j[:, 1:], axis=0)
    return float(np.nanmedian(speed) / trunk), float(np.nanmedian(spread) / trunk)


def _sim_stats(infants: list, which: str) -> np.ndarray:
    """Per 240-frame window (the real clips' length) of every infant, then the median."""
    stats = []
    for s in infants:
        if which == "clean":
            seq = s.clean_joints.astype(np.float64)
        else:  # what the pipeline sees: observed joints after its 5-frame moving average
            seq = moving_average(s.joints).astype(np.float64)
        for start in range(0, len(seq) - 239, 240):
            stats.append(_speed_and_spread(seq[start : start + 240]))
    return np.median(np.array(stats), axis=0)


def test_simulator_speed_and_spread_close_to_real(real_clips: np.ndarray, sim_infants: list):
    real = np.median(np.array([_speed_and_spread(c) for c in real_clips]), axis=0)
    # Measured on the 495 real clips: speed 0.22 trunk lengths/s, spread 0.058 trunk lengths.
    assert 0.05 < real[0] < 0.6 and 0.01 < real[1] < 0.2
    # The real clips are the paper's prepared inputs (smoothed); compare like with like: the
    # simulator's clean motion and its observed motion after the pipeline's smoothing.
    for which in ("clean", "smoothed"):
        sim = _sim_stats(sim_infants, which)
        ratio = sim / real
        assert np.all((ratio > 1 / 3) & (ratio < 3)), (which, sim, real)


def test_background_pools_share_no_clip_and_chain_real_overlaps(demo_npz):
    from mam.synth.backgrounds import EXTERNAL_INFANTS, load_library, pool_chains
    from mam.synth.real_motion import CLIP_STRIDE, OVERLAP, load_clips

    clips, groups = load_clips(demo_npz)
    train = {c for ch in pool_chains(clips, groups, "train") for c in ch}
    external = {c for ch in pool_chains(clips, groups, "external") for c in ch}
    assert not train & external and len(train | external) == len(clips)
    for g in EXTERNAL_INFANTS:  # whole infants, never split across pools
        assert {int(c) for c in groups["group:" + g]} <= external
    for ch in pool_chains(clips, groups, "train"):
        for a, b in zip(ch, ch[1:]):
            assert np.abs(clips[a][CLIP_STRIDE:] - clips[b][:OVERLAP]).max() <= 1e-3
    lib = load_library("external", str(demo_npz))
    d = lib.sample(np.random.default_rng(0), 3000)  # longer than any stretch: played back
    assert d.shape == (3000, 17, 3) and np.allclose(np.linalg.norm(d[:, 1:], axis=-1), 1, atol=1e-4)
    assert np.abs(np.diff(d, axis=0)).max() < 0.5  # continuous: no jump between frames


def test_real_background_carries_the_simulated_fms_truth(demo_npz):
    from mam.synth.backgrounds import load_library

    lib = load_library("train", str(demo_npz))
    rng = np.random.default_rng(1)
    on = simulate_infant(rng, "a", "continuous", 60.0, background=lib)
    off = simulate_infant(rng, "b", "absent", 60.0, background=lib)
    assert on.fms_mask.mean() > 0.75 and not off.fms_mask.any()

    def fms_band(j):  # 0.8-3 Hz power of the hands and feet, in trunk lengths
        x = j[:, [13, 16, 3, 6]] - j[:, [13, 16, 3, 6]].mean(0)
        f = np.fft.rfftfreq(len(x), 1 / 25)
        p = (np.abs(np.fft.rfft(x.reshape(len(x), -1), axis=0)) ** 2).sum(1)
        return p[(f > 0.8) & (f < 3)].sum() / p[(f > 0.05) & (f < 0.8)].sum()

    assert fms_band(on.clean_joints) > 1.3 * fms_band(off.clean_joints)
