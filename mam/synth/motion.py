"""A simulator of supine infant movement with known ground truth.

THIS IS A SIMULATION, NOT PHYSIOLOGY. It exists so that learning can be tested on data whose truth
is known; nothing learned from it carries clinical meaning.

What it models, loosely after Prechtl's description of fidgety movements (FMs): "an ongoing
stream of small movements of moderate speed and variable acceleration of neck, trunk and limbs in
all directions". An infant is a 17-joint Human3.6M skeleton with infant bone lengths (cm, from
DESIGN.md), lying supine, seen from above. Every bone's direction is its rest direction plus a
perturbation summed from three sources:

* FMs: band-limited noise (about 0.8-3 Hz), small amplitude (a few degrees, i.e. millimetres at
  the hands and feet), on all bones at once, with a slowly varying envelope (variable
  acceleration); present only inside the infant's FMs intervals;
* other movement: slow large writhing-like excursions (0.1-0.6 Hz) and brief fast kicks and
  swipes, present all the time and in both groups, so that motion energy alone does not tell
  the groups apart;
* observation: random body size, in-plane camera rotation (head toward the top of the image, as
  GMA recording standards ask, within +-20 degrees) and tilt, per-joint jitter (larger in
  depth, as a monocular pose estimator has) and tracking dropouts (NaN frames).

The share of time with FMs sets the category (continuous > intermittent > sporadic > absent);
normal = continuous or intermittent, risk = sporadic or absent (the paper's grouping).
Output poses are metres in the camera frame (x image right, y image down, z away from the
camera), the convention of ``mam.synth.render`` and of BlazePose world landmarks.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

import numpy as np

from mam.gma import FMS_CATEGORIES, GROUP_OF, FmsCategory
from mam.skeleton import FPS, NUM_JOINTS, PARENTS

if TYPE_CHECKING:
    from mam.synth.backgrounds import BackgroundLibrary

Category = FmsCategory
CATEGORIES = FMS_CATEGORIES  # in rotation when a dataset is written, so every group is present

# Rest pose of a supine infant seen from above: per joint, (bone length m, direction from parent).
# Left (the infant's) is image right (+x); anterior is toward the camera (-z).
_REST: dict[int, tuple[float, tuple[float, float, float]]] = {
    1: (0.038, (-1.0, 0.0, 0.0)),  # right hip
    2: (0.105, (-0.35, 0.55, -0.75)),  # right knee: hips flexed, thighs up toward the camera
    3: (0.100, (-0.05, 0.9, 0.45)),  # right ankle
    4: (0.038, (1.0, 0.0, 0.0)),
    5: (0.105, (0.35, 0.55, -0.75)),
    6: (0.100, (0.05, 0.9, 0.45)),
    7: (0.090, (0.0, -1.0, 0.0)),  # spine
    8: (0.090, (0.0, -1.0, 0.0)),  # thorax
    9: (0.065, (0.0, -0.8, -0.6)),  # neck/nose
    10: (0.080, (0.0, -0.75, 0.65)),  # head top
    11: (0.065, (1.0, 0.0, 0.0)),  # left shoulder
    12: (0.085, (0.6, 0.45, -0.65)),  # left elbow
    13: (0.075, (0.15, -0.55, -0.8)),  # left wrist
    14: (0.065, (-1.0, 0.0, 0.0)),
    15: (0.085, (-0.6, 0.45, -0.65)),
    16: (0.075, (-0.15, -0.55, -0.8)),
}
_LIMB_BONES = (2, 3, 5, 6, 12, 13, 15, 16)
_AXIAL_BONES = (7, 8, 9, 10)


@dataclass(frozen=True)
class SimParams:
    """Ranges the simulator draws from, per infant. ``widened()`` gives an external-set variant."""

    body_scale: tuple[float, float] = (0.85, 1.15)
    fms_amplitude_rad: tuple[float, float] = (0.025, 0.055)
    fms_band_hz: tuple[float, float] = (0.8, 3.0)
    writhing_amplitude_rad: tuple[float, float] = (0.08, 0.2)
    writhing_band_hz: tuple[float, float] = (0.1, 0.8)
    kicks_per_min: tuple[float, float] = (6.0, 20.0)
    kick_amplitude_rad: tuple[float, float] = (0.15, 0.4)
    jitter_m: tuple[float, float] = (0.0003, 0.0012)
    depth_jitter_factor: float = 2.5
    camera_roll_deg: float = 20.0
    camera_tilt_deg: float = 10.0
    dropouts_per_min: tuple[float, float] = (0.0, 2.0)
    fms_share: dict[str, tuple[float, float]] = field(
        default_factory=lambda: {
            "continuous": (0.8, 0.95),
            "intermittent": (0.45, 0.7),
            "sporadic": (0.05, 0.2),
            "absent": (0.0, 0.0),
        }
    )

    def widened(self) -> SimParams:
        """Wider ranges for an external test set (a shifted simulator, unlike any training data)."""
        return replace(
            self,
            body_scale=(0.75, 1.3),
            fms_amplitude_rad=(0.02, 0.06),
            fms_band_hz=(0.7, 3.5),
            writhing_amplitude_rad=(0.06, 0.25),
            kicks_per_min=(3.0, 25.0),
            jitter_m=(0.0003, 0.002),
            dropouts_per_min=(0.0, 4.0),
            camera_roll_deg=35.0,
            camera_tilt_deg=15.0,
        )


@dataclass
class SimulatedInfant:
    """One simulated recording with its ground truth."""

    infant_id: str
    joints: np.ndarray  # [T, 17, 3] metres, observed: jitter + NaN dropouts
    clean_joints: np.ndarray  # [T, 17, 3] before observation noise, camera frame
    fms_mask: np.ndarray  # [T] bool, truth per frame
    category: Category
    sex: Literal["male", "female"]
    gestational_age_weeks: float
    birth_weight_g: float
    corrected_age_weeks: float
    fps: float = FPS

    @property
    def group(self) -> str:
        return GROUP_OF[self.category]

    @property
    def fms_intervals_s(self) -> list[tuple[float, float]]:
        return mask_to_intervals(self.fms_mask, self.fps)


def mask_to_intervals(mask: np.ndarray, fps: float = FPS) -> list[tuple[float, float]]:
    """Runs of True as ``(start_s, end_s)``."""
    m = np.concatenate([[False], np.asarray(mask, bool), [False]])
    edges = np.flatnonzero(np.diff(m.astype(np.int8)))
    return [(s / fps, e / fps) for s, e in zip(edges[::2], edges[1::2])]


def band_noise(rng: np.random.Generator, n: int, dims: int, lo: float, hi: float, fps: float):
    """Gaussian noise ``[n, dims]`` band-limited to [lo, hi] Hz, unit std per column."""
    spec = rng.normal(size=(n // 2 + 1, dims)) + 1j * rng.normal(size=(n // 2 + 1, dims))
    freqs = np.fft.rfftfreq(n, 1 / fps)
    spec[(freqs < lo) | (freqs > hi)] = 0
    x = np.fft.irfft(spec, n=n, axis=0)
    return x / (x.std(axis=0, keepdims=True) + 1e-12)


def _fms_mask(rng: np.random.Generator, n: int, share: float, fps: float) -> np.ndarray:
    """Alternating bouts so that exactly ``share`` of ``n`` frames hold FMs; frequent FMs come in
    few long bouts, sporadic FMs in brief ones (a bout every 20-40 s on average)."""
    mask = np.zeros(n, bool)
    on_total = int(round(share * n))
    if on_total <= 0:
        return mask
    k = max(1, int(round(n / fps / rng.uniform(20, 40))))
    on = np.floor(rng.dirichlet(np.ones(k)) * on_total).astype(int)
    off = np.floor(rng.dirichlet(np.ones(k + 1)) * (n - on_total)).astype(int)
    t = 0
    for i in range(k):
        t += off[i]
        mask[t : t + on[i]] = True
        t += on[i]
    return mask


def _rotation(roll: float, tilt_x: float, tilt_y: float) -> np.ndarray:
    cz, sz = np.cos(roll), np.sin(roll)
    cx, sx = np.cos(tilt_x), np.sin(tilt_x)
    cy, sy = np.cos(tilt_y), np.sin(tilt_y)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    return rz @ rx @ ry


def _uniform(rng: np.random.Generator, r: tuple[float, float]) -> float:
    return float(rng.uniform(*r))


def _forward_kinematics(dirs: np.ndarray, scale: float) -> np.ndarray:
    """Bone directions ``[T, 17, 3]`` (index = child joint) -> positions ``[T, 17, 3]``."""
    pos = np.zeros_like(dirs)
    for j in range(1, NUM_JOINTS):
        length = _REST[j][0] * scale
        d = dirs[:, j] / np.linalg.norm(dirs[:, j], axis=-1, keepdims=True)
        pos[:, j] = pos[:, PARENTS[j]] + length * d
    return pos


def simulate_motion(
    rng: np.random.Generator,
    fms_mask: np.ndarray,
    params: SimParams = SimParams(),
    fps: float = FPS,
    background: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Clean and observed ``[T, 17, 3]`` metres for a given per-frame FMs truth.

    ``background``: per-frame unit bone directions ``[T, 17, 3]`` of real motion
    (``mam.synth.backgrounds``) that replace the fixed rest pose; the simulated components are
    added on top of it all the same, so every recording carries the simulated movement."""
    n = len(fms_mask)
    rest = np.zeros((NUM_JOINTS, 3))
    for j, (_, d) in _REST.items():
        rest[j] = np.asarray(d) / np.linalg.norm(d)
    if background is not None:
        if background.shape != (n, NUM_JOINTS, 3):
            raise ValueError(f"background must be [{n}, {NUM_JOINTS}, 3], got {background.shape}")
        rest = np.asarray(background, np.float64)
    pert = np.zeros((n, NUM_JOINTS, 3))

    # Other movement, in both groups: slow writhing on limbs, smaller on the trunk and head.
    lo, hi = params.writhing_band_hz
    amp = _uniform(rng, params.writhing_amplitude_rad)
    writhe = band_noise(rng, n, NUM_JOINTS * 3, lo, hi, fps).reshape(n, NUM_JOINTS, 3)
    weight = np.full(NUM_JOINTS, 0.0)
    weight[list(_LIMB_BONES)] = 1.0
    weight[list(_AXIAL_BONES)] = 0.3
    pert += amp * writhe * weight[None, :, None]

    # Brief fast kicks and swipes (0.3-0.8 s, one limb chain at a time).
    n_kicks = rng.poisson(_uniform(rng, params.kicks_per_min) * n / fps / 60)
    chains = ((2, 3), (5, 6), (12, 13), (15, 16))
    for _ in range(n_kicks):
        length = int(rng.uniform(0.3, 0.8) * fps)
        start = int(rng.integers(0, max(1, n - length)))
        shape = np.sin(np.linspace(0, np.pi, length))[:, None]
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        a = _uniform(rng, params.kick_amplitude_rad)
        for b in chains[rng.integers(len(chains))]:
            pert[start : start + length, b] += a * shape * direction

    # FMs: small, moderate-speed, variable-acceleration movement of all bones, in all directions.
    lo, hi = params.fms_band_hz
    fms = band_noise(rng, n, NUM_JOINTS * 3, lo, hi, fps).reshape(n, NUM_JOINTS, 3)
    envelope = 0.6 + 0.4 * np.abs(band_noise(rng, n, NUM_JOINTS, 0.05, 0.4, fps))
    on = np.convolve(fms_mask.astype(float), np.ones(int(fps // 2)) / int(fps // 2), "same")
    fms_amp = _uniform(rng, params.fms_amplitude_rad)
    bone_gain = np.ones(NUM_JOINTS)
    bone_gain[list(_AXIAL_BONES)] = 0.6
    pert += fms_amp * fms * (envelope * bone_gain)[..., None] * on[:, None, None]

    dirs = (rest if rest.ndim == 3 else rest[None]) + pert
    scale = _uniform(rng, params.body_scale)
    clean = _forward_kinematics(dirs, scale)

    rot = _rotation(
        np.deg2rad(rng.uniform(-params.camera_roll_deg, params.camera_roll_deg)),
        np.deg2rad(rng.uniform(-params.camera_tilt_deg, params.camera_tilt_deg)),
        np.deg2rad(rng.uniform(-params.camera_tilt_deg, params.camera_tilt_deg)),
    )
    clean = clean @ rot.T

    jitter = _uniform(rng, params.jitter_m)
    noise = rng.normal(scale=jitter, size=clean.shape)
    noise[..., 2] *= params.depth_jitter_factor
    observed = clean + noise
    observed -= observed[:, :1]  # pelvis-relative, as BlazePose world landmarks are
    n_drop = rng.poisson(_uniform(rng, params.dropouts_per_min) * n / fps / 60)
    for _ in range(n_drop):
        length = int(rng.integers(1, int(fps)))
        start = int(rng.integers(0, max(1, n - length)))
        observed[start : start + length] = np.nan
    return clean.astype(np.float32), observed.astype(np.float32)


def simulate_infant(
    rng: np.random.Generator,
    infant_id: str,
    category: Category,
    duration_s: float = 120.0,
    params: SimParams = SimParams(),
    fps: float = FPS,
    background: BackgroundLibrary | None = None,
) -> SimulatedInfant:
    """One infant's recording; infant data weakly depend on the group (risk: more preterm).
    With ``background`` the movement is real infant motion from that library plus the
    simulated components (``simulate_motion``)."""
    n = int(round(duration_s * fps))
    share = _uniform(rng, params.fms_share[category])
    mask = _fms_mask(rng, n, share, fps)
    dirs = background.sample(rng, n) if background is not None else None
    clean, observed = simulate_motion(rng, mask, params, fps, dirs)
    risk = GROUP_OF[category] == "risk"
    ga = float(np.clip(rng.normal(33.0 if risk else 36.5, 3.5), 24.0, 42.0))
    bw = float(np.clip(np.exp(rng.normal(np.log(3400 * (ga / 40) ** 3), 0.15)), 450, 5000))
    return SimulatedInfant(
        infant_id=infant_id,
        joints=observed,
        clean_joints=clean,
        fms_mask=mask,
        category=category,
        sex="male" if rng.random() < 0.5 else "female",
        gestational_age_weeks=round(ga, 1),
        birth_weight_g=round(bw),
        corrected_age_weeks=round(float(rng.uniform(9.0, 20.0)), 1),
        fps=fps,
    )
