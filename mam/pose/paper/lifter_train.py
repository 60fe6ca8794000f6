"""Train the VideoPose3D lifter on 3D infant motion seen through random virtual cameras.

The paper ran VideoPose3D trained on adults (Human3.6M) behind an HRNet fine-tuned on infants
(Methods). Infant 3D motion exists here (``shared/data/mam_demo_poses.npz``: 495 clips of 240
frames, root-relative, the authors' normalised units), so the lifter can learn infant proportions
and the supine view directly: each 3D clip is projected to 2D through a random pinhole camera and
the network learns to recover the 3D pose in that camera's frame, with an MPJPE loss (VideoPose3D's
supervised objective).

Choices (the paper is silent on them):

* Units. The shared poses were standardised per axis; DESIGN.md ("Rendering a recording that
  BlazePose tracks") measured that scaling the axes by ``(1, 0.83, 1.48)`` undoes it (bone lengths
  vary least). Projection needs a rigid body, so poses are rescaled so first; targets and MPJPE are
  in these units (the data's normalised units, made isotropic). One unit is about 9 cm on an infant:
  the pelvis-thorax distance, about 18 cm, is about 2 units (``torso_length`` in the sidecar).
* Cameras: above a supine infant. The nominal view looks down the body's anterior axis (the mean
  torso frame of the clip: up = thorax - pelvis, left = shoulders + hips, anterior = left x up),
  then a random roll of 0-360 degrees about the viewing axis (infants lie any way round in the
  frame), a tilt of up to ``max_tilt_deg`` about a random axis in the image plane, a focal length
  giving a 35-85 degree horizontal field of view, a distance that makes the body span a random share
  of the image width, and a small off-centre shift. 2D is in VideoPose3D's screen coordinates
  (x in [-1, 1]); outputs are camera-frame 3D (x right, y down, z away from the camera),
  root-relative, as VideoPose3D predicts them and as the MediaPipe backend reports world landmarks.
* Augmentation: Gaussian noise on the 2D input (``noise``, screen units: 0.01 is a quarter of a
  heatmap pixel of HRNet's 48-wide heatmap for a whole-frame box) and a horizontal flip (mirror x,
  swap left and right joints), as VideoPose3D does.
* Held-out clips are split by infant group: the npz lists each published folder's clip ids
  (``group:<folder>``) and reuses clips across folders, so the held-out infants are chosen among
  groups that share no clip with any other, and every held-out clip id is removed from training.
* Baselines measured in the same run on the same held-out inputs: the untrained lifter (same
  architecture, its random initialisation); the mean pose (the mean camera-frame training target,
  predicted for every frame); and the flat 2D pose (the root-relative 2D input with zero depth,
  scaled per clip by the least-squares scale onto the true x, y: an oracle scale, so generous).

Run::

    mam train-lifter --data ../shared/data/mam_demo_poses.npz \\
        --out models/lifter_infant.pt --channels 256 --minutes 12 --threads 1
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from mam.files import write_atomic
from mam.model.weights import sha256_of
from mam.pose.paper.videopose3d import TemporalModel, normalize_2d, pad_edges
from mam.skeleton import JOINT_INDEX, JOINT_NAMES, LEFT_RIGHT_PAIRS, NUM_JOINTS

logger = logging.getLogger(__name__)

SIDECAR_FORMAT = 1
AXIS_SCALE = (1.0, 0.83, 1.48)
"""Per-axis factors that make the shared poses isotropic (DESIGN.md, measured on bone lengths)."""
_J = JOINT_INDEX


# -- data and split -------------------------------------------------------------------------------
def load_motion(npz: str | Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Clips ``[N, T, 17, 3]`` float32 (rescaled by :data:`AXIS_SCALE`), ``{group: clip ids}``."""
    with np.load(npz) as d:
        if "clips" not in d.files:
            raise ValueError(f"{npz} has no 'clips' array")
        clips = d["clips"].astype(np.float32)
        groups = {k.removeprefix("group:"): d[k].astype(np.int64) for k in d.files
                  if k.startswith("group:")}  # fmt: skip
    if clips.ndim != 4 or clips.shape[2:] != (NUM_JOINTS, 3):
        raise ValueError(f"clips must be [N, T, {NUM_JOINTS}, 3], got {clips.shape}")
    clips = clips - clips[:, :, :1]
    return clips * np.array(AXIS_SCALE, np.float32), groups


