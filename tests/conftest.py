"""Shared fixtures. Data from ``../shared`` (beside the repository) are optional: tests that
need them skip with the reason when the folder is absent. The real infant motion ships with the
package (``mam.shipped.demo_poses``), so its tests run in a clean clone too."""

from __future__ import annotations

from pathlib import Path

import pytest

from mam.shipped import demo_poses

SHARED = Path(__file__).resolve().parents[2] / "shared"
DEMO_NPZ = demo_poses()
REFERENCE = SHARED / "reference"


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
