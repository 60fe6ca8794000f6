"""Pose estimation: video frames -> 17 Human3.6M joints at 25 fps (``mam.skeleton``).

Backends are chosen by name (``create_backend("mediapipe")``, ``mam screen --pose-backend``,
``MAM_POSE_BACKEND``): ``mediapipe`` (the package), ``onnx`` (the same BlazePose networks in
ONNX, batched) and ``hrnet-videopose3d`` (the paper's route, with a site's HRNet weights).
Importing this package registers them without importing their heavy dependencies; each backend
class declares what callers need to know (``backend_class(name)``: part length, thread option,
runtimes). Users with
their own pose pipeline load its output with :func:`load_pose_file`. Gap filling and the
tracking-quality check are shared by all sources.
"""

from mam.pose import mediapipe_backend  # noqa: F401  (registers "mediapipe"; imports it lazily)
from mam.pose.base import (
    PoseBackend,
    PoseBackendBase,
    PoseSequence,
    available_backends,
    backend_class,
    create_backend,
)
from mam.pose.blazepose import backend as _onnx_backend  # noqa: F401  (registers "onnx"; lazy)
from mam.pose.paper import backend as _paper_backend  # noqa: F401  ("hrnet-videopose3d"; lazy)
from mam.pose.precomputed import load_pose_file
from mam.pose.quality import PoseQuality, assess_quality, check_trackable, fill_gaps

__all__ = [
    "PoseBackend",
    "PoseBackendBase",
    "PoseQuality",
    "PoseSequence",
    "assess_quality",
    "available_backends",
    "backend_class",
    "check_trackable",
    "create_backend",
    "fill_gaps",
    "load_pose_file",
]
