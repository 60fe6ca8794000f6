"""Real infant 3D motion, made ready to render.

Source and credit: the demo tensors published with the reference implementation of the MAM
paper, github.com/qiang-Blazer/MAM, folder ``prepared_data/`` (MIT licence, copyright 2023
qiang-Blazer). ``mam/synth/data/mam_demo_poses.npz``, shipped with the package beside its licence
notice, holds them re-packed as root-relative Human3.6M 17-joint clips (see that folder's README);
``MAM_DEMO_POSES`` names another copy. The poses are in the authors' per-axis
standardised units, so they are rescaled, rotated into a camera-aligned frame and retargeted to
infant bone lengths here before :mod:`mam.synth.render` draws them.

Camera-aligned frame (shared contract with the motion simulator): metres, x = image right,
y = image down, z = away from the camera; the infant lies supine, the camera looks down at it,
its anterior (face, knees) points to -z, its head to image up (-y), its left to image right.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np

from mam.errors import FileNotFoundInputError
from mam.shipped import demo_poses
from mam.skeleton import BONES, NUM_JOINTS, PARENTS

CLIP_LEN = 240
CLIP_STRIDE = 60
OVERLAP = CLIP_LEN - CLIP_STRIDE  # 180 frames shared by consecutive clips of a bag
AXIS_SCALE = np.array([1.0, 0.83, 1.48])
"""Undoes the per-axis standardisation of the published tensors (minimises bone-length spread)."""

DEMO_GROUP = "group:prepared_data/Data_derivation/FM-/0005"
"""The one fully continuous bag: 32 clips, 84 s."""

_BONE_CM = {
    (0, 1): 3.8,  # pelvis - right hip
    (1, 2): 10.5,  # thigh
    (2, 3): 10.0,  # shin
    (0, 4): 3.8,
    (4, 5): 10.5,
    (5, 6): 10.0,
    (0, 7): 9.0,  # pelvis - spine
    (7, 8): 9.0,  # spine - thorax
    (8, 9): 6.5,  # thorax - nose
    (9, 10): 8.0,  # nose - head
    (8, 11): 6.5,  # shoulder offset
    (11, 12): 8.5,  # upper arm
    (12, 13): 7.5,  # forearm
    (8, 14): 6.5,
    (14, 15): 8.5,
    (15, 16): 7.5,
}
INFANT_BONES_M: dict[tuple[int, int], float] = {b: cm / 100.0 for b, cm in _BONE_CM.items()}
"""Bone (parent, child) -> length in metres, for a young infant (pelvis to head about 0.3 m)."""
assert set(INFANT_BONES_M) == set(BONES)


def default_data_path() -> str:
    """``$MAM_DEMO_POSES``, else the copy shipped with the package (``mam.shipped``)."""
    from mam.settings import current

    return str(current().demo_poses or demo_poses())


def load_clips(npz_path: str | os.PathLike) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Return ``(clips, groups)``: clips float32 ``[N, 240, 17, 3]`` (root-relative, authors'
    units) and ``{"group:<folder>": int32 clip ids in file order}``.

    Raises:
        FileNotFoundInputError: no file at ``npz_path`` (e.g. ``MAM_DEMO_POSES`` names none).
    """
    if not Path(npz_path).is_file():
        raise FileNotFoundInputError(
            f"expected the real infant motion (mam_demo_poses.npz) at {os.fspath(npz_path)}; "
            "there is no such file (set MAM_DEMO_POSES to a copy, or unset it for the shipped one)"
        )
    with np.load(npz_path) as data:
        clips = data["clips"].astype(np.float32)
        groups = {k: np.asarray(data[k]) for k in data.files if k.startswith("group:")}
    return clips, groups


def continuous_runs(clips: np.ndarray, ids: np.ndarray, tol: float = 1e-3) -> list[list[int]]:
    """Split a bag's clip ids into runs whose consecutive clips really overlap by 180 frames."""
    runs: list[list[int]] = [[int(ids[0])]]
    for prev, cur in itertools.pairwise(ids):
        a, b = clips[int(prev)], clips[int(cur)]
        if np.abs(a[CLIP_STRIDE:] - b[:OVERLAP]).max() <= tol:
            runs[-1].append(int(cur))
        else:
            runs.append([int(cur)])
    return runs


