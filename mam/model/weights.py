"""Weights plus everything needed to use them, saved and loaded together.

Like torchvision's weight enums, preprocessing metadata travels with the weights: joint order,
fps, clip length and step, normalisation statistics, Info-branch input statistics, calibration,
decision threshold and provenance. Files: ``NAME.pt`` (state dict) and ``NAME.json``.

The model's identity is ``ModelMeta.digest``: SHA-256 over the network's tensors (by name, dtype,
shape and bytes; not the ``.pt`` file, whose bytes embed its file name) and everything in the
metadata that decides a label (calibrations, thresholds, FMs cut-offs, domain record,
preprocessing, network config). Name, version, provenance and metrics decide no label and are
left out: the same weights renamed keep their digest, a hand-edited threshold changes it.
``weights_sha256`` stays the integrity check of the ``.pt`` file.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mam.domain import DomainModel
from mam.errors import ModelLoadError
from mam.features import CLIP_STEP, SMOOTHING_WINDOW, Normalizer
from mam.files import write_atomic
from mam.gma import FMS_CLIP_THRESHOLD
from mam.model.config import MAMConfig
from mam.skeleton import FPS, JOINT_NAMES

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
# Keys of ``ModelMeta.to_dict`` that decide no label, so stay out of the digest.
NOT_IN_DIGEST = ("format_version", "name", "version", "provenance", "metrics")
INFO_FEATURES = ("sex_male", "gestational_age_weeks", "birth_weight_g", "corrected_age_weeks")


@dataclass
class Calibration:
    """Platt scaling of the branches' log-odds: P(normal) = sigmoid(a * z_bag + c * z_info + b).

    Fitting ``c`` as well as ``a`` lets held-out data decide how much the Info branch counts,
    instead of adding the two log-odds with equal weight (the training objective). The
    defaults (a = c = 1, b = 0) are that plain sum, i.e. no calibration.
    """

    a: float = 1.0
    b: float = 0.0
    c: float = 1.0
    method: str = "none"

    def apply(self, z_bag: np.ndarray, z_info: np.ndarray | None = None) -> np.ndarray:
        z = self.a * np.asarray(z_bag, np.float64) + self.b
        if z_info is not None:
            z = z + self.c * np.asarray(z_info, np.float64)
        return 1.0 / (1.0 + np.exp(-z))


@dataclass
class KindCalibration:
    """One source kind's calibration and risk threshold (``mam.domain.kind_of``). Pose from
    video is noisier than the simulator's pose files, so the same log-odds stand for another
    frequency of risk: each kind with enough held-out infants of its own gets its own fit."""

    calibration: Calibration
    calibration_without_info: Calibration
    risk_threshold: float
    infants: int = 0  # held-out infants it was fitted on (0: the weights' overall fit)

    def to_dict(self) -> dict:
        return {
            "calibration": vars(self.calibration),
            "calibration_without_info": vars(self.calibration_without_info),
            "risk_threshold": self.risk_threshold,
            "infants": self.infants,
        }

    @classmethod
    def from_dict(cls, d: dict) -> KindCalibration:
        return cls(
            Calibration(**d["calibration"]),
            Calibration(**d["calibration_without_info"]),
            float(d["risk_threshold"]),
            int(d.get("infants", 0)),
        )


@dataclass
class ModelMeta:
    name: str
    version: str
    config: MAMConfig
    normalizer: Normalizer
    info_mean: tuple[float, ...] = (0.5, 36.0, 2800.0, 14.0)
    info_std: tuple[float, ...] = (0.5, 3.5, 700.0, 3.5)
    calibration: Calibration = field(default_factory=Calibration)
    calibration_without_info: Calibration = field(default_factory=Calibration)
    risk_threshold: float = 0.5
    # Kinds of source with a calibration of their own; the three fields above serve the rest.
    calibration_by_kind: dict[str, KindCalibration] = field(default_factory=dict)
    fms_clip_threshold: float = FMS_CLIP_THRESHOLD
    # FMs-frequency cut-offs: >= continuous -> continuous, >= intermittent -> intermittent.
    fms_category_thresholds: dict = field(
        default_factory=lambda: {"continuous": 0.75, "intermittent": 0.325, "sporadic": 1e-6}
    )
    clip_step: int = CLIP_STEP
    smoothing_window: int = SMOOTHING_WINDOW
    # The pose coordinates the model sees (mam.pose.representation); weights from before the
    # choice was recorded saw the 3D joints.
    representation: str = "world3d"
    # What the weights have seen (mam.domain); None: unknown, so no result can be in domain.
    domain: DomainModel | None = None
    provenance: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    # Set on load: the digest of the network's tensors these metadata go with (``tensors_sha256``)
    # and the model digest the file recorded when saved (None: not recorded).
    tensors_sha256: str | None = field(default=None, compare=False, repr=False)
    recorded_digest: str | None = field(default=None, compare=False, repr=False)

    @property
    def digest(self) -> str | None:
        """The model's identity (module docstring); None for metadata not yet tied to tensors."""
        return None if self.tensors_sha256 is None else model_digest(self, self.tensors_sha256)

    def calibrated(self, kind: str | None = None) -> KindCalibration:
        """The calibration that serves ``kind``: its own where fitted, else the overall one."""
        own = self.calibration_by_kind.get(kind) if kind else None
        return own or KindCalibration(
            self.calibration, self.calibration_without_info, self.risk_threshold
        )

    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "version": self.version,
            "joints": list(JOINT_NAMES),
            "fps": FPS,
            "clip_frames": self.config.clip_frames,
            "clip_step": self.clip_step,
            "smoothing_window": self.smoothing_window,
            "config": self.config.to_dict(),
            "normalizer": self.normalizer.to_dict(),
            "info_features": list(INFO_FEATURES),
            "info_mean": list(self.info_mean),
            "info_std": list(self.info_std),
            "calibration": vars(self.calibration),
            "calibration_without_info": vars(self.calibration_without_info),
            "risk_threshold": self.risk_threshold,
            "calibration_by_kind": {k: v.to_dict() for k, v in self.calibration_by_kind.items()},
            "fms_clip_threshold": self.fms_clip_threshold,
            "fms_category_thresholds": self.fms_category_thresholds,
            "representation": self.representation,
            "domain": self.domain.to_dict() if self.domain is not None else None,
            "provenance": self.provenance,
            "metrics": self.metrics,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ModelMeta:
        if d.get("format_version") != FORMAT_VERSION:
            raise ModelLoadError(f"unsupported weights format {d.get('format_version')!r}")
        if tuple(d["joints"]) != JOINT_NAMES or d["fps"] != FPS:
            raise ModelLoadError("weights were made for another joint order or frame rate")
        return cls(
            name=d["name"],
            version=d["version"],
            config=MAMConfig.from_dict(d["config"]),
            normalizer=Normalizer.from_dict(d["normalizer"]),
            info_mean=tuple(d["info_mean"]),
            info_std=tuple(d["info_std"]),
            calibration=Calibration(**d["calibration"]),
            calibration_without_info=Calibration(**d["calibration_without_info"]),
            risk_threshold=float(d["risk_threshold"]),
            calibration_by_kind={
                k: KindCalibration.from_dict(v)
                for k, v in (d.get("calibration_by_kind") or {}).items()
            },
            fms_clip_threshold=float(d["fms_clip_threshold"]),
            fms_category_thresholds=dict(d["fms_category_thresholds"]),
            clip_step=int(d["clip_step"]),
            smoothing_window=int(d["smoothing_window"]),
            representation=d.get("representation", "world3d"),
            domain=DomainModel.from_dict(d["domain"]) if d.get("domain") else None,
            provenance=d.get("provenance", {}),
            metrics=d.get("metrics", {}),
        )


