"""Package discovery for setuptools; everything else is declared in pyproject.toml.

Only what pyproject.toml cannot say lives here: the shipped model files stay in the repository's
``models/`` (where ``mam train --out models/NAME``, ``python -m export onnx`` and
``recipes/demo_weights.py`` write) and enter the wheel as the package data ``mam/_shipped/``, so an
installed wheel screens without a checkout (``mam.shipped``). pyproject.toml's package-data says
which of those files ship.
"""

from setuptools import find_namespace_packages, setup

setup(
    packages=find_namespace_packages(include=["mam*", "service*"]) + ["mam._shipped"],
    package_dir={"mam._shipped": "models"},
)
