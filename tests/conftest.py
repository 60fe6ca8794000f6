"""Shared fixtures. Data from ``../shared`` (beside the repository) are optional: tests that
need them skip with the reason when the folder is absent. The real infant motion ships with the
package (``mam.shipped.demo_poses``), so its tests run in a clean clone too."""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path

import pytest

from mam.shipped import demo_poses

SHARED = Path(__file__).resolve().parents[2] / "shared"
DEMO_NPZ = demo_poses()
REFERENCE = SHARED / "reference"


# -- GPU markers: ``@pytest.mark.needs_cuda`` / ``@pytest.mark.needs_tensorrt`` skip with the reason
# where the machine lacks them (as torchvision's test/conftest.py does), and mark the test ``gpu``
# so that ``-m gpu`` selects it on a lent GPU machine.
GPU_MARKERS = {
    "needs_cuda": "needs a CUDA device (skipped without one)",
    "needs_tensorrt": "needs TensorRT and a CUDA device (skipped without them)",
}


@cache
def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@cache
def _has_tensorrt() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def pytest_configure(config) -> None:
    for name, text in GPU_MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if any(item.get_closest_marker(name) for name in GPU_MARKERS):
            item.add_marker(pytest.mark.gpu)


def pytest_runtest_setup(item) -> None:
    if item.get_closest_marker("needs_tensorrt") and not _has_tensorrt():
        pytest.skip("tensorrt not installed (NVIDIA GPU machines only)")
    needs_cuda = item.get_closest_marker("needs_cuda") or item.get_closest_marker("needs_tensorrt")
    if needs_cuda and not _has_cuda():
        pytest.skip("no CUDA device (GPU tests run on lent GPU machines)")


@pytest.fixture(scope="session")
def tensorrt_and_cuda() -> bool:
    """Whether TensorRT can build engines here (for a test of the fallback without them)."""
    return _has_tensorrt() and _has_cuda()


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"{what} not found: {path} (the shared/ folder beside the repository)")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _require(SHARED, "shared data folder")


@pytest.fixture(scope="session")
def demo_npz() -> Path:
    """Real infant 3D motion (MAM reference implementation's demo tensors, MIT)."""
    return _require(DEMO_NPZ, "real infant motion")


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """Checkpoints and outputs of the authors' reference code."""
    return _require(REFERENCE, "reference-code outputs")


@pytest.fixture(scope="session")
def prometheus_dir(tmp_path_factory) -> Path:
    """One multi-process metrics folder for every in-process service of the session.

    The service's metric objects are made once per process and write where
    ``PROMETHEUS_MULTIPROC_DIR`` pointed when they were made; a second folder would leave
    ``/metrics`` reading one that nothing writes to.
    """
    return tmp_path_factory.mktemp("prometheus")