def stitch(clips: np.ndarray, run: list[int]) -> np.ndarray:
    """Concatenate a continuous run of overlapping clips into one ``[T, 17, 3]`` sequence."""
    parts = [clips[run[0]]] + [clips[i][OVERLAP:] for i in run[1:]]
    return np.concatenate(parts, axis=0)


def stitch_group(npz_path: str | os.PathLike, group: str = DEMO_GROUP) -> np.ndarray:
    """Stitch the longest continuous run of a bag (verifying each 180-frame overlap).

    ``group`` is a key such as ``"group:prepared_data/Data_derivation/FM-/0005"`` (the prefix
    ``group:`` may be left out). Returns float32 ``[T, 17, 3]`` in the authors' units.
    """
    if not group.startswith("group:"):
        group = "group:" + group
    clips, groups = load_clips(npz_path)
    if group not in groups:
        raise KeyError(f"no group {group!r} in {os.fspath(npz_path)}")
    runs = continuous_runs(clips, groups[group])
    best = max(runs, key=len)
    return stitch(clips, best)


def torso_frame(joints: np.ndarray) -> np.ndarray:
    """Rows (left, up, anterior) of the mean torso frame of a ``[T, 17, 3]`` sequence."""
    j = np.asarray(joints, dtype=np.float64)
    up = (j[:, 8] - j[:, 0]).mean(axis=0)
    left = ((j[:, 11] - j[:, 14]) + (j[:, 4] - j[:, 1])).mean(axis=0)
    up /= np.linalg.norm(up)
    left = left - left.dot(up) * up
    left /= np.linalg.norm(left)
    anterior = np.cross(left, up)
    return np.stack([left, up, anterior])


def to_camera_frame(joints: np.ndarray, axis_scale: np.ndarray | None = AXIS_SCALE) -> np.ndarray:
    """Authors' units -> camera-aligned frame (one rotation per sequence), pelvis at the origin.

    Undoes the per-axis standardisation (``axis_scale``; pass None for data already isotropic),
    then maps the mean torso frame's left -> +x (image right), up -> -y (image up) and
    anterior -> -z (toward the camera). That map is a proper rotation (left x up = anterior and
    +x cross -y = -z), so nothing is mirrored. Lengths stay in the input's units; ``retarget``
    sets metres.
    """
    j = np.asarray(joints, dtype=np.float64)
    if j.ndim != 3 or j.shape[1:] != (NUM_JOINTS, 3):
        raise ValueError(f"joints must be [T, {NUM_JOINTS}, 3], got {j.shape}")
    if axis_scale is not None:
        j = j * np.asarray(axis_scale, dtype=np.float64)
    j = j - j[:, :1]
    left, up, anterior = torso_frame(j)
    rot = np.stack([left, -up, -anterior])  # rows: camera x, y, z expressed in data axes
    return (j @ rot.T).astype(np.float32)


def retarget(
    joints: np.ndarray, bone_lengths: dict[tuple[int, int], float] = INFANT_BONES_M
) -> np.ndarray:
    """Give every bone its length from ``bone_lengths`` keeping its direction in every frame.

    The root (pelvis) keeps its position; output float32 ``[T, 17, 3]`` (metres with the default
    lengths)."""
    j = np.asarray(joints, dtype=np.float64)
    out = np.empty_like(j)
    out[:, 0] = j[:, 0]
    for child, parent in enumerate(PARENTS):  # parents precede children in H36M order
        if parent < 0:
            continue
        d = j[:, child] - j[:, parent]
        n = np.linalg.norm(d, axis=-1, keepdims=True)
        d = np.where(n > 1e-9, d / np.maximum(n, 1e-9), 0.0)
        out[:, child] = out[:, parent] + bone_lengths[(parent, child)] * d
    return out.astype(np.float32)


def load_demo_motion(
    npz_path: str | os.PathLike, group: str = DEMO_GROUP, seconds: float | None = None
) -> np.ndarray:
    """Stitched, camera-aligned, retargeted real motion in metres ``[T, 17, 3]`` at 25 fps,
    cut to the first ``seconds`` if given."""
    seq = retarget(to_camera_frame(stitch_group(npz_path, group)))
    if seconds is not None:
        seq = seq[: round(seconds * 25)]
    return seq