@dataclass
class Split:
    train: np.ndarray
    heldout: np.ndarray
    heldout_groups: list[str]


def split_by_group(
    groups: dict[str, np.ndarray],
    num_clips: int,
    *,
    heldout_groups: list[str] | None = None,
    num_heldout: int = 2,
    seed: int = 0,
) -> Split:
    """Held-out clips are all clips of the held-out groups (infants); training gets every other
    clip. By default ``num_heldout`` groups are drawn (seeded) among those sharing no clip id with
    any other group, so no held-out infant's motion reaches training through a reused clip."""
    if not groups:
        raise ValueError("the data lists no groups (group:<folder> keys); cannot split by infant")
    if heldout_groups is None:
        independent = []
        for name, ids in groups.items():
            others = set().union(*(set(v.tolist()) for k, v in groups.items() if k != name))
            if not others & set(ids.tolist()):
                independent.append(name)
        if len(independent) < num_heldout:
            raise ValueError(f"only {len(independent)} groups share no clips; need {num_heldout}")
        rng = np.random.default_rng(seed)
        heldout_groups = sorted(rng.choice(sorted(independent), num_heldout, replace=False))
    unknown = [g for g in heldout_groups if g not in groups]
    if unknown:
        raise ValueError(f"unknown groups {unknown}")
    heldout = np.unique(np.concatenate([groups[g] for g in heldout_groups]))
    train = np.setdiff1d(np.arange(num_clips), heldout)
    assert not np.intersect1d(train, heldout).size
    return Split(train, heldout, list(heldout_groups))


# -- random cameras -------------------------------------------------------------------------------
@dataclass
class CameraConfig:
    """Ranges of the random pinhole cameras (see the module docstring)."""

    max_tilt_deg: float = 25.0
    fov_deg: tuple[float, float] = (35.0, 85.0)
    body_span: tuple[float, float] = (0.6, 1.4)  # body length / half image width (screen units)
    max_shift: float = 0.15  # root off the optical axis, screen units


def nominal_view(clips: np.ndarray) -> np.ndarray:
    """Rotation ``[N, 3, 3]`` (rows: camera x right, y down, z forward) looking down each clip's
    mean anterior axis with the head at the top of the image and the infant's left on the right."""
    up = (clips[:, :, _J["thorax"]] - clips[:, :, _J["pelvis"]]).mean(1)
    left = (clips[:, :, _J["left_shoulder"]] - clips[:, :, _J["right_shoulder"]]
            + clips[:, :, _J["left_hip"]] - clips[:, :, _J["right_hip"]]).mean(1)  # fmt: skip
    up /= np.linalg.norm(up, axis=-1, keepdims=True)
    left -= (left * up).sum(-1, keepdims=True) * up
    left /= np.linalg.norm(left, axis=-1, keepdims=True)
    anterior = np.cross(left, up)
    return np.stack([left, -up, -anterior], axis=1)  # x = left, y = -up, z = -anterior


def _axis_angle(axis: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """Rodrigues: rotations ``[N, 3, 3]`` about unit ``axis`` ``[N, 3]`` by ``angle`` ``[N]``."""
    x, y, z = axis.T
    zero = np.zeros_like(x)
    K = np.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).reshape(-1, 3, 3)
    s, c = np.sin(angle)[:, None, None], np.cos(angle)[:, None, None]
    return np.eye(3) + s * K + (1 - c) * K @ K


