"""What the weights have seen, and how far a recording is from it.

A screening result is only as good as the likeness between the recording and the training data.
At training time (``mam.training.fitting``) two descriptions of the training recordings are
stored with the weights, one per kind of source (``video``: a recording through a pose backend;
``pose_file``: 3D poses given by the caller; ``kind_of``), because a pose model's output and a
clean pose file differ in jitter and scale even when the movement is the same. A kind needs
training recordings of its own to be described at all (``mam.training.fitting``: at least
``DOMAIN_FIT_FLOOR``, and the documented minimum sizes for a fit that does not call new
recordings of the kind out of domain); recordings of a kind the weights do not describe come
back indeterminate. The two descriptions:

* **motion statistics** of the model's input (``motion_statistics``): how fast and how widely
  each body part moves relative to the trunk, how jittery the trace is, how stable the bone
  lengths are, the body's proportions as seen (an infant seen from above, not from the side,
  not an adult) and the skeleton's own size (the share of frames tracked has its own gate, the
  quality gate of ``mam.screening``);
* the **clip representations** (the clip network's embedding, ``forward_features``): what the
  network makes of each 9.6 s clip.

Each is a Gaussian (mean and a Ledoit-Wolf shrunk covariance, fitted on the training infants);
a recording's distance to it is the Mahalanobis distance. The thresholds are set on infants held
out of training so that about 1% of in-domain recordings exceed each (a log-normal fitted to the
held-out distances, whose 99.25th percentile is the threshold; with two components about 1.5% of
held-out recordings are flagged). A result carries each distance over its threshold; the
recording's score is the largest of them, in domain while it is at most 1. Why both: motion
statistics catch what the network may be blind to (a still skeleton, an adult, a side view,
jitter) and the embedding catches what the hand-made statistics miss; ``bench/domain_check.py``
measures each alone and both on recordings the weights never saw the like of.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from mam.skeleton import FPS, JOINT_INDEX, NUM_JOINTS, PARENTS

DOMAIN_FORMAT = 1
QUANTILE_Z = 2.43  # 99.25th percentile of a normal: about 1% of in-domain recordings per component
CLIP_QUANTILE = 0.99  # clip threshold: empirical 99th percentile of held-out clip distances
MIN_SPEED = 1e-3  # trunk lengths per second: below this nothing moves (a frozen skeleton)

_J = JOINT_INDEX
GROUPS: dict[str, tuple[int, ...]] = {
    "hands_feet": (_J["left_wrist"], _J["right_wrist"], _J["left_ankle"], _J["right_ankle"]),
    "elbows_knees": (_J["left_elbow"], _J["right_elbow"], _J["left_knee"], _J["right_knee"]),
    "head": (_J["head"], _J["neck_nose"]),
    "trunk": (_J["left_hip"], _J["right_hip"], _J["left_shoulder"], _J["right_shoulder"],
              _J["spine"], _J["thorax"]),
}  # fmt: skip
_LIMB_BONES = tuple(c for c, p in enumerate(PARENTS) if p >= 0 and c not in (7, 8, 9, 10))
_ARM = ((11, 12), (12, 13), (14, 15), (15, 16))
_LEG = ((1, 2), (2, 3), (4, 5), (5, 6))

MOTION_FEATURES: tuple[str, ...] = (
    *(f"speed_{g}" for g in GROUPS),
    *(f"spread_{g}" for g in GROUPS),
    "jitter",
    "bone_length_variation",
    "arm_to_trunk",
    "leg_to_trunk",
    "shoulders_to_trunk",
    "hips_to_trunk",
    "skeleton_size",
)

# What a deviating statistic means, in words a clinician reads (low, high).
_REASONS: dict[str, tuple[str, str]] = {
    "speed": ("the infant moves far less than in the recordings the model learned from",
              "the infant moves far faster than in the recordings the model learned from"),
    "spread": ("the range of movement is far smaller than in the recordings the model learned from",
               "the range of movement is far larger than in the recordings the model learned "
               "from (is the whole body of one infant in view?)"),
    "jitter": ("the pose trace is unusually smooth, unlike the pose estimates the model learned "
               "from", "the pose trace is far more jittery than in the recordings the model "
               "learned from (video quality, lighting, occlusion or camera movement?)"),
    "bone_length_variation": (
        "the limbs keep their length unusually rigidly, unlike the pose the model learned from",
        "the tracked limbs change length from frame to frame (unstable tracking, or a camera "
        "that is not above the infant)"),
    "proportions": (
        "the body's proportions as seen do not match an infant lying on its back filmed from "
        "above (a different camera view, or not an infant)",
        "the body's proportions as seen do not match an infant lying on its back filmed from "
        "above (a different camera view, or not an infant)"),
    "skeleton_size": (
        "the skeleton is far smaller than an infant's (other units than the training data?)",
        "the skeleton is far larger than an infant's (an adult, or other units than the "
        "training data?)"),
}  # fmt: skip
EMBEDDING_REASON = (
    "the movement patterns the network sees differ from those of the recordings it learned from"
)


def kind_of(source: str) -> str:
    """``pose_file`` for poses given by the caller, ``video`` for a pose backend's output.

    ``source`` is ``PoseSequence.source``: the backend's name for a recording posed here, and
    for a pose file that names the backend that made it (``mam batch``'s kept poses, a review
    export's; ``mam.pose.precomputed``), so such a file is screened and trained on as a video;
    ``precomputed`` for any other pose file."""
    return "pose_file" if source == "precomputed" else "video"


def _log(x: float, floor: float = 1e-4) -> float:
    return math.log(max(float(x), floor))


def motion_statistics(x: np.ndarray, raw_trunk: float) -> np.ndarray:
    """The ``MOTION_FEATURES`` of one recording: ``x`` is the model's input before smoothing
    (``mam.pose.representation.model_input``: canonical, in trunk lengths, NaN untracked);
    ``raw_trunk`` the median trunk length in the source's own units (``skeleton_size``)."""
    x = np.asarray(x, np.float64)
    tracked = np.isfinite(x).all(axis=(1, 2))
    xt = x[tracked]
    feats: list[float] = []
    step = tracked[1:] & tracked[:-1]
    v = np.linalg.norm(np.diff(x, axis=0)[step], axis=-1) * FPS  # [n, 17] trunk lengths / s
    for idx in GROUPS.values():
        feats.append(_log(np.median(v[:, idx]) if len(v) else 0.0))
    dev = np.linalg.norm(xt - xt.mean(axis=0), axis=-1) if len(xt) else np.zeros((1, NUM_JOINTS))
    for idx in GROUPS.values():
        feats.append(_log(np.median(dev[:, idx])))
    feats.append(_log(_jitter(x, tracked)))
    bones = np.stack(
        [np.linalg.norm(xt[:, c] - xt[:, PARENTS[c]], axis=-1) for c in _LIMB_BONES], axis=1
    )
    cv = bones.std(axis=0) / np.maximum(bones.mean(axis=0), 1e-9) if len(xt) > 1 else [0.0]
    feats.append(_log(float(np.mean(cv))))

    def length(pairs) -> float:
        return float(np.mean([np.median(np.linalg.norm(xt[:, a] - xt[:, b], axis=-1))
                              for a, b in pairs])) if len(xt) else 0.0  # fmt: skip

    feats += [_log(length(_ARM)), _log(length(_LEG)), _log(length([(11, 14)])),
              _log(length([(1, 4)])), _log(raw_trunk, 1e-9)]  # fmt: skip
    return np.asarray(feats, np.float64)


def _jitter(x: np.ndarray, tracked: np.ndarray) -> float:
    """Power above 4 Hz over power in 0.3-4 Hz of the hands' and feet's traces (per tracked
    stretch of at least 2 s): pose noise is broadband, infant movement is below a few Hz."""
    idx = list(GROUPS["hands_feet"])
    hi = lo = 0.0
    edges = np.flatnonzero(np.diff(np.concatenate([[0], tracked.astype(np.int8), [0]])))
    for a, b in zip(edges[::2], edges[1::2]):
        if b - a < 2 * FPS:
            continue
        seg = x[a:b, idx].reshape(b - a, -1)
        seg = seg - seg.mean(axis=0)
        f = np.fft.rfftfreq(len(seg), 1 / FPS)
        p = (np.abs(np.fft.rfft(seg, axis=0)) ** 2).sum(axis=1)
        hi += float(p[f > 4.0].sum())
        lo += float(p[(f >= 0.3) & (f <= 4.0)].sum())
    return hi / lo if lo > 0 else 0.0


def still(x: np.ndarray) -> bool:
    """True when nothing in the recording moves (the same pose in every frame)."""
    x = np.asarray(x, np.float64)
    tracked = np.isfinite(x).all(axis=(1, 2))
    step = tracked[1:] & tracked[:-1]
    if not step.any():
        return True
    v = np.linalg.norm(np.diff(x, axis=0)[step], axis=-1) * FPS
    return float(np.median(v)) < MIN_SPEED and float(np.percentile(v, 99)) < 10 * MIN_SPEED


@dataclass
class Gaussian:
    """Mean and precision of one description, and the distance threshold set on held-out data."""

    mean: np.ndarray
    precision: np.ndarray
    threshold: float = float("inf")

    @classmethod
    def fit(cls, x: np.ndarray) -> Gaussian:
        from sklearn.covariance import LedoitWolf

        x = np.asarray(x, np.float64)
        lw = LedoitWolf().fit(x)
        return cls(lw.location_, np.linalg.pinv(lw.covariance_))

    def distance(self, x: np.ndarray) -> np.ndarray:
        d = np.atleast_2d(np.asarray(x, np.float64)) - self.mean
        return np.sqrt(np.maximum(np.einsum("ni,ij,nj->n", d, self.precision, d), 0.0))

    def z(self, x: np.ndarray) -> np.ndarray:
        """Per-feature standardised deviation (for naming the reason)."""
        sd = np.sqrt(np.maximum(np.diag(np.linalg.pinv(self.precision)), 1e-12))
        return (np.asarray(x, np.float64) - self.mean) / sd

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "precision": self.precision.tolist(),
                "threshold": self.threshold}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> Gaussian:
        return cls(np.asarray(d["mean"]), np.asarray(d["precision"]), float(d["threshold"]))


