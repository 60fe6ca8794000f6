"""Which pose coordinates feed the model, in what frame and units.

A pose backend gives two things per frame: 3D "world" joints (BlazePose's metric estimate, whose
depth barely follows infant movement, DESIGN.md) and the 2D image joints. A pose file gives 3D
joints in the camera frame (x right, y down, z away). The weights name one representation:

* ``world3d``: the 3D joints as given (the paper's input, and this project's until 0.2);
* ``image2d``: the image-plane 2D joints with z = 0 (a pose file: its x, y);
* ``lifted``: the 2D joints lifted to 3D by the shipped infant lifter (``models/lifter_infant``).

Whichever it is, the sequence is then made comparable across sources: pelvis-relative, divided
by the recording's median trunk length (pelvis to thorax), and turned in the image plane so that
the mean trunk points up. NOTE: the paper normalises only per axis with dataset statistics; its
videos came from one set-up. Here BlazePose's world scale is adult, a pose file's is the
caller's, pixels depend on the camera, and infants lie at any angle to the image, so scale and
in-plane angle are taken out per recording (the per-axis normalisation still follows, in
``mam.features``). Frames that were not tracked stay NaN.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from mam.errors import InvalidPoseError
from mam.pose.base import PoseSequence
from mam.skeleton import JOINT_INDEX, NUM_JOINTS

Representation = Literal["world3d", "image2d", "lifted"]
REPRESENTATIONS: tuple[str, ...] = ("world3d", "image2d", "lifted")
PELVIS, THORAX = JOINT_INDEX["pelvis"], JOINT_INDEX["thorax"]
MIN_TRUNK = 1e-6  # of the coordinates' own units: below it the skeleton has no extent

_lifter = None


def check_representation(name: str) -> str:
    if name not in REPRESENTATIONS:
        raise ValueError(f"pose representation must be one of {REPRESENTATIONS}, got {name!r}")
    return name


def image_plane(seq: PoseSequence) -> np.ndarray:
    """2D joints ``[T, 17, 2]``: the backend's image joints, or a pose file's x, y."""
    image = seq.meta.get("image_joints")
    if image is None:
        return np.asarray(seq.joints[..., :2], np.float32)
    image = np.asarray(image, np.float32)
    if image.shape != (seq.num_frames, NUM_JOINTS, 2):
        raise ValueError(f"image joints must be [{seq.num_frames}, 17, 2], got {image.shape}")
    tracked = np.isfinite(seq.joints).all(axis=(1, 2))
    return np.where(tracked[:, None, None], image, np.nan).astype(np.float32)


def lift(image: np.ndarray) -> np.ndarray:
    """2D ``[T, 17, 2]`` -> 3D ``[T, 17, 3]`` by the shipped lifter; untracked frames stay NaN
    (they are interpolated for the lifter, which needs a continuous sequence)."""
    global _lifter
    from mam.pose.paper.backend import interpolate_missing, load_lifter_network
    from mam.pose.paper.videopose3d import normalize_2d, pad_edges

    tracked = np.isfinite(image).all(axis=(1, 2))
    out = np.full(image.shape[:2] + (3,), np.nan, np.float32)
    if not tracked.any():
        return out
    if _lifter is None:
        _lifter = load_lifter_network()
    rf = 243
    x = normalize_2d(interpolate_missing(image, tracked))
    lifted = _lifter(pad_edges(x, rf)[None])["joints_3d"][0]
    out[tracked] = (lifted - lifted[:, :1])[tracked]
    return out


def canonical(joints: np.ndarray) -> np.ndarray:
    """Pelvis-relative, in trunk lengths, mean trunk turned to image up (-y) ``[T, 17, 3]``.

    Raises:
        InvalidPoseError: the skeleton has no extent (every joint at one point).
    """
    x = np.asarray(joints, np.float64)
    x = x - x[:, PELVIS : PELVIS + 1]
    trunk = x[:, THORAX]
    length = np.linalg.norm(trunk, axis=-1)
    ok = np.isfinite(length)
    scale = float(np.median(length[ok])) if ok.any() else 0.0
    if not scale > MIN_TRUNK * max(float(np.nanmax(np.abs(x))) if ok.any() else 0.0, 1.0):
        raise InvalidPoseError(
            "expected a skeleton with extent; received joints that all lie at one point "
            "(trunk length 0)"
        )
    x = x / scale
    up = np.nanmean(trunk[ok, :2], axis=0)
    angle = np.arctan2(up[0], -up[1])  # angle of the trunk from image up, clockwise
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, s], [-s, c]])  # turns the mean trunk onto (0, -1)
    x[..., :2] = x[..., :2] @ rot.T
    return x.astype(np.float32)


def raw_trunk_length(joints: np.ndarray) -> float:
    """Median pelvis-thorax distance in the pose's own units (0 when nothing was tracked)."""
    d = np.linalg.norm(np.asarray(joints, np.float64)[:, THORAX] - joints[:, PELVIS], axis=-1)
    d = d[np.isfinite(d)]
    return float(np.median(d)) if d.size else 0.0


def model_input(seq: PoseSequence, representation: str) -> np.ndarray:
    """The coordinates the model sees ``[T, 17, 3]`` (module docstring)."""
    check_representation(representation)
    if representation == "world3d":
        x = np.asarray(seq.joints, np.float32)
    else:
        xy = image_plane(seq)
        if representation == "lifted":
            x = lift(xy)
        else:
            x = np.concatenate([xy, np.zeros(xy.shape[:2] + (1,), np.float32)], axis=-1)
            x[~np.isfinite(xy).all(axis=-1)] = np.nan
    return canonical(x)
