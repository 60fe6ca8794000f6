"""The MAM network, its configuration, weights I/O and the reference-code importer."""

from mam.model.config import MAMConfig
from mam.model.network import MAM

__all__ = ["MAM", "MAMConfig"]
