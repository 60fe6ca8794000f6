"""Load a pose sequence computed outside MAM, for sites with their own pose pipeline.

Accepted files:

* ``.npy``: float array ``[T, 17, 3]``, Human3.6M joint order (``mam.skeleton.JOINT_NAMES``),
  25 fps;
* ``.npz``: key ``joints`` as above, optional ``confidence`` ``[T, 17]`` in [0, 1], optional scalar
  ``fps`` (must be 25: MAM does not resample poses).

Policy (checked here, reported as :class:`~mam.errors.InvalidPoseError` with expected vs received):

* dtype float16, float32 or float64, converted to float32; integer, bool, object arrays are refused;
* at least one frame;
* a frame is either fully finite (tracked) or fully NaN (untracked, as the video backends report
  it); +-inf anywhere, or a frame with only some values NaN, is refused: a partly NaN frame usually
  means a broken export, and every later stage assumes whole-frame gaps;
* coordinates beyond +-1e5 in magnitude are refused (no unit of pose, metres to pixels, gets
  there; such values come from a broken export and would overflow inside the network);
* an ``.npz`` may carry ``image_joints`` ``[T, 17, 2]`` (pixels), the 2D joints of the same frames,
  as the training pose cache keeps them for the image-plane representation;
* an ``.npz`` may name the pose backend that made it in ``source`` (a string, one of
  ``mam.pose.available_backends()``; optional ``kind``, then ``video``), as the poses that
  ``mam batch`` keeps and ``mam review --export`` writes do: it is then screened and trained on as
  the ``video`` kind it came from (``mam.domain.kind_of``). Without it a file is a pose file
  (``source`` ``precomputed``, kind ``pose_file``); a name no backend here has is refused;
* without ``confidence``, tracked frames get confidence 1 and untracked frames 0; a given confidence
  must be finite and in [0, 1] on tracked frames (it is set to 0 on untracked frames).

Units and axes are the caller's; they must match what the model was trained on (see the model card).
Gap filling and the tracking-quality check (``mam.pose.quality``) apply as for the video backends.
"""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path

import numpy as np

from mam.domain import kind_of
from mam.errors import EmptyFileError, FileNotFoundInputError, InvalidPoseError
from mam.pose.base import PoseSequence, available_backends
from mam.skeleton import FPS, NUM_JOINTS

logger = logging.getLogger(__name__)

SOURCE = "precomputed"
MAX_COORDINATE = 1e5


def _load_array(path: Path):
    """``(joints, confidence, fps, image_joints, source)``, the last four None where absent."""
    suffix = path.suffix.lower()
    try:
        data = np.load(path, allow_pickle=False)
        if suffix == ".npy":
            if not isinstance(data, np.ndarray):
                data.close()
                raise InvalidPoseError(
                    "expected a single array in the .npy file; received an archive"
                )
            return data, None, None, None, None
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise InvalidPoseError(
                "expected an .npz archive with a 'joints' array; received one array"
            )
        with data:
            if "joints" not in data.files:
                raise InvalidPoseError(
                    f"expected an .npz archive with a 'joints' array; received keys {data.files}"
                )
            joints = data["joints"]
            confidence = data["confidence"] if "confidence" in data.files else None
            image = data["image_joints"] if "image_joints" in data.files else None
            fps = None
            if "fps" in data.files:
                fps_arr = data["fps"]
                if fps_arr.size != 1 or not np.issubdtype(fps_arr.dtype, np.number):
                    raise InvalidPoseError(
                        f"expected 'fps' to be one number; received {fps_arr.dtype} "
                        f"{list(fps_arr.shape)}"
                    )
                fps = float(fps_arr.reshape(()))
            return joints, confidence, fps, image, _source(data)
    except InvalidPoseError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        # NOTE: the exception text can quote file contents; only its type is reported.
        raise InvalidPoseError(
            f"could not read {suffix} pose file {path} ({type(exc).__name__}): expected a numpy "
            f"{'array' if suffix == '.npy' else 'archive'} without pickled objects"
        ) from None


def _text(data, key: str) -> str | None:
    if key not in data.files:
        return None
    arr = data[key]
    if arr.dtype.kind != "U" or arr.size != 1:
        raise InvalidPoseError(
            f"expected '{key}' to be one string; received {arr.dtype} {list(arr.shape)}"
        )
    return str(arr.reshape(()))


def _source(data) -> str | None:
    """The pose backend named in ``source`` (checked against the registered ones), None where
    the file names none; ``kind``, where given, must be the kind that backend's output is."""
    source, kind = _text(data, "source"), _text(data, "kind")
    if source is not None and source not in available_backends():
        raise InvalidPoseError(
            f"expected 'source' to name a pose backend ({', '.join(available_backends())}); "
            f"received {source[:40]!r}"
        )
    if kind is not None and kind != kind_of(source or SOURCE):
        raise InvalidPoseError(
            f"expected 'kind' {kind_of(source or SOURCE)!r} for a pose from "
            f"{source or 'a pose file'}; received {kind[:40]!r}"
        )
    return source


def _check_float(arr: np.ndarray, name: str, shape: str) -> np.ndarray:
    if arr.dtype.kind != "f" or arr.dtype.itemsize not in (2, 4, 8):
        raise InvalidPoseError(
            f"expected '{name}' as float16/float32/float64 {shape}; received dtype {arr.dtype}"
        )
    with np.errstate(over="ignore"):  # overflow to inf is reported by the caller's inf check
        return arr.astype(np.float32)


