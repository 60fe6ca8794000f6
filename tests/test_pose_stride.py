"""Pose every Nth frame (``MAM_POSE_STRIDE``, an opt-in speed candidate): joints come back at
every frame, interpolated between posed ones, and the default poses every frame."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mam.errors import InputError
from mam.pose.base import PoseSequence
from mam.pose.from_video import _upsample_sequence
from mam.pose.stride import ENV_POSE_STRIDE, Strided, pose_stride, upsample

ROOT = Path(__file__).resolve().parents[1]


def test_default_poses_every_frame(monkeypatch):
    monkeypatch.delenv(ENV_POSE_STRIDE, raising=False)
    assert pose_stride() == 1
    monkeypatch.setenv(ENV_POSE_STRIDE, "2")
    assert pose_stride() == 2
    monkeypatch.setenv(ENV_POSE_STRIDE, "two")
    with pytest.raises(InputError):
        pose_stride()


def test_strided_frames_and_linear_joints_come_back_at_every_frame():
    total, stride = 11, 2
    it = Strided(iter(range(total)), stride)
    assert list(it) == [0, 2, 4, 6, 8, 10] and it.seen == total
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(17, 3)), rng.normal(size=(17, 3))
    full = a + np.arange(total)[:, None, None] * b  # motion linear in time: exact after
    posed = full[::stride].astype(np.float32)
    seq = PoseSequence(posed, np.ones(posed.shape[:2], np.float32), 25.0, "onnx",
                       {"image_joints": posed[..., :2]})  # fmt: skip
    up = _upsample_sequence(seq, stride, total)
    assert up.joints.shape == (total, 17, 3) and up.joints.dtype == np.float32
    np.testing.assert_allclose(up.joints, full, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(up.meta["image_joints"], full[..., :2], rtol=1e-5, atol=1e-4)
    assert up.confidence.shape == (total, 17)
    # an even total: the last frame was not posed and holds the last posed one
    np.testing.assert_allclose(upsample(posed[:5], 2, 10)[9], posed[4], atol=1e-6)
    # an untracked posed frame leaves its neighbours unknown, not invented
    gap = posed.copy()
    gap[2] = np.nan
    up = upsample(gap, stride, total)
    assert np.isnan(up[3:6]).all() and np.isfinite(up[:3]).all() and np.isfinite(up[7:]).all()


def test_onnx_backend_poses_every_second_frame_close_to_every_frame():
    from itertools import islice

    from mam.pose import create_backend
    from mam.video import iter_frames

    demo = ROOT / "demo" / "infant_demo.mp4"
    frames = list(islice(iter_frames(demo, max_side=640), 100))
    backend = create_backend("onnx", threads=1)
    full = backend.estimate(iter(frames))
    backend.frame_stride = 2
    try:
        half = backend.estimate(iter(frames))
    finally:
        backend.frame_stride = 1
    assert half.num_frames == full.num_frames == len(frames)
    a, b = full.meta["image_joints"], half.meta["image_joints"]
    ok = np.isfinite(a).all(axis=(1, 2)) & np.isfinite(b).all(axis=(1, 2))
    assert ok.mean() > 0.9
    # the infant moves: frames a second apart differ far more than the two poses of one frame
    step = np.linalg.norm(a[25:][ok[25:] & ok[:-25]] - a[:-25][ok[25:] & ok[:-25]], axis=-1)
    apart = np.linalg.norm(a[ok] - b[ok], axis=-1)
    assert np.median(apart) < 0.5 * np.median(step), (np.median(apart), np.median(step))
