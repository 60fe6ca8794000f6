"""TensorRT engines built from the exported ONNX files on the machine that runs them.

One builder (``build_engine``: batch profile on axis 0, FP16 by feature detection) and one cache
(``cached_engine``, keyed by TensorRT version, GPU, ONNX sha256, precision and profile) serve the
MAM clip network and the pose networks. TensorRT is not installable from PyPI here: everything is
behind ``import_tensorrt`` and its tests skip without it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
from pathlib import Path

import numpy as np

from mam.files import write_atomic
from mam.model.weights import sha256_of
from mam.runtime.base import DEFAULT_MAX_BATCH, Precision
from mam.runtime.sessions import RuntimeUnavailable
from mam.settings import current

logger = logging.getLogger(__name__)

ENV_ENGINE_CACHE = "MAM_ENGINE_CACHE"


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise RuntimeUnavailable(
            "tensorrt is not installed (NVIDIA GPU machines only: pip install tensorrt)"
        ) from e
    return trt


def engine_cache_dir() -> Path:
    """``MAM_ENGINE_CACHE`` or ``~/.cache/mam/engines``: engines are built where they run."""
    return current().engine_cache or Path.home() / ".cache" / "mam" / "engines"


def engine_cache_key(
    *,
    trt_version: str,
    gpu_name: str,
    onnx_sha256: str,
    precision: str,
    profile: tuple[int, int, int],
) -> str:
    """Short hex key of everything that makes an engine unusable elsewhere: TensorRT version,
    GPU model, the ONNX file, the precision asked and the (min, opt, max) batch profile."""
    parts = {
        "tensorrt": trt_version,
        "gpu": gpu_name.strip(),
        "onnx_sha256": onnx_sha256,
        "precision": precision,
        "profile": list(profile),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def gpu_name() -> str:
    """Name of CUDA device 0 (torch if present, else nvidia-smi); ``RuntimeUnavailable`` if none."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError) as e:
        raise RuntimeUnavailable("no CUDA GPU found") from e


