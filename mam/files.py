"""Writing files that concurrent readers and writers may touch at once.

Batch workers, service threads and replicas sharing a cache folder can write the same file at the
same moment (a converted pose network, an export record, a report page). Each writer writes its own
temporary file beside the target and renames it into place, so a reader sees the old file or the
new one, never half of one, and two writers never write into the same temporary file.
"""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path


def write_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` by rename; returns ``path``."""
    path = Path(path)
    tmp = path.with_name(
        f".{path.name}.{os.getpid()}.{threading.get_ident()}.{uuid.uuid4().hex[:8]}"
    )
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
