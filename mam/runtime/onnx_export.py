"""A torch module -> a checked ONNX file, its ONNX Runtime vs PyTorch parity, and a cache of such
exports made on first use.

Generic, for any one-input, one-output network: the paper route's HRNet and VideoPose3D lifter
are exported here both by ``python -m export pose-networks`` (``export/pose_networks.py``) and,
on a serving machine's first use, into the pose cache (``mam.pose.paper.backend``), so a graph
exported either way is made the same way. Layout after timm ``timm/utils/onnx.py``: named inputs
and outputs, dynamic axes, ``onnx.checker``, parity on a second input shape. It lives in the
package, not in ``export/``, because an installed wheel (which has no ``export/``) exports on
first use too. Needs torch and onnx, imported when called.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from mam.files import write_atomic
from mam.model.weights import sha256_of

logger = logging.getLogger(__name__)

ONNX_OPSET = 18
PARITY_RTOL = 1e-3  # of the largest reference value, plus
PARITY_ATOL = 1e-4


def torch_to_onnx(
    module,
    example: np.ndarray,
    path: Path,
    *,
    input_name: str,
    output_name: str,
    dynamic_axes: dict[int, str],
    opset: int = ONNX_OPSET,
) -> Path:
    """Export a one-input, one-output torch module with named, dynamic axes; ``onnx.checker``.

    The TorchScript exporter is used: the pose networks are plain convolution stacks, it handles
    the lifter's dynamic time axis (whose output length is ``T - receptive_field + 1``) directly,
    and it exports HRNet-W32 in seconds."""
    import io
    import warnings

    import onnx
    import torch

    module = module.eval()
    buf = io.BytesIO()
    axes = {input_name: dynamic_axes, output_name: dict(dynamic_axes)}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notices
        torch.onnx.export(module, (torch.from_numpy(example),), buf, dynamo=False,
                          input_names=[input_name], output_names=[output_name],
                          dynamic_axes=axes, opset_version=opset)  # fmt: skip
    proto = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(proto)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, proto.SerializeToString())  # concurrent first uses are safe


def ort_parity(
    module,
    path: Path,
    examples: Iterable[np.ndarray],
    *,
    rtol: float = PARITY_RTOL,
    atol: float = PARITY_ATOL,
) -> float:
    """Largest ONNX Runtime (CPU) vs PyTorch difference of the module's one output, relative to
    ``atol + rtol * max|torch|``, over ``examples`` (give two shapes); ``ValueError`` when it
    exceeds 1."""
    import torch

    from mam.runtime.sessions import ort_session

    sess = ort_session(path, device="cpu")
    name = sess.get_inputs()[0].name
    worst = 0.0
    for x in examples:
        with torch.inference_mode():
            ref = module.eval()(torch.from_numpy(x)).numpy()
        got = sess.run(None, {name: x})[0]
        if got.shape != ref.shape:
            raise ValueError(f"ONNX output shape {got.shape} != torch {ref.shape}")
        ratio = float(np.abs(got - ref).max() / (atol + rtol * np.abs(ref).max()))
        worst = max(worst, ratio)
    if worst > 1.0:
        raise ValueError(f"ONNX Runtime vs PyTorch parity failed ({worst:.2f} x tolerance)")
    return worst


def _key(sha: str, extra: dict) -> str:
    blob = json.dumps({"sha256": sha, **extra}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def cached_onnx(
    role: str,
    weights: Path,
    build: Callable[[], tuple[object, dict]],
    example_shapes: tuple[tuple[int, ...], tuple[int, ...]],
    *,
    input_name: str,
    output_name: str,
    dynamic_axes: dict[int, str],
    cache_dir: Path,
    weights_sha256: str | None = None,
) -> tuple[Path, dict]:
    """``cache_dir/<role>-<key>.onnx`` (+ ``.json``), keyed by the weights' sha256 and the export
    settings; exported and parity-checked on first use (needs torch), reused afterwards."""
    sha = weights_sha256 or sha256_of(weights)  # callers that already hashed it pass it
    key = _key(sha, {"role": role, "opset": ONNX_OPSET, "shape": list(example_shapes[0])})
    path = cache_dir / f"{role}-{key}.onnx"
    info_path = path.with_suffix(".json")
    if path.is_file() and info_path.is_file():
        try:
            info = json.loads(info_path.read_text())
        except (OSError, ValueError):
            info = {}  # unreadable: stale, exported again below
        if info.get("onnx_sha256") == sha256_of(path):
            return path, info
        logger.warning("cached %s export does not match its record; exporting again", role)
    model, config = build()
    rng = np.random.default_rng(0)
    examples = [rng.standard_normal(s).astype(np.float32) for s in example_shapes]
    t0 = time.perf_counter()
    torch_to_onnx(model, examples[0], path, input_name=input_name, output_name=output_name,
                dynamic_axes=dynamic_axes)  # fmt: skip
    worst = ort_parity(model, path, examples)
    info = {
        "role": role,
        "weights_sha256": sha,
        "config": config,
        "opset": ONNX_OPSET,
        "onnx_sha256": sha256_of(path),
        "parity": {
            "shapes": [list(s) for s in example_shapes],
            "worst_vs_tolerance": worst,
            "rtol": PARITY_RTOL,
            "atol": PARITY_ATOL,
        },  # fmt: skip
    }
    write_atomic(info_path, (json.dumps(info, indent=2) + "\n").encode())
    logger.info("exported %s to ONNX in %.1f s (parity %.3f of tolerance)", role,
                time.perf_counter() - t0, worst)  # fmt: skip
    return path, info