def _fp16_network_bytes(onnx_path: Path) -> bytes | None:
    """TensorRT 11 has no FP16 builder flag (networks are strongly typed): the precision must be
    in the graph. ModelOpt AutoCast converts it, keeping fp32 inputs and outputs."""
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except ImportError:
        return None
    proto = convert_to_mixed_precision(
        onnx_path=str(onnx_path), low_precision_type="fp16", keep_io_types=True
    )
    return proto.SerializeToString()


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    *,
    input_name: str,
    input_shape: list,
    profile: tuple[int, int, int],
    precision: Precision = "fp16",
    workspace_bytes: int = 4 << 30,
) -> str:
    """Build one engine with a batch profile ``(min, opt, max)`` on axis 0; returns the precision
    actually built. FP16 by feature detection: ``BuilderFlag.FP16`` where it exists (TensorRT
    10), an AutoCast fp16 graph where it does not (TensorRT 11), else fp32 with a warning."""
    trt = import_tensorrt()
    log = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(log)
    data = onnx_path.read_bytes()
    built = "fp32"
    fp16_flag = getattr(trt.BuilderFlag, "FP16", None)
    if precision == "fp16" and fp16_flag is None:
        converted = _fp16_network_bytes(onnx_path)
        if converted is None:
            logger.warning(
                "TensorRT %s has no FP16 flag and ModelOpt is absent: fp32", trt.__version__
            )
        else:
            data, built = converted, "fp16"
    flags = 0
    if int(trt.__version__.split(".")[0]) < 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, log)
    if not parser.parse(data):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeUnavailable(f"TensorRT could not parse {onnx_path.name}: {errs}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if precision == "fp16" and fp16_flag is not None:
        config.set_flag(fp16_flag)
        built = "fp16"
    rest = tuple(int(d) for d in input_shape[1:])
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(input_name, *[(n, *rest) for n in profile])
    config.add_optimization_profile(opt_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeUnavailable(f"TensorRT failed to build an engine from {onnx_path.name}")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    # Replicas sharing the cache never read half an engine, nor rename each other's.
    write_atomic(engine_path, bytes(serialized))
    return built


def cached_engine(
    onnx_path: Path,
    stem: str,
    *,
    input_name: str,
    input_shape: list,
    profile: tuple[int, int, int],
    precision: Precision = "fp16",
    cache_dir: Path | None = None,
    onnx_sha256: str | None = None,
    force: bool = False,
) -> tuple[Path, dict]:
    """``cache/<stem>.<key>.engine`` and its sidecar record, built on first use: the one engine
    cache of every network (MAM clip network, BlazePose landmarks, HRNet). The key holds all
    that makes an engine unusable elsewhere (``engine_cache_key``)."""
    trt = import_tensorrt()
    sha = onnx_sha256 or sha256_of(onnx_path)
    gpu = gpu_name()
    key = engine_cache_key(
        trt_version=trt.__version__, gpu_name=gpu, onnx_sha256=sha, precision=precision,
        profile=profile,
    )  # fmt: skip
    engine = (cache_dir or engine_cache_dir()) / f"{stem}.{key}.engine"
    info_path = engine.with_suffix(".json")
    if engine.is_file() and info_path.is_file() and not force:
        logger.info("TensorRT engine from cache: %s", engine)
        return engine, json.loads(info_path.read_text())
    logger.info("building TensorRT engine %s (profile %s, %s)", engine.name, profile, precision)
    built = build_engine(onnx_path, engine, input_name=input_name, input_shape=input_shape,
                         profile=profile, precision=precision)  # fmt: skip
    info = {
        "tensorrt": trt.__version__,
        "gpu": gpu,
        "onnx": onnx_path.name,
        "onnx_sha256": sha,
        "precision_asked": precision,
        "precision_built": built,
        "profile": list(profile),
    }
    write_atomic(info_path, (json.dumps(info, indent=2) + "\n").encode())
    return engine, info


def build_engines(
    manifest: str | Path,
    *,
    cache_dir: Path | None = None,
    opt_batch: int = DEFAULT_MAX_BATCH,
    max_batch: int = DEFAULT_MAX_BATCH,
    precision: Precision = "fp16",
    force: bool = False,
) -> dict[str, Path]:
    """Engines for the clip network of an ONNX export (``NAME.onnx.json``), from the cache when
    the key matches; returns ``{"clip": engine path}``. The bag head and Info branch are too small
    to gain from TensorRT and run on ONNX Runtime CPU."""
    if not 1 <= opt_batch <= max_batch:
        raise ValueError("need 1 <= opt_batch <= max_batch")
    mpath = Path(manifest)
    m = json.loads(mpath.read_text())
    clip = m["networks"]["clip"]
    onnx_path = mpath.parent / clip["file"]
    if sha256_of(onnx_path) != clip["sha256"]:
        raise RuntimeUnavailable(f"{onnx_path} does not match {mpath}")
    engine, _ = cached_engine(
        onnx_path, f"{m['name']}.clip", input_name=clip["inputs"][0]["name"],
        input_shape=clip["inputs"][0]["shape"], profile=(1, opt_batch, max_batch),
        precision=precision, cache_dir=cache_dir, onnx_sha256=clip["sha256"], force=force,
    )  # fmt: skip
    return {"clip": engine}


class TensorRTEngine:
    """A deserialised engine and one execution context; inputs and outputs are CUDA tensors
    (torch, present on GPU images; a torch-free build would allocate with cuda-python)."""

    def __init__(self, engine_path: Path) -> None:
        trt = import_tensorrt()
        import torch

        self._trt, self._torch = trt, torch
        self._log = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self._log).deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise RuntimeUnavailable(f"could not deserialise {engine_path}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = self.engine.get_tensor_mode
        self.inputs = [n for n in names if mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if mode(n) == trt.TensorIOMode.OUTPUT]

    def __call__(self, **inputs) -> dict:
        """Named CUDA tensors in, dict of CUDA tensors out (enqueued on the current stream)."""
        torch, trt, ctx = self._torch, self._trt, self.context
        keep = []
        for n in self.inputs:
            x = inputs[n].contiguous()
            keep.append(x)
            ctx.set_input_shape(n, tuple(x.shape))
            ctx.set_tensor_address(n, x.data_ptr())
        device = keep[0].device
        outs = {}
        for n in self.outputs:
            np_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(n)))
            dtype = torch.from_numpy(np.empty(0, np_dtype)).dtype
            outs[n] = torch.empty(tuple(ctx.get_tensor_shape(n)), dtype=dtype, device=device)
            ctx.set_tensor_address(n, outs[n].data_ptr())
        if not ctx.execute_async_v3(torch.cuda.current_stream(device).cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        return outs