def sha256_of(path: Path) -> str:
    """Streaming sha256 of a file (weights, exports, recordings: the one hasher)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_digest(meta: ModelMeta, tensors_sha256: str) -> str:
    """SHA-256 of a canonical JSON of what decides a label: the metadata less
    ``NOT_IN_DIGEST``, and the tensors' digest (``tensors_digest``)."""
    record = {k: v for k, v in meta.to_dict().items() if k not in NOT_IN_DIGEST}
    blob = json.dumps({"meta": record, "tensors_sha256": tensors_sha256}, sort_keys=True,
                      separators=(",", ":"))  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()


# torch.save's storage types -> (dtype name, numpy dtype of the stored bytes). bfloat16 has no
# numpy dtype: its bytes are hashed as they are, under its own name.
_STORAGES = {
    "DoubleStorage": ("float64", "<f8"), "FloatStorage": ("float32", "<f4"),
    "HalfStorage": ("float16", "<f2"), "BFloat16Storage": ("bfloat16", "<u2"),
    "LongStorage": ("int64", "<i8"), "IntStorage": ("int32", "<i4"),
    "ShortStorage": ("int16", "<i2"), "CharStorage": ("int8", "i1"),
    "ByteStorage": ("uint8", "u1"), "BoolStorage": ("bool", "?"),
}  # fmt: skip


