"""What the model sees of a pose (``mam.pose.representation``): the same movement gives the same
input whatever the camera's roll, zoom or the units, and each representation takes its own
coordinates."""

from __future__ import annotations

import numpy as np
import pytest

from mam.errors import InvalidPoseError
from mam.pose.base import PoseSequence
from mam.pose.representation import canonical, image_plane, model_input
from mam.synth.motion import simulate_infant


def _seq(joints, image=None, source="precomputed"):
    meta = {} if image is None else {"image_joints": image}
    return PoseSequence(joints, np.ones(joints.shape[:2], np.float32), source=source, meta=meta)


@pytest.fixture(scope="module")
def sim():
    return simulate_infant(np.random.default_rng(0), "r", "continuous", 12.0).clean_joints


def test_in_plane_roll_scale_and_offset_are_taken_out(sim):
    a = np.deg2rad(137.0)
    roll = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    moved = (sim @ roll.T) * 1000.0 + np.array([5.0, -3.0, 2.0])  # millimetres, elsewhere
    for rep in ("world3d", "image2d"):
        x, y = model_input(_seq(sim), rep), model_input(_seq(moved), rep)
        np.testing.assert_allclose(x, y, atol=1e-4)
        trunk = np.linalg.norm(x[:, 8] - x[:, 0], axis=-1)
        assert np.median(trunk) == pytest.approx(1.0)
        assert np.nanmean(x[:, 8, 1]) < -0.9  # trunk points to image up
    assert np.all(model_input(_seq(sim), "image2d")[..., 2] == 0)


def test_image2d_takes_the_backends_image_joints_where_there_are_some(sim):
    image = sim[..., :2] * 400.0 + 300.0  # pixels
    image[:, 13] += 7.0  # the 2D estimate differs from the 3D one
    with_image = model_input(_seq(sim, image, source="onnx"), "image2d")
    without = model_input(_seq(sim), "image2d")
    assert not np.allclose(with_image, without)
    np.testing.assert_allclose(image_plane(_seq(sim, image))[:, 0], image[:, 0])


def test_untracked_frames_stay_untracked_and_a_pointlike_skeleton_is_refused(sim):
    j = sim.copy()
    j[10:20] = np.nan
    x = model_input(_seq(j), "image2d")
    assert np.isnan(x[10:20]).all() and np.isfinite(x[:10]).all()
    with pytest.raises(InvalidPoseError, match="extent"):
        canonical(np.zeros((50, 17, 3)))


def test_lifted_gives_depth_from_2d(sim):
    pytest.importorskip("onnxruntime")
    x = model_input(_seq(sim), "lifted")
    assert x.shape == sim.shape and np.isfinite(x).all()
    assert np.std(x[..., 2]) > 0.05  # the lifter adds depth the image plane lacks