def project_clips(
    clips: np.ndarray, rng: np.random.Generator, cam: CameraConfig, *, flip: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Random cameras -> (2D screen coordinates ``[N, T, 17, 2]``, camera-frame root-relative 3D
    ``[N, T, 17, 3]``), float32. ``flip`` mirrors a random half of the clips (x and left/right)."""
    N = len(clips)
    roll = rng.uniform(0, 2 * math.pi, N)
    tilt_dir = rng.uniform(0, 2 * math.pi, N)
    tilt_axis = np.stack([np.cos(tilt_dir), np.sin(tilt_dir), np.zeros(N)], -1)
    tilt = np.deg2rad(rng.uniform(0, cam.max_tilt_deg, N))
    R = (_axis_angle(np.tile([0.0, 0.0, 1.0], (N, 1)), roll) @ _axis_angle(tilt_axis, tilt)
         @ nominal_view(clips))  # fmt: skip
    X = np.einsum("nij,ntkj->ntki", R, clips)  # camera-frame, root-relative
    if flip:
        mirror = rng.random(N) < 0.5
        X[mirror, ..., 0] *= -1
        swap = list(range(NUM_JOINTS))
        for left, right in LEFT_RIGHT_PAIRS:
            swap[left], swap[right] = right, left
        X[mirror] = X[mirror][:, :, swap]
    fov = np.deg2rad(rng.uniform(*cam.fov_deg, N))
    focal = 1.0 / np.tan(fov / 2)  # screen units: x = focal * X / Z spans [-1, 1]
    length = np.linalg.norm(X[:, :, _J["head"]] - (X[:, :, _J["left_ankle"]]
                            + X[:, :, _J["right_ankle"]]) / 2, axis=-1).mean(1)  # fmt: skip
    span = rng.uniform(*cam.body_span, N)
    depth = focal * length / span
    shift = rng.uniform(-cam.max_shift, cam.max_shift, (N, 2)) * depth[:, None] / focal[:, None]
    P = X + np.concatenate([shift, depth[:, None]], -1)[:, None, None, :]
    uv = focal[:, None, None, None] * P[..., :2] / P[..., 2:3]
    return uv.astype(np.float32), X.astype(np.float32)


# -- metrics --------------------------------------------------------------------------------------
def mpjpe(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean per-joint position error (Euclidean), over frames and joints, in the input's units."""
    return float(np.linalg.norm(pred - target, axis=-1).mean())


def n_mpjpe(pred: np.ndarray, target: np.ndarray) -> float:
    """MPJPE after the best per-frame scale of the prediction (VideoPose3D's N-MPJPE)."""
    num = (pred * target).sum(axis=(-1, -2), keepdims=True)
    den = (pred * pred).sum(axis=(-1, -2), keepdims=True)
    return mpjpe(pred * num / np.maximum(den, 1e-12), target)


def flat_2d_baseline(uv: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 2D input as 3D with zero depth, root-relative, scaled per clip by the least-squares
    scale onto the target's x, y (an oracle the lifter does not get): ``[N, T, 17, 3]``."""
    xy = uv - uv[:, :, :1]
    t = target[..., :2]
    scale = (xy * t).sum(axis=(1, 2, 3)) / np.maximum((xy * xy).sum(axis=(1, 2, 3)), 1e-12)
    flat = np.zeros(target.shape, np.float32)
    flat[..., :2] = xy * scale[:, None, None, None]
    return flat


def predict(model: TemporalModel, inputs: np.ndarray, batch: int = 16) -> np.ndarray:
    """Lift clips ``[N, T, 17, 2]`` with edge padding -> ``[N, T, 17, 3]``, root at 0."""
    model.eval()
    rf = model.receptive_field()
    out = []
    with torch.inference_mode():
        for i in range(0, len(inputs), batch):
            x = np.stack([pad_edges(normalize_2d(c), rf) for c in inputs[i : i + batch]])
            out.append(model(torch.from_numpy(x)).numpy())
    pred = np.concatenate(out)
    return pred - pred[:, :, :1]


def heldout_inputs(clips: np.ndarray, seed: int, cam: CameraConfig, noise: float):
    """Fixed cameras (seeded) for the held-out clips: (clean 2D, noisy 2D, 3D targets)."""
    rng = np.random.default_rng(seed + 10_000)
    uv, X = project_clips(clips, rng, cam)
    noisy = uv + rng.normal(0, noise, uv.shape).astype(np.float32) if noise > 0 else uv
    return uv, noisy, X


def evaluate_lifter(
    model: TemporalModel,
    clips: np.ndarray,
    split: Split,
    cfg: LifterConfig,
    *,
    untrained: TemporalModel | None = None,
) -> dict:
    """Held-out MPJPE of ``model`` and of the baselines, on the held-out clips of ``split`` seen
    through cameras drawn from ``cfg.seed`` (the same inputs on every call with that seed)."""
    train_clips, test_clips = clips[split.train], clips[split.heldout]
    clean, noisy, target = heldout_inputs(test_clips, cfg.seed, cfg.camera, cfg.noise)
    # the mean pose of the training targets, under the training camera distribution
    mean_rng = np.random.default_rng(cfg.seed + 20_000)
    mean_pose = project_clips(train_clips, mean_rng, cfg.camera)[1].mean(axis=(0, 1))
    pred = predict(model, clean)
    torso = np.linalg.norm(test_clips[:, :, _J["thorax"]] - test_clips[:, :, _J["pelvis"]], axis=-1)
    metrics = {
        "heldout_mpjpe": mpjpe(pred, target),
        "heldout_mpjpe_noisy_2d": mpjpe(predict(model, noisy), target),
        "heldout_n_mpjpe": n_mpjpe(pred, target),
        "mean_pose_mpjpe": mpjpe(np.broadcast_to(mean_pose, target.shape), target),
        "flat_2d_mpjpe": mpjpe(flat_2d_baseline(clean, target), target),
        "torso_length": float(torso.mean()),
        "heldout_clips": int(len(split.heldout)),
        "train_clips": int(len(split.train)),
    }
    if untrained is not None:
        metrics["untrained_mpjpe"] = mpjpe(predict(untrained, clean), target)
    return metrics


# -- training -------------------------------------------------------------------------------------
@dataclass
class LifterConfig:
    """Hyper-parameters of :func:`train_lifter` (all recorded in the sidecar); named apart
    from :class:`mam.training.train.TrainConfig`, the screening model's."""

    channels: int = 256
    filter_widths: tuple[int, ...] = (3, 3, 3, 3, 3)
    dropout: float = 0.25
    epochs: int = 1000  # upper bound; ``minutes`` usually ends training first
    minutes: float = 6.0
    batch_size: int = 8
    lr: float = 1e-3
    lr_decay: float = 0.95  # per epoch, VideoPose3D's default
    noise: float = 0.01
    flip: bool = True
    num_heldout: int = 2
    heldout_groups: list[str] | None = None
    seed: int = 0
    threads: int | None = None
    camera: CameraConfig = field(default_factory=CameraConfig)


@dataclass
class TrainResult:
    model: TemporalModel
    metrics: dict
    split: Split
    history: list[dict]


def train_lifter(npz: str | Path, cfg: LifterConfig) -> TrainResult:
    """Train on the training clips, then measure held-out MPJPE of the lifter, of the untrained
    lifter and of the mean pose, all on the same held-out inputs."""
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(npz, cfg)
    finally:
        torch.set_num_threads(threads)


def _train(npz: str | Path, cfg: LifterConfig) -> TrainResult:
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    clips, groups = load_motion(npz)
    split = split_by_group(groups, len(clips), heldout_groups=cfg.heldout_groups,
                           num_heldout=cfg.num_heldout, seed=cfg.seed)  # fmt: skip
    train_clips = clips[split.train]
    model = TemporalModel(filter_widths=cfg.filter_widths, dropout=cfg.dropout,
                          channels=cfg.channels)  # fmt: skip
    untrained = TemporalModel(**model.config)
    untrained.load_state_dict(model.state_dict())
    rf = model.receptive_field()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, amsgrad=True)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, cfg.lr_decay)
    history: list[dict] = []
    deadline = time.perf_counter() + cfg.minutes * 60
    start = time.perf_counter()
    steps = 0
    for epoch in range(cfg.epochs):
        model.train()
        # VideoPose3D decays BatchNorm momentum from 0.1 towards 0.001 over training
        progress = max(epoch / cfg.epochs, (time.perf_counter() - start) / (cfg.minutes * 60))
        model.set_bn_momentum(0.1 * math.exp(-min(progress, 1.0) * math.log(100)))
        order = rng.permutation(len(train_clips))
        losses = []
        for i in range(0, len(order), cfg.batch_size):
            uv, X = project_clips(train_clips[order[i : i + cfg.batch_size]], rng, cfg.camera,
                                  flip=cfg.flip)  # fmt: skip
            if cfg.noise > 0:
                uv = uv + rng.normal(0, cfg.noise, uv.shape).astype(np.float32)
            x = torch.from_numpy(np.stack([pad_edges(normalize_2d(c), rf) for c in uv]))
            pred = model(x)
            pred = pred - pred[:, :, :1]
            loss = torch.linalg.vector_norm(pred - torch.from_numpy(X), dim=-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            steps += 1
            if time.perf_counter() > deadline:
                break
        sched.step()
        history.append({"epoch": epoch + 1, "train_mpjpe": float(np.mean(losses)),
                        "seconds": round(time.perf_counter() - start, 1)})  # fmt: skip
        logger.info("epoch %d: train MPJPE %.4f", epoch + 1, history[-1]["train_mpjpe"])
        if time.perf_counter() > deadline:
            break
    model.eval()

    metrics = {
        **evaluate_lifter(model, clips, split, cfg, untrained=untrained),
        "epochs": len(history),
        "steps": steps,
        "train_seconds": round(time.perf_counter() - start, 1),
    }
    return TrainResult(model, metrics, split, history)


# -- saving and loading ---------------------------------------------------------------------------
def sidecar_path(weights: str | Path) -> Path:
    return Path(weights).with_suffix(".json")


def save_lifter_weights(model: TemporalModel, out: str | Path, **meta) -> Path:
    """``out`` (the state dict) and its sidecar ``out.json``: the network config, receptive field,
    weights sha256, joint order and axes, plus ``meta`` (data, split, metrics, ...)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    write_atomic(out, buf.getvalue())
    sidecar = {
        "format_version": SIDECAR_FORMAT,
        "name": out.stem,
        "network": "VideoPose3D TemporalModel (mam.pose.paper.videopose3d)",
        "config": model.config,
        "receptive_field": model.receptive_field(),
        "weights_sha256": sha256_of(out),
        "input": {
            "joints": list(JOINT_NAMES),
            "coordinates": "2D screen coordinates (normalize_screen_coordinates), then per "
            "sequence root-relative and divided by the RMS joint-root distance (normalize_2d)",
            "fps": 25.0,
        },
        "output": {
            "joints": list(JOINT_NAMES),
            "axes": "camera frame: x right, y down, z away from the camera; root (pelvis) at 0",
            "units": "the shared data's normalised units with axes rescaled by "
            f"{list(AXIS_SCALE)} (isotropic)",
        },
        **meta,
    }
    write_atomic(sidecar_path(out), (json.dumps(sidecar, indent=2) + "\n").encode())
    return out


def save_lifter(
    result: TrainResult, out: str | Path, npz: str | Path, cfg: LifterConfig, command: str | None
) -> Path:
    """A trained lifter with what it was trained on and how well it lifts held-out clips."""
    m = result.metrics
    return save_lifter_weights(
        result.model,
        out,
        data={"file": Path(npz).name, "sha256": sha256_of(Path(npz))},
        split={
            "by": "infant group (group:<folder>); held-out groups share no clip with any other",
            "heldout_groups": result.split.heldout_groups,
            "heldout_clips": m["heldout_clips"],
            "train_clips": m["train_clips"],
        },
        training={
            **{k: v for k, v in asdict(cfg).items() if k != "threads"},
            "torch": torch.__version__.split("+")[0],
            "command": command,
        },
        metrics={
            **{k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()},
            "units": f"output units; torso (pelvis-thorax) is {m['torso_length']:.2f} of them",
            "how": "held-out clips through seeded random cameras (seed + 10000), clean 2D unless "
            "named noisy; mean_pose: the mean training target predicted for every frame; "
            "flat_2d: the 2D input at zero depth with an oracle per-clip scale; untrained: this "
            "architecture at its initialisation",
        },
        history=result.history,
    )


def load_lifter(weights: str | Path) -> tuple[TemporalModel, dict]:
    """A lifter saved by :func:`save_lifter` (in eval mode) and its sidecar."""
    weights = Path(weights)
    meta = json.loads(sidecar_path(weights).read_text())
    model = TemporalModel(**meta["config"])
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval(), meta