def _rebuild_tensor(storage, offset, size, stride, *_):
    name, flat = storage
    strides = [s * flat.itemsize for s in stride]
    arr = np.lib.stride_tricks.as_strided(flat[offset:], shape=tuple(size), strides=strides)
    return name, np.ascontiguousarray(arr)


class _StateDictUnpickler(pickle.Unpickler):
    """Reads a state dict saved by ``torch.save`` as numpy arrays, without torch (serving has
    none), and nothing else: any other class in the file is refused."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str):
        super().__init__(archive.open(prefix + "data.pkl"))
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return lambda data, *_: data
        if module == "torch" and name in _STORAGES:
            return _STORAGES[name]
        raise pickle.UnpicklingError(f"not a plain state dict ({module}.{name})")

    def persistent_load(self, pid):
        _, (name, dtype), key, _location, _numel = pid
        return name, np.frombuffer(self.archive.read(f"{self.prefix}data/{key}"), dtype)


def tensors_digest(pt: str | Path) -> str:
    """SHA-256 of a ``torch.save``d state dict's tensors, in name order, each by name, dtype,
    shape and bytes: the same tensors give the same digest whatever the file is called."""
    try:
        with zipfile.ZipFile(pt) as z:
            pkl = next(n for n in z.namelist() if n.endswith("data.pkl"))
            prefix = pkl[: -len("data.pkl")]
            if prefix + "byteorder" in z.namelist() and z.read(prefix + "byteorder") != b"little":
                raise ModelLoadError(f"weights file {pt} is big-endian")
            state = _StateDictUnpickler(z, prefix).load()
        h = hashlib.sha256()
        for key in sorted(state):
            dtype, arr = state[key]
            h.update(json.dumps([key, dtype, list(arr.shape), arr.nbytes]).encode() + b"\0")
            h.update(arr.tobytes())
    except (OSError, zipfile.BadZipFile, StopIteration, pickle.UnpicklingError, KeyError,
            ValueError, TypeError, AttributeError) as e:  # fmt: skip
        raise ModelLoadError(f"weights file {pt} is not a readable state dict: {e!r}") from e
    return h.hexdigest()


def save_weights(model, meta: ModelMeta, path: str | Path) -> Path:
    """Write ``path.pt`` and ``path.json``; returns the JSON path. The JSON records the
    tensors' digest and the model digest (``tensors_sha256``, ``model_digest``)."""
    import torch

    path = Path(path).with_suffix("")
    path.parent.mkdir(parents=True, exist_ok=True)
    pt = path.with_suffix(".pt")
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    write_atomic(pt, buf.getvalue())
    d = meta.to_dict()
    d["weights_file"] = pt.name
    d["weights_sha256"] = sha256_of(pt)
    d["tensors_sha256"] = tensors_digest(pt)
    # As loading will read it back: the digest of the JSON's values, not of the objects in memory.
    d["model_digest"] = model_digest(ModelMeta.from_dict(json.loads(json.dumps(d))),
                                     d["tensors_sha256"])  # fmt: skip
    js = path.with_suffix(".json")
    write_atomic(js, (json.dumps(d, indent=2) + "\n").encode())
    return js


