"""Files shipped with the package, found the same way in a checkout and in an installed wheel.

- The demo weights, their ONNX export and manifest, the infant lifter and the model card live in
  the repository's ``models/``, the folder where ``recipes/demo_weights.py``, ``mam train --out
  models/NAME`` and ``python -m export onnx`` write. ``setup.py`` maps that folder into the wheel
  as the package data ``mam/_shipped/`` (only the files pyproject.toml's package-data lists), so
  an installed wheel needs no checkout, while a checkout (an editable install, a bento's source)
  keeps reading ``models/`` itself.
- The real infant motion (``mam/synth/data/``, MIT, with its notice) is package data in place.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def models_dir() -> Path:
    """``mam/_shipped`` of an installed wheel, else ``models/`` beside the package."""
    packaged = resources.files("mam") / "_shipped"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "models"


def demo_poses() -> Path:
    """The shipped real infant motion, ``mam/synth/data/mam_demo_poses.npz``."""
    return Path(str(resources.files("mam") / "synth" / "data" / "mam_demo_poses.npz"))
