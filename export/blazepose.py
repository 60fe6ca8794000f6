"""BlazePose networks of the mediapipe wheel -> ONNX in the pose cache, checked against TFLite.

For image builds and init containers (``python -m export blazepose``): converts both networks
(``mam.pose.blazepose.convert``) into ``MAM_POSE_CACHE`` and, where the TFLite interpreter of
``ai-edge-litert`` is installed, compares every kept output on random inputs (a batch of 3
through ONNX Runtime against 3 single TFLite calls). Measured here (2026-11-26): largest
difference about 3e-5 of each output's range.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from mam.pose.blazepose import convert

logger = logging.getLogger(__name__)

PARITY_RTOL = 1e-3  # of the output's largest magnitude (at least 1)


def tflite_parity(model: convert.ConvertedModel, batch: int = 3, seed: int = 0) -> dict[str, float]:
    """Largest |ONNX - TFLite| per output, relative to the output's range; ``{}`` when the
    ``ai-edge-litert`` interpreter is not installed."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        logger.warning("ai-edge-litert not installed: %s not checked against TFLite", model.network)
        return {}
    from mam.runtime.sessions import ort_session

    interp = Interpreter(model_path=str(model.tflite_path))
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]
    details = interp.get_output_details()
    lo = -1.0 if model.network == convert.DETECTOR else 0.0  # the networks' input ranges
    x = np.random.default_rng(seed).uniform(lo, 1.0, size=(batch, *inp["shape"][1:]))
    x = x.astype(np.float32)
    sess = ort_session(model.onnx_path, device="cpu")
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x})))
    worst: dict[str, float] = {}
    for b in range(batch):
        interp.set_tensor(inp["index"], x[b : b + 1])
        interp.invoke()
        for index, name in convert._OUTPUTS[model.network].items():
            ref = interp.get_tensor(details[index]["index"])
            scale = max(float(np.abs(ref).max()), 1.0)  # probabilities: absolute difference
            rel = float(np.abs(got[name][b : b + 1] - ref).max()) / scale
            worst[name] = max(worst.get(name, 0.0), rel)
    return worst


def export_blazepose(cache: Path | None = None, force: bool = False, verify: bool = True) -> dict:
    """Convert both networks; with ``verify``, raise ``RuntimeError`` when an output differs
    from TFLite by more than ``PARITY_RTOL``. Returns paths and the parity figures."""
    report: dict = {}
    for name, model in convert.ensure_all(cache, force).items():
        entry = {"onnx": str(model.onnx_path), "tflite_sha256": model.tflite_sha256}
        if verify:
            parity = tflite_parity(model)
            bad = {k: v for k, v in parity.items() if v > PARITY_RTOL}
            if bad:
                raise RuntimeError(f"{name}: ONNX differs from TFLite beyond {PARITY_RTOL}: {bad}")
            entry["parity_vs_tflite"] = parity
        report[name] = entry
    return report
