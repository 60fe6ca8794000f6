"""Limits on uploaded arrays, checked from their headers before anything is allocated.

``np.load`` allocates what an ``.npy`` header declares, and an ``.npz`` member can expand a
thousandfold (a 1 MB archive of zeros declares a gigabyte of joints). So the service reads only
the headers first, a few hundred bytes from each file or archive member, and refuses arrays
larger than its limits with the pipeline's typed errors; only then is the upload loaded, in a
thread, off the event loop.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path
from typing import BinaryIO

import numpy as np

from mam.errors import InvalidPoseError, InvalidTensorError
from mam.features import CLIP_FRAMES
from mam.skeleton import NUM_JOINTS
from service.errors import MALFORMED, ServiceError

INSTANCE_SHAPE = (CLIP_FRAMES, 3, NUM_JOINTS, NUM_JOINTS)
MAX_NPZ_MEMBERS = 8  # joints, confidence, fps, image_joints, with room to spare
_FLOAT64 = 8


class HeaderError(ValueError):
    """Not an ``.npy`` header numpy can read (the message names no content)."""


def npy_header(f: BinaryIO) -> tuple[tuple[int, ...], np.dtype]:
    """``(shape, dtype)`` of the ``.npy`` stream ``f`` (left after its header). numpy bounds the
    header itself (``max_header_size``) and refuses pickled object arrays here too."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(f)
        else:
            shape, _, dtype = fmt.read_array_header_2_0(f)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as e:
        raise HeaderError(type(e).__name__) from None
    if dtype.hasobject:
        raise HeaderError("object arrays are refused")
    return tuple(int(d) for d in shape), dtype


def _nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def check_instances_file(path: Path, max_instances: int) -> None:
    """An instances ``.npy``: ``[N <= max_instances, 240, 3, 17, 17]``, by its header.

    Raises:
        InvalidTensorError: wrong shape or dtype, too many instances.
        ServiceError: ``malformed_request``, not a readable ``.npy``.
    """
    expected = f"[N, {', '.join(map(str, INSTANCE_SHAPE))}]"
    try:
        with open(path, "rb") as f:
            shape, dtype = npy_header(f)
    except HeaderError:
        raise ServiceError(
            MALFORMED, f"'instances' is not a readable .npy array (no pickles); expected {expected}"
        ) from None
    if len(shape) != 5 or shape[1:] != INSTANCE_SHAPE:
        raise InvalidTensorError(f"expected instances of shape {expected}; received {list(shape)}")
    if not 1 <= shape[0] <= max_instances:
        raise InvalidTensorError(f"expected 1 to {max_instances} instances; received {shape[0]}")
    if dtype.kind != "f" or dtype.itemsize not in (2, 4, 8):
        raise InvalidTensorError(
            f"expected float16/float32/float64 instances; received dtype {dtype}"
        )


def check_pose_file(path: Path, max_frames: int) -> None:
    """A pose ``.npy`` or ``.npz`` (``mam.pose.precomputed``): every array's declared size
    (an archive member's both in the zip directory and in its ``.npy`` header) within what
    ``max_frames`` frames need, ``joints`` at most ``max_frames`` frames.

    Raises:
        InvalidPoseError: too many frames, an oversized or unreadable member.
    """
    limit = max_frames * NUM_JOINTS * 3 * _FLOAT64  # the largest array a valid file holds
    with open(path, "rb") as f:
        zipped = f.read(2) == b"PK"  # as the service names it
    if not zipped:
        with open(path, "rb") as f:
            _check_pose_array(f, "joints", max_frames, limit)
        return
    try:
        with zipfile.ZipFile(path) as z:
            members = z.infolist()
            if len(members) > MAX_NPZ_MEMBERS:
                raise InvalidPoseError(
                    f"expected an .npz with at most {MAX_NPZ_MEMBERS} arrays; received "
                    f"{len(members)}"
                )
            for m in members:
                name = m.filename.removesuffix(".npy")
                if m.file_size > limit + 4096:  # the declared uncompressed size, + its header
                    raise InvalidPoseError(_too_large(name, m.file_size, limit, max_frames))
                with z.open(m) as f:
                    _check_pose_array(f, name, max_frames, limit)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, OSError, EOFError):
        raise InvalidPoseError(
            "the .npz pose file is not a readable zip archive of numpy arrays"
        ) from None


def _too_large(name: str, nbytes: int, limit: int, max_frames: int) -> str:
    return (
        f"'{_safe(name)}' declares {nbytes} bytes; a pose of at most {max_frames} frames needs "
        f"at most {limit}"
    )


def _safe(name: str) -> str:
    """An archive member's name as it may appear in a message: short and printable."""
    return "".join(c if c.isalnum() or c in "._-" else "?" for c in name[:40])


def _check_pose_array(f: BinaryIO, name: str, max_frames: int, limit: int) -> None:
    try:
        shape, dtype = npy_header(f)
    except HeaderError:
        raise InvalidPoseError(
            f"'{_safe(name)}' is not a readable numpy array (no pickled objects)"
        ) from None
    nbytes = _nbytes(shape, dtype)
    if name == "joints" and shape and shape[0] > max_frames:
        raise InvalidPoseError(f"expected at most {max_frames} frames; received {shape[0]}")
    if nbytes > limit:
        raise InvalidPoseError(_too_large(name, nbytes, limit, max_frames))
