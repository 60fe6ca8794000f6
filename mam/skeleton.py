"""The 17-joint Human3.6M skeleton that MAM's inputs are built on (paper, Methods; DESIGN.md)."""

from __future__ import annotations

FPS = 25.0
"""Every pose sequence inside the pipeline is at this rate (paper: videos resampled to 25 fps)."""

JOINT_NAMES: tuple[str, ...] = (
    "pelvis",
    "right_hip",
    "right_knee",
    "right_ankle",
    "left_hip",
    "left_knee",
    "left_ankle",
    "spine",
    "thorax",
    "neck_nose",
    "head",
    "left_shoulder",
    "left_elbow",
    "left_wrist",
    "right_shoulder",
    "right_elbow",
    "right_wrist",
)
NUM_JOINTS = len(JOINT_NAMES)
JOINT_INDEX = {name: i for i, name in enumerate(JOINT_NAMES)}

# Parent of each joint in the kinematic tree (pelvis is the root); used to draw and to simulate.
PARENTS: tuple[int, ...] = (-1, 0, 1, 2, 0, 4, 5, 0, 7, 8, 9, 8, 11, 12, 8, 14, 15)
BONES: tuple[tuple[int, int], ...] = tuple((p, c) for c, p in enumerate(PARENTS) if p >= 0)

# Left/right pairs, for mirroring and for repairing left/right swaps of the pose estimator.
LEFT_RIGHT_PAIRS: tuple[tuple[int, int], ...] = (
    (4, 1),
    (5, 2),
    (6, 3),
    (11, 14),
    (12, 15),
    (13, 16),
)