def _check_image_joints(image: np.ndarray, joints: np.ndarray) -> np.ndarray:
    """Optional 2D image joints ``[T, 17, 2]`` (pixels) of the same frames, as a video backend
    gives them (the training pose cache keeps them)."""
    expected = f"[{joints.shape[0]}, {NUM_JOINTS}, 2]"
    if image.ndim != 3 or image.shape != (joints.shape[0], NUM_JOINTS, 2):
        raise InvalidPoseError(
            f"expected image_joints of shape {expected}; received {list(image.shape)}"
        )
    image = _check_float(image, "image_joints", expected)
    _check_magnitude(image, "image_joints")
    return image


def _check_magnitude(values: np.ndarray, name: str) -> None:
    """Coordinates are metres, millimetres or pixels: anything beyond MAX_COORDINATE is a
    broken export, and its squares would overflow float32 inside the network."""
    finite = values[np.isfinite(values)]
    peak = float(np.abs(finite).max()) if finite.size else 0.0
    if peak > MAX_COORDINATE:
        raise InvalidPoseError(
            f"expected {name} coordinates within +-{MAX_COORDINATE:.0e} (metres, millimetres or "
            f"pixels); received values up to {peak:.3g} in magnitude"
        )


def validate_pose_array(
    joints: np.ndarray, confidence: np.ndarray | None = None, fps: float | None = None
) -> PoseSequence:
    """Check a precomputed pose array (policy in the module docstring) and wrap it.

    Raises:
        InvalidPoseError: wrong type, shape, dtype, values or frame rate.
    """
    if not isinstance(joints, np.ndarray):
        raise InvalidPoseError(
            f"expected a numpy array [T, {NUM_JOINTS}, 3]; received {type(joints).__name__}"
        )
    expected = f"[T, {NUM_JOINTS}, 3]"
    if joints.ndim != 3 or joints.shape[1:] != (NUM_JOINTS, 3):
        raise InvalidPoseError(
            f"expected joints of shape {expected} (Human3.6M joints, x/y/z); "
            f"received {list(joints.shape)}"
        )
    joints = _check_float(joints, "joints", expected)
    num_frames = joints.shape[0]
    if num_frames == 0:
        raise InvalidPoseError(f"expected at least one frame {expected}; received 0 frames")
    if fps is not None and not np.isclose(fps, FPS):
        raise InvalidPoseError(f"expected poses at {FPS:g} fps; received {fps:g} fps")

    # float16/float64 -> float32 can overflow to inf, so check after converting.
    if np.isinf(joints).any():
        n = int(np.isinf(joints).any(axis=(1, 2)).sum())
        raise InvalidPoseError(
            f"expected finite values (or whole NaN frames for untracked ones); received +-inf "
            f"in {n} frame(s)"
        )
    _check_magnitude(joints, "joints")
    nan = np.isnan(joints)
    frame_nan = nan.all(axis=(1, 2))
    partial = nan.any(axis=(1, 2)) & ~frame_nan
    if partial.any():
        first = int(np.flatnonzero(partial)[0])
        raise InvalidPoseError(
            "expected each frame fully finite (tracked) or fully NaN (untracked); received "
            f"{int(partial.sum())} partly NaN frame(s), the first at index {first}"
        )

    if confidence is None:
        conf = np.where(frame_nan, 0.0, 1.0).astype(np.float32)
        conf = np.repeat(conf[:, None], NUM_JOINTS, axis=1)
    else:
        if not isinstance(confidence, np.ndarray) or confidence.shape != (num_frames, NUM_JOINTS):
            got = list(confidence.shape) if isinstance(confidence, np.ndarray) else confidence
            raise InvalidPoseError(
                f"expected confidence of shape [{num_frames}, {NUM_JOINTS}]; received {got}"
            )
        conf = _check_float(confidence, "confidence", f"[{num_frames}, {NUM_JOINTS}]")
        conf[frame_nan] = 0.0
        if not np.isfinite(conf).all() or conf.min() < 0.0 or conf.max() > 1.0:
            raise InvalidPoseError(
                "expected confidence finite and within [0, 1] on tracked frames; received values "
                f"in [{np.nanmin(conf):g}, {np.nanmax(conf):g}]"
                + ("" if np.isfinite(conf).all() else " and non-finite values")
            )
    return PoseSequence(joints=joints, confidence=conf, fps=FPS, source=SOURCE)


def load_pose_file(path: str | os.PathLike) -> PoseSequence:
    """Load a ``.npy`` / ``.npz`` pose file (format and policy in the module docstring).

    Raises:
        FileNotFoundInputError: the path does not exist or is not a file.
        EmptyFileError: the file is empty.
        InvalidPoseError: unsupported extension, unreadable file, or a pose that fails validation.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundInputError(
            f"pose file not found: {path}" if not path.exists() else f"not a file: {path}"
        )
    if path.suffix.lower() not in (".npy", ".npz"):
        raise InvalidPoseError(
            f"expected a .npy or .npz pose file; received a {path.suffix or 'extension-less'} file"
        )
    if path.stat().st_size == 0:
        raise EmptyFileError(f"pose file is empty: {path}")
    joints, confidence, fps, image, source = _load_array(path)
    seq = validate_pose_array(joints, confidence, fps)
    if source is not None:
        seq.source = source
    if image is not None:
        seq.meta["image_joints"] = _check_image_joints(image, seq.joints)
    seq.meta["format"] = path.suffix.lower().lstrip(".")
    logger.debug("loaded precomputed pose: %d frames", seq.num_frames)
    return seq