def lognormal_threshold(distances: np.ndarray, z: float = QUANTILE_Z) -> float:
    """Upper quantile of a log-normal fitted to held-out distances (smoother than the empirical
    quantile of tens of recordings)."""
    logd = np.log(np.maximum(np.asarray(distances, np.float64), 1e-9))
    return float(np.exp(logd.mean() + z * logd.std(ddof=1)))


@dataclass
class KindModel:
    """One kind of source: its motion and embedding Gaussians, and the clip threshold."""

    motion: Gaussian
    embedding: Gaussian
    clip_threshold: float
    recordings: int
    backends: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"motion": self.motion.to_dict(), "embedding": self.embedding.to_dict(),
                "clip_threshold": self.clip_threshold, "recordings": self.recordings,
                "backends": self.backends}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> KindModel:
        return cls(
            Gaussian.from_dict(d["motion"]),
            Gaussian.from_dict(d["embedding"]),
            float(d["clip_threshold"]),
            int(d["recordings"]),
            list(d.get("backends", [])),
        )


@dataclass
class Verdict:
    """A recording's domain check: scores over thresholds (in domain while <= 1)."""

    score: float
    in_domain: bool
    motion_score: float | None
    embedding_score: float
    clip_scores: list[float]
    reasons: list[str]
    kind: str


