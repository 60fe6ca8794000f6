"""The poses ``mam batch`` keeps: ``DIR/poses/<backend>-v<format>-<sha256>.npz``.

A recording's pose is the costly part of screening it (about a minute for a few minutes of
video), and the review app's skeleton overlay, its training export and training itself all need
that same pose. So a batch worker writes each video's pose, as it estimated it, next to the
results, named by the backend and the recording's content hash (the ledger's ``sha256``):
renamed or copied recordings share it, and a rerun, another infant-data row of the same
recording or a ``--retry-failed`` reads it instead of estimating again. The file is the format of
``mam.pose.from_video.write_pose_cache`` (``joints``, ``confidence``, ``fps``, ``image_joints``,
``image_size``) with ``source`` (the backend) and ``kind`` (``video``), so ``mam screen --pose``
and ``mam train`` take it as the video kind it came from. Pose files given to the batch are
their own pose and are not copied; through ``--service`` no pose comes back, so none is kept.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

POSES = "poses"


def kept_pose_path(out: str | Path, backend: str, sha256: str) -> Path:
    """Where the pose of the recording with content ``sha256`` by ``backend`` is kept under a
    batch output folder ``out`` (whether it is there or not)."""
    from mam.pose.from_video import pose_cache_name

    return Path(out) / POSES / pose_cache_name(backend, sha256)


def kept_pose(out: str | Path, backend: str, sha256: str) -> Path | None:
    """The kept pose file, or None when the batch did not keep one."""
    p = kept_pose_path(out, backend, sha256)
    return p if p.is_file() else None


def merge_kept_poses(shard: str | Path, out: str | Path) -> int:
    """Copy a shard folder's kept poses into ``out`` (those not there yet, each by rename, so a
    file is whole or absent); returns how many were copied."""
    src, dest = Path(shard) / POSES, Path(out) / POSES
    if not src.is_dir():
        return 0
    n = 0
    for f in sorted(src.glob("*.npz")):
        target = dest / f.name
        if target.is_file():
            continue  # content addressed: the same name is the same pose
        dest.mkdir(parents=True, exist_ok=True)
        tmp = dest / f".{f.name}.{uuid.uuid4().hex[:8]}.part"
        try:
            shutil.copyfile(f, tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        n += 1
    return n
