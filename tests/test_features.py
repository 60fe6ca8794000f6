"""Feature path (``mam.features``): difference matrices, 5-frame smoothing, normalisation,
240-frame / step-90 clip split and instance building (paper, Methods: "3D information acquisition
and pre-processing", "Input features construction", "Definition of bag and instance").

Hand-computed examples first; then the real infant motion of ``shared/data/mam_demo_poses.npz``
(skipped when ``shared/`` is not next to the repository).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mam.errors import InsufficientTrackingError, VideoTooShortError
from mam.features import (
    CLIP_FRAMES,
    CLIP_STEP,
    Normalizer,
    build_instances,
    clip_bounds,
    difference_matrices,
    moving_average,
)
from mam.skeleton import FPS, NUM_JOINTS

CONTINUOUS_GROUP = "group:prepared_data/Data_derivation/FM-/0005"


@pytest.fixture(scope="module")
def demo_clips(demo_npz: Path) -> np.ndarray:
    with np.load(demo_npz) as data:
        return data["clips"].astype(np.float32)


def _smooth_walk(rng: np.random.Generator, frames: int) -> np.ndarray:
    """A smooth random pose sequence ``[T, 17, 3]`` (cumulative sum of small steps)."""
    return np.cumsum(rng.normal(scale=0.01, size=(frames, NUM_JOINTS, 3)), axis=0).astype(
        np.float32
    ) + rng.normal(size=(1, NUM_JOINTS, 3)).astype(np.float32)


# --- difference_matrices -------------------------------------------------------------------------
def test_difference_matrices_hand_example():
    x = np.zeros((2, NUM_JOINTS, 3), np.float32)
    x[0, 0] = (1.0, 2.0, 3.0)
    x[0, 5] = (-4.0, 0.5, 10.0)
    x[1, 16] = (7.0, -1.0, 0.0)
    x[1, 3] = (2.0, 2.0, 2.0)
    d = difference_matrices(x)
    assert d.shape == (2, 3, NUM_JOINTS, NUM_JOINTS)
    assert d.dtype == np.float32
    # d[t, c, i, j] = x[t, i, c] - x[t, j, c], worked out by hand.
    assert d[0, 0, 0, 5] == 1.0 - (-4.0)  # 5
    assert d[0, 0, 5, 0] == -5.0
    assert d[0, 1, 0, 5] == 2.0 - 0.5  # 1.5
    assert d[0, 2, 5, 0] == 10.0 - 3.0  # 7
    assert d[0, 2, 5, 7] == 10.0  # joint 7 is at the origin
    assert d[0, 1, 9, 0] == -2.0
    assert d[1, 0, 16, 3] == 7.0 - 2.0  # 5
    assert d[1, 1, 16, 3] == -1.0 - 2.0  # -3
    assert d[1, 2, 3, 16] == 2.0
    assert d[1, 0, 0, 5] == 0.0  # frame 1 has nothing at joints 0 and 5
    # Frame 0, x: rows 0 and 5 are non-zero off the diagonal (16 each); every other row has
    # exactly two non-zero entries (columns 0 and 5).
    assert np.count_nonzero(d[0, 0]) == 16 + 16 + 15 * 2
    # Frame 1, z: only joint 3 is off the origin -> its row and its column.
    assert np.count_nonzero(d[1, 2]) == 16 + 16


def test_difference_matrices_antisymmetric_zero_diagonal():
    x = np.random.default_rng(0).normal(size=(5, NUM_JOINTS, 3)).astype(np.float32)
    d = difference_matrices(x)
    np.testing.assert_array_equal(d, -d.transpose(0, 1, 3, 2))
    assert np.all(np.diagonal(d, axis1=2, axis2=3) == 0)
    # Row 0 is every joint relative to the pelvis, with the sign flipped.
    np.testing.assert_allclose(-d[:, :, 0, :], (x - x[:, :1]).transpose(0, 2, 1), atol=1e-6)
    # A translation of the whole body changes nothing.
    shifted = difference_matrices(x + np.array([3.0, -2.0, 0.5], np.float32))
    np.testing.assert_allclose(shifted, d, atol=1e-5)


# --- moving_average ------------------------------------------------------------------------------
def test_moving_average_hand_example_shrinking_ends():
    x = np.array([1.0, 2.0, 4.0, 8.0, 16.0, 32.0])
    out = moving_average(x, 5)
    expected = [
        (1 + 2 + 4) / 3,  # window [0, 2]
        (1 + 2 + 4 + 8) / 4,  # [0, 3]
        (1 + 2 + 4 + 8 + 16) / 5,  # [0, 4]
        (2 + 4 + 8 + 16 + 32) / 5,  # [1, 5]
        (4 + 8 + 16 + 32) / 4,  # [2, 5]
        (8 + 16 + 32) / 3,  # [3, 5]
    ]
    assert out.shape == x.shape
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_moving_average_nan_frames_do_not_leak():
    x = np.array([1.0, 2.0, np.nan, 8.0, 16.0, 32.0])
    out = moving_average(x, 5)
    expected = [
        (1 + 2) / 2,
        (1 + 2 + 8) / 3,
        np.nan,
        (2 + 8 + 16 + 32) / 4,
        (8 + 16 + 32) / 3,
        (8 + 16 + 32) / 3,
    ]
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert np.isnan(out[2]) and np.isfinite(np.delete(out, 2)).all()


def test_moving_average_pose_shape_and_window_check():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(12, NUM_JOINTS, 3))
    x[4] = np.nan  # a whole untracked frame
    out = moving_average(x, 5)
    assert out.shape == x.shape
    assert np.isnan(out[4]).all() and np.isfinite(np.delete(out, 4, axis=0)).all()
    # An inner frame, computed directly: frames 6..10 (all tracked).
    np.testing.assert_allclose(out[8], x[6:11].mean(axis=0), rtol=1e-5, atol=1e-6)
    # Frame 5's window is 3..7 minus the NaN frame 4.
    np.testing.assert_allclose(out[5], x[[3, 5, 6, 7]].mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(moving_average(x, 1), x.astype(np.float32), equal_nan=True)
    for bad in (0, 4, -3):
        with pytest.raises(ValueError):
            moving_average(x, bad)


# --- clip_bounds ---------------------------------------------------------------------------------
def test_clip_bounds_paper_grid_and_tail():
    assert CLIP_FRAMES == 240 and CLIP_STEP == 90
    assert clip_bounds(239) == []
    assert clip_bounds(0) == []
    assert clip_bounds(240) == [(0, 240)]
    assert clip_bounds(330) == [(0, 240), (90, 330)]
    # 375 frames: the grid ends at 330, leaving 45 = step // 2 unseen -> no tail instance.
    assert clip_bounds(375) == [(0, 240), (90, 330)]
    # 376 frames: 46 unseen > 45 -> one more instance ending at the last frame.
    assert clip_bounds(376) == [(0, 240), (90, 330), (136, 376)]
    assert clip_bounds(376, cover_tail=False) == [(0, 240), (90, 330)]
    # 60 s at 25 fps: starts 0, 90, ..., 1260 (15), end 1500 reached exactly -> no tail.
    b = clip_bounds(1500)
    assert len(b) == 15 and b[0] == (0, 240) and b[-1] == (1260, 1500)
    assert all(e - s == 240 for s, e in b)
    # The reference demo's step 60 on 2100 frames: 32 instances, as the published bag.
    assert len(clip_bounds(2100, step=60)) == 32
    with pytest.raises(ValueError):
        clip_bounds(1000, step=0)


# --- Normalizer ----------------------------------------------------------------------------------
def test_normalizer_fit_apply_round_trip():
    rng = np.random.default_rng(2)
    a = rng.normal(loc=(1.0, -2.0, 0.5), scale=(0.5, 2.0, 3.0), size=(300, NUM_JOINTS, 3))
    b = rng.normal(loc=(1.0, -2.0, 0.5), scale=(0.5, 2.0, 3.0), size=(200, NUM_JOINTS, 3))
    b[10:20] = np.nan  # untracked frames are ignored
    norm = Normalizer.fit([a, b])
    xyz = np.concatenate([a.reshape(-1, 3), b[np.isfinite(b).all(-1)].reshape(-1, 3)])
    np.testing.assert_allclose(norm.mean, xyz.mean(0), rtol=1e-10)
    np.testing.assert_allclose(norm.std, xyz.std(0), rtol=1e-10)
    z = norm.apply(a)
    assert z.dtype == np.float32
    np.testing.assert_allclose(
        z.reshape(-1, 3).mean(0), (a.reshape(-1, 3).mean(0) - norm.mean) / norm.std, atol=1e-5
    )
    np.testing.assert_allclose(
        z[3, 4], (a[3, 4] - np.array(norm.mean)) / np.array(norm.std), rtol=1e-5
    )
    # Through JSON, as it is saved with the weights.
    d = json.loads(json.dumps(norm.to_dict()))
    back = Normalizer.from_dict(d)
    assert back == norm
    np.testing.assert_array_equal(back.apply(b), norm.apply(b))
    with pytest.raises(ValueError):
        Normalizer.fit([np.full((4, NUM_JOINTS, 3), np.nan)])
    with pytest.raises(ValueError):
        Normalizer.fit([np.ones((4, NUM_JOINTS, 3))])


# --- build_instances -----------------------------------------------------------------------------
def test_build_instances_shapes_times_and_values():
    rng = np.random.default_rng(3)
    joints = _smooth_walk(rng, 600)
    norm = Normalizer(std=(2.0, 4.0, 0.5))
    inst = build_instances(joints, norm)
    assert inst.tensors.shape == (5, 240, 3, NUM_JOINTS, NUM_JOINTS)
    assert inst.tensors.dtype == np.float32
    assert len(inst) == 5
    np.testing.assert_array_equal(inst.start_frames, [0, 90, 180, 270, 360])
    np.testing.assert_array_equal(inst.end_frames, [240, 330, 420, 510, 600])
    np.testing.assert_allclose(inst.start_s, [0.0, 3.6, 7.2, 10.8, 14.4])
    np.testing.assert_allclose(inst.end_s - inst.start_s, 240 / FPS)
    # Values: smoothed pelvis-relative pose, divided by the per-axis std, as differences.
    smooth = moving_average(joints - joints[:, :1], 5) / np.array([2.0, 4.0, 0.5], np.float32)
    diffs = difference_matrices(smooth)
    for k, (s, e) in enumerate(zip(inst.start_frames, inst.end_frames)):
        np.testing.assert_allclose(inst.tensors[k], diffs[s:e], rtol=1e-5, atol=1e-6)


def test_build_instances_leaves_out_untracked_instances():
    rng = np.random.default_rng(4)
    joints = _smooth_walk(rng, 600)
    joints[100] = np.nan  # inside instances starting at 0 and 90 only
    inst = build_instances(joints, Normalizer())
    np.testing.assert_array_equal(inst.start_frames, [180, 270, 360])
    np.testing.assert_allclose(inst.start_s, [7.2, 10.8, 14.4])
    assert np.isfinite(inst.tensors).all()
    # A NaN frame at 330 touches instances 180 (to 420) and 270 (to 510), not 90 (to 330).
    joints = _smooth_walk(rng, 600)
    joints[330, 5] = np.nan  # one joint lost is a lost frame too
    inst = build_instances(joints, Normalizer())
    np.testing.assert_array_equal(inst.start_frames, [0, 90, 360])


def test_build_instances_errors():
    rng = np.random.default_rng(5)
    with pytest.raises(VideoTooShortError):
        build_instances(_smooth_walk(rng, 239), Normalizer())
    gappy = _smooth_walk(rng, 500)
    gappy[::200] = np.nan  # frames 0, 200, 400: no 240-frame stretch is clean
    with pytest.raises(InsufficientTrackingError):
        build_instances(gappy, Normalizer())
    with pytest.raises(ValueError):
        build_instances(np.zeros((300, 16, 3), np.float32), Normalizer())


# --- real infant motion --------------------------------------------------------------------------
def test_smoothing_real_motion_reduces_jitter_keeps_posture(demo_clips: np.ndarray):
    clips = demo_clips[::10]  # 50 clips
    smoothed = np.stack([moving_average(c) for c in clips])
    assert smoothed.shape == clips.shape and np.isfinite(smoothed).all()

    def jitter(x):
        return np.abs(np.diff(x, n=2, axis=1)).mean()

    # Measured: 0.0183 -> 0.0045 (about 4x less frame-to-frame jitter).
    assert jitter(smoothed) < 0.5 * jitter(clips)
    # Mean posture per clip, joint and axis is kept (only the shrinking ends weigh differently).
    posture_shift = np.abs(smoothed.mean(axis=1) - clips.mean(axis=1)).max()
    assert posture_shift < 0.01 * clips.std()
    # Smoothing is not a no-op on posture either: every frame moves a little.
    assert np.abs(smoothed - clips).mean() > 1e-3


def test_build_instances_on_stitched_real_sequence(demo_npz: Path):
    from mam.synth.real_motion import stitch_group

    seq = stitch_group(demo_npz, CONTINUOUS_GROUP)
    assert seq.shape == (2100, NUM_JOINTS, 3)  # 32 clips of 240 overlapping by 180
    inst = build_instances(seq, Normalizer())
    # Starts 0, 90, ..., 1800 (21 instances, grid ends at 2040); 60 > 45 frames unseen -> a tail
    # instance 1860-2100.
    assert len(inst) == 22
    assert inst.start_frames[-1] == 1860 and inst.end_frames[-1] == 2100
    np.testing.assert_array_equal(inst.start_frames[:21], np.arange(0, 1801, 90))
    assert inst.end_s[-1] == pytest.approx(84.0)
    assert np.isfinite(inst.tensors).all()
    assert inst.tensors.shape == (22, 240, 3, NUM_JOINTS, NUM_JOINTS)
    # Row 0 of the matrices is minus the (smoothed) pelvis-relative pose.
    smooth = moving_average(seq - seq[:, :1])
    np.testing.assert_allclose(
        -inst.tensors[3, :, :, 0, :], smooth[270:510].transpose(0, 2, 1), rtol=1e-5, atol=1e-5
    )
    # The reference's step 60 recovers the published bag of 32 instances.
    assert len(build_instances(seq, Normalizer(), step=60)) == 32
