"""Recordings unlike anything the shipped weights were trained on, to test the domain check.

Each returns 3D joints ``[T, 17, 3]`` in the camera-aligned frame (metres), as a pose file or as
input to ``mam.synth.render``:

* ``real_only``: real infant motion with no simulated component at all (its FMs truth is unknown,
  so a model trained on simulated movement cannot speak for it);
* ``other_view``: a simulated infant filmed from the side or the feet instead of from above;
* ``jittered``: a simulated infant under heavy per-frame pose noise;
* ``adult_sized``: a simulated infant scaled to adult size.
"""

from __future__ import annotations

import numpy as np

from mam.synth.backgrounds import load_library
from mam.synth.motion import SimParams, _forward_kinematics, simulate_infant


def real_only(
    rng: np.random.Generator, seconds: float = 60.0, pool: str = "external"
) -> np.ndarray:
    """Real motion of one infant's stretch (``mam.synth.backgrounds``) with the simulator's
    infant bone lengths."""
    dirs = load_library(pool).sample(rng, int(round(seconds * 25)))  # type: ignore[arg-type]
    return _forward_kinematics(dirs.astype(np.float64), 1.0).astype(np.float32)


def _sim(rng: np.random.Generator, category: str, seconds: float) -> np.ndarray:
    return simulate_infant(rng, "shifted", category, seconds, SimParams()).clean_joints


def other_view(
    rng: np.random.Generator, category: str = "continuous", seconds: float = 60.0,
    degrees: float = 75.0,
) -> np.ndarray:  # fmt: skip
    """A simulated infant seen with the camera turned ``degrees`` about the image's x axis
    (toward a view from the feet) and as much about y (from the side)."""
    a = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    b = np.deg2rad(degrees / 2)
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    return (_sim(rng, category, seconds) @ (ry @ rx).T).astype(np.float32)


def jittered(
    rng: np.random.Generator, category: str = "continuous", seconds: float = 60.0,
    sigma_m: float = 0.01,
) -> np.ndarray:  # fmt: skip
    """A simulated infant with independent Gaussian noise of ``sigma_m`` on every coordinate."""
    j = _sim(rng, category, seconds)
    return (j + rng.normal(0.0, sigma_m, j.shape)).astype(np.float32)


def adult_sized(
    rng: np.random.Generator, category: str = "continuous", seconds: float = 60.0,
    scale: float = 3.3,
) -> np.ndarray:  # fmt: skip
    """A simulated infant scaled ``scale`` times (an adult's trunk is about 3x an infant's)."""
    return (_sim(rng, category, seconds) * scale).astype(np.float32)