@dataclass
class DomainModel:
    """Per kind of source, what the weights have seen (module docstring)."""

    kinds: dict[str, KindModel]
    representation: str
    method: str = "motion statistics + clip embedding, Gaussian (Ledoit-Wolf), per source kind"

    def to_dict(self) -> dict:
        return {"format": DOMAIN_FORMAT, "method": self.method,
                "representation": self.representation, "motion_features": list(MOTION_FEATURES),
                "kinds": {k: m.to_dict() for k, m in self.kinds.items()}}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> DomainModel:
        if d.get("format") != DOMAIN_FORMAT or tuple(d["motion_features"]) != MOTION_FEATURES:
            raise ValueError("the weights' domain statistics are of another format")
        kinds = {k: KindModel.from_dict(v) for k, v in d["kinds"].items()}
        return cls(kinds, d["representation"], d.get("method", ""))

    def check(
        self, kind: str, embeddings: np.ndarray, motion: np.ndarray | None, backend: str = ""
    ) -> Verdict:
        """Score one recording: ``embeddings`` ``[N, D]`` of its clips, ``motion`` its
        ``motion_statistics`` (None where only tensors were given: embedding only)."""
        m = self.kinds.get(kind)
        if m is None:
            seen = ", ".join(sorted(self.kinds)) or "none"
            return Verdict(float("inf"), False, None, float("inf"), [], [
                f"the model was never trained on this kind of input ({kind.replace('_', ' ')}; "
                f"it knows: {seen.replace('_', ' ')})"], kind)  # fmt: skip
        clip_d = m.embedding.distance(embeddings)
        emb = float(np.mean(clip_d)) / m.embedding.threshold
        reasons = []
        mot = None
        if motion is not None:
            mot = float(m.motion.distance(motion)[0]) / m.motion.threshold
            if mot > 1:
                reasons.append(self._motion_reason(m.motion, motion))
        if emb > 1:
            reasons.append(EMBEDDING_REASON)
        score = max(emb, mot) if mot is not None else emb
        return Verdict(score, score <= 1.0, mot, emb,
                       (clip_d / m.clip_threshold).tolist(), reasons, kind)  # fmt: skip

    @staticmethod
    def _motion_reason(g: Gaussian, motion: np.ndarray) -> str:
        z = g.z(motion)
        k = int(np.argmax(np.abs(z)))
        name = MOTION_FEATURES[k]
        key = ("speed" if name.startswith("speed") else "spread" if name.startswith("spread")
               else "proportions" if name.endswith("_to_trunk") else name)  # fmt: skip
        low, high = _REASONS[key]
        return high if z[k] > 0 or not low else low
