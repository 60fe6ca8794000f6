"""Shared by the service tests: test data with known truth, the service's environment, and a
service process started by a test (``serving``)."""

from __future__ import annotations

import collections.abc
import contextlib
import io
import json
import os
import socket
from pathlib import Path

import numpy as np

from mam.features import build_instances
from mam.model.weights import load_meta
from mam.pose.base import PoseSequence
from mam.pose.representation import model_input
from mam.screening import default_weights
from mam.synth.motion import simulate_infant

REPO = Path(__file__).resolve().parent.parent
API_KEY = "test-key-not-secret"
INFANT = {
    "sex": "female",
    "gestational_age_weeks": 39.0,
    "birth_weight_g": 3300,
    "corrected_age_weeks": 12.0,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_env(api_key_hash: str, grpc_port: int = 0) -> dict[str, str]:
    """Small limits, so the limit tests stay cheap; a 30 s simulated bag (7 instances) fits."""
    return {
        "MAM_API_KEY_HASHES": api_key_hash,
        "MAM_AUTH_DISABLED": "0",
        "MAM_GRPC_PORT": str(grpc_port),
        "MAM_MAX_UPLOAD_MB": "16",
        "MAM_MAX_INSTANCES": "8",
        "MAM_MAX_BATCH_SIZE": "16",
    }


def server_env(tmp: Path, grpc_port: int = 0, **extra: str | None) -> dict[str, str]:
    """The whole environment of a service process a test starts: this process's, the test
    settings (``service_env``, key ``API_KEY``), a private ``BENTOML_HOME`` and ``TMPDIR`` under
    ``tmp``, no inherited metrics folder; ``extra`` on top (None removes a variable)."""
    from service.settings import hash_key

    (tmp / "tmp").mkdir(parents=True, exist_ok=True)
    env = (
        dict(os.environ)
        | service_env(hash_key(API_KEY), grpc_port)
        | {
            "BENTOML_HOME": str(tmp / "home"),
            "TMPDIR": str(tmp / "tmp"),
            "MAM_MAX_LATENCY_MS": "60000",
            "PROMETHEUS_MULTIPROC_DIR": None,  # the service makes its own
        }
        | extra
    )
    return {k: v for k, v in env.items() if v is not None}


@contextlib.contextmanager
def serving(
    env: dict[str, str],
    log_path: Path,
    command: collections.abc.Callable[[int], list[str]] | None = None,
    *,
    cwd: Path = REPO,
    ready_timeout_s: float = 240.0,
):
    """A service on a free loopback port (``service.process.ServerProcess``: started in a session
    of its own, ready when ``/readyz`` answers 200, stopped after). ``command(port)`` is its argv
    (default: as ``mam serve`` starts it); ``env`` its whole environment (``server_env``); its
    output goes to ``log_path``. One that exits or is not ready in time fails with the log's
    tail."""
    from service.process import ServerProcess, serve_command

    port = free_port()
    argv = (command or serve_command)(port)
    with ServerProcess(port, env, log_path, ready_timeout_s, command=argv, cwd=cwd) as served:
        yield served


def simulated(category: str, seed: int, duration_s: float = 30.0):
    """A simulated infant (ground truth: ``category``) and its instance tensors."""
    infant = simulate_infant(np.random.default_rng(seed), f"t{seed}", category, duration_s)
    meta, _, _ = load_meta(default_weights())
    joints = np.nan_to_num(infant.clean_joints)
    seq = PoseSequence(joints, np.ones(joints.shape[:2], np.float32), source="precomputed")
    x = model_input(seq, meta.representation)  # what the model sees of a pose file
    inst = build_instances(x, meta.normalizer, step=meta.clip_step)
    return infant, joints.astype(np.float32), inst.tensors


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def multipart(field: str, data: bytes, content_type: str, infant: dict | None = None):
    """(files, data) for httpx / starlette's TestClient."""
    files = {field: (f"{field}.bin", data, content_type)}
    return files, ({"infant": json.dumps(infant)} if infant else {})


@contextlib.contextmanager
def in_process_service(tmp: Path, prometheus_dir: Path):
    """``service.app`` imported (or reused) with the test settings and a private ``TMPDIR``;
    the environment is restored after. Yields the module."""
    import importlib
    import os
    import tempfile

    from service.settings import get_settings, hash_key

    env = service_env(hash_key(API_KEY)) | {
        "TMPDIR": str(tmp),
        "BENTOML_HOME": str(tmp / "home"),
        # As under `bentoml serve`: BentoML's /metrics reads the multi-process files.
        "PROMETHEUS_MULTIPROC_DIR": str(prometheus_dir),
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    tempfile.tempdir = None  # pick up TMPDIR: uploads must land only here
    get_settings.cache_clear()
    try:
        yield importlib.import_module("service.app")
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        tempfile.tempdir = None
