"""Request payloads for the load tests, from real infant motion.

Each payload is one infant's bag: the longest continuous run of clips of one published folder of
``shared/data/mam_demo_poses.npz`` (real 3D infant motion), stitched, put in the camera-aligned
frame in metres (the units the model's normaliser was fitted in, as the pose pipeline gives
them) and turned into instance tensors exactly as ``mam screen`` does. Bags therefore differ in
length (real recordings do) and in motion, so the server never sees one cached input. Without
``../shared`` the simulator stands in, and ``Payloads.source`` says so.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# The load tests refuse targets other than this machine unless told otherwise.
from mam.remote import is_loopback  # noqa: F401 - re-exported for the locustfile and sweep

ROOT = Path(__file__).resolve().parents[1]
DEMO_VIDEO = ROOT / "demo" / "infant_demo.mp4"
INFANT = {  # plausible, fixed: the info branch runs on every request, as in clinical use
    "sex": "female",
    "gestational_age_weeks": 34.0,
    "birth_weight_g": 2100,
    "corrected_age_weeks": 12.0,
}
INFANT_VECTOR = np.array([[0.0, 34.0, 2100.0, 12.0]], np.float32)  # = INFANT (sex 1 = male)


def poses_path() -> Path:
    """``$MAM_DEMO_POSES``, else ``shared/data/mam_demo_poses.npz`` beside the repository."""
    return Path(os.environ.get("MAM_DEMO_POSES") or ROOT.parent / "shared/data/mam_demo_poses.npz")


@dataclass
class Payloads:
    bags: list[np.ndarray]  # float32 [N, 240, 3, 17, 17] each
    names: list[str]
    source: str
    real: bool
    _bodies: list[tuple[bytes, str]] = field(default_factory=list, repr=False)

    def describe(self) -> str:
        sizes = [len(b) for b in self.bags]
        mb = sum(b.nbytes for b in self.bags) / len(self.bags) / 2**20
        return (f"{self.source}: {len(self.bags)} bags of {min(sizes)}-{max(sizes)} instances "
                f"(mean {np.mean(sizes):.1f}, {mb:.1f} MB per request)")  # fmt: skip

    def multipart(self, i: int) -> tuple[bytes, str]:
        """(body, content type) of ``POST /screen_instances`` for bag ``i``, encoded once: the
        client's CPU is shared with the server, so it must not re-encode per request."""
        if not self._bodies:
            self._bodies = [multipart_instances(b) for b in self.bags]
        return self._bodies[i % len(self.bags)]


def multipart_instances(tensors: np.ndarray, infant: dict | None = INFANT) -> tuple[bytes, str]:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(tensors, np.float32), allow_pickle=False)
    parts = [("instances", "instances.npy", "application/octet-stream", buf.getvalue())]
    if infant is not None:
        parts.append(("infant", None, None, json.dumps(infant).encode()))
    return encode_multipart(parts)


def encode_multipart(parts) -> tuple[bytes, str]:
    """``parts``: (field, filename or None, content type or None, data) -> (body, content type)."""
    boundary = "mam-loadtest-" + os.urandom(8).hex()
    out = bytearray()
    for name, filename, ctype, data in parts:
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'.encode()
        if filename:
            out += f'; filename="{filename}"'.encode()
        out += b"\r\n"
        if ctype:
            out += f"Content-Type: {ctype}\r\n".encode()
        out += b"\r\n" + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


def real_bags(npz: Path, max_bags: int, max_instances: int | None) -> Payloads:
    from mam.features import build_instances
    from mam.model.weights import load_meta
    from mam.screening import default_weights
    from mam.synth.real_motion import (
        continuous_runs,
        load_clips,
        retarget,
        stitch,
        to_camera_frame,
    )

    meta, _, _ = load_meta(default_weights())
    clips, groups = load_clips(npz)
    runs = []  # one bag per infant folder (Data_derivation / Data_validation), longest first
    for key in sorted(k for k in groups if "/Data_" in k):
        best = max(continuous_runs(clips, groups[key]), key=len)
        if len(best) >= 4:  # >= 16.8 s: at least 3 instances at the model's step
            runs.append((len(best), key, best))
    runs.sort(key=lambda r: (-r[0], r[1]))
    bags, names = [], []
    for _, key, run in runs[:max_bags]:
        joints = retarget(to_camera_frame(stitch(clips, run)))  # metres, as the pipeline gives
        inst = build_instances(joints, meta.normalizer, step=meta.clip_step).tensors
        bags.append(inst[:max_instances].astype(np.float32))
        names.append(key.removeprefix("group:prepared_data/"))
    return Payloads(bags, names, f"real infant motion ({npz})", True)


def simulated_bags(max_bags: int, max_instances: int | None) -> Payloads:
    from tests.service_helpers import simulated

    cats = ["continuous", "intermittent", "absent"]
    bags, names = [], []
    for i in range(max_bags):
        cat = cats[i % len(cats)]
        bags.append(simulated(cat, 100 + i, duration_s=40.0)[2][:max_instances].astype(np.float32))
        names.append(f"simulated/{cat}/{100 + i}")
    return Payloads(bags, names, "SIMULATED infant motion (no ../shared/data; not real clips)",
                    False)  # fmt: skip


def load_payloads(max_bags: int = 8, max_instances: int | None = None) -> Payloads:
    """Real bags when the shared poses exist, else simulated ones (``.real`` is False)."""
    npz = poses_path()
    if npz.is_file():
        return real_bags(npz, max_bags, max_instances)
    return simulated_bags(max_bags, max_instances)