def record_digest(path: str | Path) -> str:
    """Add ``tensors_sha256`` and ``model_digest`` to a weights JSON written before they were
    recorded (the ``.pt`` is left alone, so ``weights_sha256`` and ONNX exports stay valid);
    returns the digest."""
    js = Path(path).with_suffix(".json")
    meta, pt, sha = load_meta(js)
    if not pt.is_file() or sha256_of(pt) != sha:
        raise ModelLoadError(f"weights file {pt} is missing or does not match its metadata")
    d = json.loads(js.read_text())
    d["tensors_sha256"], d["model_digest"] = meta.tensors_sha256, meta.digest
    write_atomic(js, (json.dumps(d, indent=2) + "\n").encode())
    return meta.digest


def _tensors_identity(d: dict, pt: Path, sha: str) -> str:
    """The tensors' digest: computed from the ``.pt`` where it is here and matches its recorded
    sha256; else as recorded (a bento carries the JSON and the ONNX export, not the ``.pt``);
    else, for weights saved before digests were recorded, the file's sha256."""
    recorded = d.get("tensors_sha256")
    if pt.is_file() and sha256_of(pt) == sha:
        try:
            computed = tensors_digest(pt)
        except ModelLoadError:  # a state dict this reader does not know: still loadable by torch
            logger.warning("weights: tensors not readable for the digest; using the file's hash")
            return f"file-sha256:{sha}"
        if recorded and recorded != computed:
            logger.warning("weights: recorded tensors digest differs from the file's; "
                           "using the file's")  # fmt: skip
        return computed
    return str(recorded) if recorded else f"file-sha256:{sha}"


def load_meta(path: str | Path) -> tuple[ModelMeta, Path, str]:
    """Metadata, the state-dict path and its recorded sha256, from ``NAME.json`` (or ``NAME``).
    The metadata carry the model digest (``meta.digest``), computed here."""
    js = Path(path).with_suffix(".json")
    if not js.is_file():
        raise ModelLoadError(f"model metadata not found: {js}")
    try:
        d = json.loads(js.read_text())
        meta, pt, sha = (
            ModelMeta.from_dict(d),
            js.parent / d["weights_file"],
            str(d["weights_sha256"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelLoadError(f"corrupt model metadata {js}: {e!r}") from e
    meta.tensors_sha256 = _tensors_identity(d, pt, sha)
    meta.recorded_digest = d.get("model_digest")
    if meta.recorded_digest and meta.recorded_digest != meta.digest:
        logger.warning("weights: the recorded model digest %s differs from the computed %s (the "
                       "metadata were edited after saving); results carry the computed one",
                       str(meta.recorded_digest)[:12], meta.digest[:12])  # fmt: skip
    return meta, pt, sha


def load_weights(path: str | Path):
    """``(MAM in eval mode, ModelMeta)``; the state dict's hash is checked against the metadata."""
    import torch

    from mam.model.network import MAM

    meta, pt, digest = load_meta(path)
    if not pt.is_file() or sha256_of(pt) != digest:
        raise ModelLoadError(f"weights file {pt} is missing or does not match its metadata")
    model = MAM(meta.config)
    model.load_state_dict(torch.load(pt, map_location="cpu", weights_only=True))
    return model.eval(), meta
