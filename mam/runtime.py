"""One inference interface for the MAM networks, whatever runs them.

A runtime answers three calls on numpy arrays (names and shapes as in ``export.onnx``):

* ``clip(instances [N, 240, 3, 17, 17]) -> (clip_features [N, D], clip_logits [N, 2])``
* ``bag(clip_logits [1, K, 2]) -> (bag_probs [1, 2], attention [1, K])``
* ``info(info [B, 4] normalised) -> info_logits [B, 2]``

and says what it is: ``backend``, ``device``, ``precision`` and ``details`` (providers, threads,
engine files, why a backend was skipped). Backends are registered by name (timm's
``@register_model``); asking for one falls back down ``tensorrt -> onnxruntime -> pytorch``
until one starts, and the log says what was chosen and why:

* ``tensorrt``: the clip network as a TensorRT engine built on this machine from the exported
  ONNX file (cached by TensorRT version, GPU name, ONNX sha256, precision and batch profile);
  the tiny bag head and Info branch run on ONNX Runtime CPU.
* ``onnxruntime``: the exported ONNX files; providers TensorRT -> CUDA -> CPU, whichever this
  onnxruntime build has (``device="cpu"`` pins CPU).
* ``pytorch``: the weights in eager PyTorch; development and training only.

``auto`` (the default) is ``onnxruntime`` when the weights have a current ONNX export beside them
(``NAME.onnx.json`` whose recorded weights hash matches), else ``pytorch``. ``MAM_RUNTIME``
chooses when the caller does not. torch is imported by the pytorch backend (and by the
tensorrt backend, which uses it for CUDA buffers) only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np

from mam.errors import ModelLoadError
from mam.model.weights import load_meta, sha256_of

logger = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["fp32", "fp16"]

ORDER = ("tensorrt", "onnxruntime", "pytorch")
DEFAULT_MAX_BATCH = 64  # GPU: TensorRT profile max/opt (a 5-minute recording is ~80 clips)
# CPU: clips per ONNX Runtime call. Measured (reference configuration, 2 threads): 108 clips/s
# at 2-4, 78 at 64, where the activations (~4 MB a clip) fall out of cache.
CPU_BATCH = 4
ENV_BACKEND = "MAM_RUNTIME"
ENV_THREADS = "MAM_RUNTIME_THREADS"
ENV_ENGINE_CACHE = "MAM_ENGINE_CACHE"


class RuntimeUnavailable(RuntimeError):
    """A backend cannot start here; the message says why (and what to do)."""


class InferenceRuntime:
    """Base of all backends. Subclasses set the attributes and implement the three calls.

    Args:
        weights: ``NAME.json`` of the weights.
        device: ``auto``, ``cpu`` or ``cuda``.
        precision: ``fp32`` or ``fp16`` (where the backend and device support it).
        max_batch: clips per call of the clip network, larger inputs are split (default:
            ``CPU_BATCH`` on CPU, ``DEFAULT_MAX_BATCH`` on GPU).
        threads: CPU threads (default: ``MAM_RUNTIME_THREADS`` or the CPUs this process may use).
    """

    name: str = "base"

    def __init__(
        self,
        weights: Path,
        *,
        device: Device = "auto",
        precision: Precision = "fp32",
        max_batch: int | None = None,
        threads: int | None = None,
    ) -> None:
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
        if precision not in ("fp32", "fp16"):
            raise ValueError(f"precision must be 'fp32' or 'fp16', got {precision!r}")
        if max_batch is not None and max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.weights = Path(weights)
        self.asked_device: Device = device
        self.asked_precision: Precision = precision
        self.max_batch = max_batch
        self.threads = threads or int(os.environ.get(ENV_THREADS, 0)) or _cpu_count()
        self.backend = self.name
        self.device = "cpu"
        self.precision = "fp32"
        self.details: dict = {}

    # -- the interface ---------------------------------------------------------------------------
    def clip(self, instances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[N, 240, 3, 17, 17]`` float32 -> features ``[N, D]``, logits ``[N, 2]``."""
        x = np.ascontiguousarray(instances, dtype=np.float32)
        if x.ndim != 5:
            raise ValueError(f"instances must be [N, T, C, V, V], got shape {x.shape}")
        b = self.batch()
        parts = [self._clip(x[i : i + b]) for i in range(0, len(x), b)]
        return (
            np.concatenate([p[0] for p in parts]),
            np.concatenate([p[1] for p in parts]),
        )

    def bag(self, clip_logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[B, K, 2]`` -> bag probabilities ``[B, 2]`` (column 1 = normal), attention
        ``[B, K]``."""
        return self._bag(np.ascontiguousarray(clip_logits, dtype=np.float32))

    def info(self, x: np.ndarray) -> np.ndarray:
        """Normalised infant data ``[B, 4]`` -> Info-branch logits ``[B, 2]``."""
        return self._info(np.ascontiguousarray(x, dtype=np.float32))

    def batch(self) -> int:
        """Clips per clip-network call on this backend's device."""
        return self.max_batch or (CPU_BATCH if self.device == "cpu" else DEFAULT_MAX_BATCH)

    def describe(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.details.items() if k != "fallbacks")
        return f"{self.backend} on {self.device} ({self.precision}; {extra})"

    # -- for subclasses --------------------------------------------------------------------------
    def _clip(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _bag(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _info(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError


_BACKENDS: dict[str, type[InferenceRuntime]] = {}


def register_backend(name: str) -> Callable[[type[InferenceRuntime]], type[InferenceRuntime]]:
    """Class decorator: make a backend available to ``create_runtime`` under ``name``."""

    def deco(cls: type[InferenceRuntime]) -> type[InferenceRuntime]:
        cls.name = name
        _BACKENDS[name] = cls
        return cls

    return deco


def available_backends() -> list[str]:
    return list(_BACKENDS)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# -- manifest of the ONNX export -----------------------------------------------------------------
def manifest_path(weights: str | Path) -> Path:
    """``models/NAME.json`` -> ``models/NAME.onnx.json`` (written by ``python -m export onnx``)."""
    p = Path(weights).with_suffix("")
    return p.with_name(p.name + ".onnx.json")


def load_manifest(weights: str | Path, *, verify_files: bool = True) -> tuple[dict, Path]:
    """The ONNX manifest of ``weights`` and its folder; ``RuntimeUnavailable`` when it is missing,
    stale (exported from other weights) or a file does not match its recorded sha256."""
    mpath = manifest_path(weights)
    if not mpath.is_file():
        raise RuntimeUnavailable(f"no ONNX export at {mpath}; run `python -m export onnx`")
    try:
        manifest = json.loads(mpath.read_text())
        networks = manifest["networks"]
        _, _, weights_sha = load_meta(weights)
    except (ValueError, KeyError, TypeError) as e:
        raise RuntimeUnavailable(f"corrupt ONNX manifest {mpath}: {e!r}") from e
    if manifest.get("weights_sha256") != weights_sha:
        raise RuntimeUnavailable(
            f"ONNX export {mpath.name} is stale (made from other weights); "
            "rerun `python -m export onnx`"
        )
    if verify_files:
        for role, net in networks.items():
            f = mpath.parent / net["file"]
            if not f.is_file() or sha256_of(f) != net["sha256"]:
                raise RuntimeUnavailable(f"{role} network {f} is missing or does not match {mpath}")
    return manifest, mpath.parent


def has_current_export(weights: str | Path) -> bool:
    try:
        load_manifest(weights, verify_files=False)
    except (RuntimeUnavailable, ModelLoadError):
        return False
    return True


# -- ONNX Runtime --------------------------------------------------------------------------------
_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise RuntimeUnavailable(
            "onnxruntime is not installed (pip install onnxruntime, or onnxruntime-gpu)"
        ) from e
    return ort


def _ort_cpu_session(ort, path: Path, threads: int):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@register_backend("onnxruntime")
class OnnxRuntimeBackend(InferenceRuntime):
    """The exported graphs on ONNX Runtime. The clip network gets the best provider this build
    has (TensorRT, CUDA, CPU); the bag head and Info branch (a few hundred FLOPs) stay on CPU."""

    def __init__(self, weights: Path, **kw) -> None:
        super().__init__(weights, **kw)
        ort = _import_ort()
        manifest, folder = load_manifest(weights)
        nets = manifest["networks"]
        available = ort.get_available_providers()
        if self.asked_device != "cpu" and "CUDAExecutionProvider" in available:
            # onnxruntime-gpu finds the CUDA/cuDNN libraries of the nvidia-* wheels only once they
            # are loaded (torch does it on import; serving imports no torch): load them here, or
            # the session would quietly fall back to CPU.
            preload = getattr(ort, "preload_dlls", None)
            if preload is not None:
                try:
                    preload()
                except Exception as e:  # noqa: BLE001 - a missing library is reported below
                    logger.warning("onnxruntime could not preload CUDA libraries: %s", e)
        wanted = [] if self.asked_device == "cpu" else [p for p in _GPU_PROVIDERS if p in available]
        if self.asked_device == "cuda" and not wanted:
            raise RuntimeUnavailable(f"device cuda asked, but onnxruntime has only {available}")
        providers: list = []
        for p in wanted:
            if p == "TensorrtExecutionProvider":
                providers.append((p, self._trt_ep_options(nets["clip"], folder)))
            else:
                providers.append(p)
        providers.append("CPUExecutionProvider")
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._clip_sess = ort.InferenceSession(str(folder / nets["clip"]["file"]), so, providers)
        self._bag_sess = _ort_cpu_session(ort, folder / nets["bag"]["file"], 1)
        self._info_sess = _ort_cpu_session(ort, folder / nets["info"]["file"], 1)
        used = self._clip_sess.get_providers()
        self.device = "cuda" if used[0] in _GPU_PROVIDERS else "cpu"
        self.precision = (
            "fp16" if used[0] == "TensorrtExecutionProvider" and self.asked_precision == "fp16"
            else "fp32"
        )  # fmt: skip
        self.details = {
            "onnxruntime": ort.__version__,
            "providers": used,
            "intra_op_threads": self.threads,
            "inter_op_threads": 1,
            "max_batch": self.batch(),
            "opset": manifest.get("opset"),
        }

    def _trt_ep_options(self, clip: dict, folder: Path) -> dict:
        # NOTE: ORT's TensorRT provider builds its own engine; it gets the same N profile.
        name = clip["inputs"][0]["name"]
        rest = "x".join(str(d) for d in clip["inputs"][0]["shape"][1:])
        return {
            "trt_fp16_enable": self.asked_precision == "fp16",
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(engine_cache_dir() / "ort_trt"),
            "trt_profile_min_shapes": f"{name}:1x{rest}",
            "trt_profile_opt_shapes": f"{name}:{self.max_batch or DEFAULT_MAX_BATCH}x{rest}",
            "trt_profile_max_shapes": f"{name}:{self.max_batch or DEFAULT_MAX_BATCH}x{rest}",
        }

    def _clip(self, x):
        feats, logits = self._clip_sess.run(None, {"instances": x})
        return feats, logits

    def _bag(self, logits):
        probs, att = self._bag_sess.run(None, {"clip_logits": logits})
        return probs, att

    def _info(self, x):
        return self._info_sess.run(None, {"info": x})[0]


# -- PyTorch (development) -----------------------------------------------------------------------
@register_backend("pytorch")
class PyTorchBackend(InferenceRuntime):
    """Eager PyTorch on the weights themselves: development, training and reference only."""

    def __init__(self, weights: Path, **kw) -> None:
        super().__init__(weights, **kw)
        try:
            import torch
        except ImportError as e:
            raise RuntimeUnavailable("torch is not installed (pip install 'mam[train]')") from e
        from mam.model.weights import load_weights

        self._torch = torch
        device = self.asked_device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeUnavailable("device cuda asked, but torch sees no CUDA device")
        precision = self.asked_precision
        if precision == "fp16" and device == "cpu":
            logger.warning("fp16 asked on CPU: the pytorch backend runs fp32 there")
            precision = "fp32"
        model, _ = load_weights(weights)
        self._dtype = torch.float16 if precision == "fp16" else torch.float32
        self.model = model.to(device=device, dtype=self._dtype).eval()
        self._device = torch.device(device)
        self.device, self.precision = device, precision
        self.details = {
            "torch": torch.__version__,
            "intra_op_threads": torch.get_num_threads(),
            "max_batch": self.batch(),
        }

    def _run(self, fn, *xs):
        torch = self._torch
        with torch.inference_mode():
            ts = [torch.from_numpy(x).to(self._device, self._dtype) for x in xs]
            out = fn(*ts)
        if isinstance(out, tuple):
            return tuple(o.float().cpu().numpy() for o in out)
        return out.float().cpu().numpy()

    def _clip(self, x):
        return self._run(self.model.forward_clips, x)

    def _bag(self, logits):
        return self._run(self.model.forward_bag, logits)

    def _info(self, x):
        return self._run(self.model.forward_info, x)


# -- TensorRT ------------------------------------------------------------------------------------
def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise RuntimeUnavailable(
            "tensorrt is not installed (NVIDIA GPU machines only: pip install tensorrt)"
        ) from e
    return trt


def engine_cache_dir() -> Path:
    """``MAM_ENGINE_CACHE`` or ``~/.cache/mam/engines``: engines are built where they run."""
    env = os.environ.get(ENV_ENGINE_CACHE)
    return Path(env) if env else Path.home() / ".cache" / "mam" / "engines"


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
    trt = _import_tensorrt()
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
    tmp = engine_path.with_suffix(".tmp")
    tmp.write_bytes(bytes(serialized))
    tmp.replace(engine_path)  # atomic: replicas starting together never read half an engine
    return built


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
    trt = _import_tensorrt()
    mpath = Path(manifest)
    m = json.loads(mpath.read_text())
    clip = m["networks"]["clip"]
    onnx_path = mpath.parent / clip["file"]
    if sha256_of(onnx_path) != clip["sha256"]:
        raise RuntimeUnavailable(f"{onnx_path} does not match {mpath}")
    profile = (1, opt_batch, max_batch)
    key = engine_cache_key(
        trt_version=trt.__version__,
        gpu_name=gpu_name(),
        onnx_sha256=clip["sha256"],
        precision=precision,
        profile=profile,
    )
    cache = cache_dir or engine_cache_dir()
    engine = cache / f"{m['name']}.clip.{key}.engine"
    info = engine.with_suffix(".json")
    if engine.is_file() and info.is_file() and not force:
        logger.info("TensorRT engine from cache: %s", engine)
        return {"clip": engine}
    logger.info("building TensorRT engine %s (profile %s, %s)", engine.name, profile, precision)
    built = build_engine(
        onnx_path,
        engine,
        input_name=clip["inputs"][0]["name"],
        input_shape=clip["inputs"][0]["shape"],
        profile=profile,
        precision=precision,
    )
    info.write_text(
        json.dumps(
            {
                "tensorrt": trt.__version__,
                "gpu": gpu_name(),
                "onnx": clip["file"],
                "onnx_sha256": clip["sha256"],
                "precision_asked": precision,
                "precision_built": built,
                "profile": list(profile),
            },
            indent=2,
        )
    )
    return {"clip": engine}


class TensorRTEngine:
    """A deserialised engine and one execution context; inputs and outputs are CUDA tensors
    (torch, present on GPU images; a torch-free build would allocate with cuda-python)."""

    def __init__(self, engine_path: Path) -> None:
        trt = _import_tensorrt()
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


@register_backend("tensorrt")
class TensorRTBackend(InferenceRuntime):
    """The clip network as a TensorRT engine, built on this machine on first use (or beforehand
    by ``python -m export tensorrt``) and then cached; bag head and Info branch on ORT CPU."""

    def __init__(self, weights: Path, **kw) -> None:
        super().__init__(weights, **kw)
        if self.asked_device == "cpu":
            raise RuntimeUnavailable("TensorRT runs on CUDA devices only; device cpu was asked")
        trt = _import_tensorrt()
        try:
            import torch
        except ImportError as e:
            raise RuntimeUnavailable("the tensorrt backend needs torch for CUDA buffers") from e
        if not torch.cuda.is_available():
            raise RuntimeUnavailable("no CUDA device visible")
        ort = _import_ort()
        manifest, folder = load_manifest(weights)
        engines = build_engines(
            manifest_path(weights),
            opt_batch=self.max_batch or DEFAULT_MAX_BATCH,
            max_batch=self.max_batch or DEFAULT_MAX_BATCH,
            precision=self.asked_precision,
        )
        sidecar = json.loads(engines["clip"].with_suffix(".json").read_text())
        self._torch = torch
        self._engine = TensorRTEngine(engines["clip"])
        nets = manifest["networks"]
        self._bag_sess = _ort_cpu_session(ort, folder / nets["bag"]["file"], 1)
        self._info_sess = _ort_cpu_session(ort, folder / nets["info"]["file"], 1)
        self.device = "cuda"
        self.precision = sidecar["precision_built"]
        self.details = {
            "tensorrt": trt.__version__,
            "gpu": sidecar["gpu"],
            "engine": engines["clip"].name,
            "profile": sidecar["profile"],
            "max_batch": self.batch(),
        }

    def _clip(self, x):
        torch = self._torch
        outs = self._engine(instances=torch.from_numpy(x).to("cuda"))
        torch.cuda.current_stream().synchronize()
        return (
            outs["clip_features"].float().cpu().numpy(),
            outs["clip_logits"].float().cpu().numpy(),
        )

    def _bag(self, logits):
        probs, att = self._bag_sess.run(None, {"clip_logits": logits})
        return probs, att

    def _info(self, x):
        return self._info_sess.run(None, {"info": x})[0]


# -- choosing one --------------------------------------------------------------------------------
def _chain(requested: str, weights: Path) -> list[str]:
    if requested == "auto":
        return ["onnxruntime", "pytorch"] if has_current_export(weights) else ["pytorch"]
    if requested not in _BACKENDS:
        raise ValueError(f"unknown runtime {requested!r}; known: auto, {', '.join(_BACKENDS)}")
    order = [b for b in ORDER if b in _BACKENDS] + [b for b in _BACKENDS if b not in ORDER]
    return order[order.index(requested) :]


def create_runtime(
    weights: str | Path,
    backend: str | None = None,
    *,
    device: Device = "auto",
    precision: Precision = "fp32",
    max_batch: int | None = None,
    threads: int | None = None,
) -> InferenceRuntime:
    """Start the first backend that works, from ``backend`` (or ``MAM_RUNTIME``, or ``auto``)
    down ``tensorrt -> onnxruntime -> pytorch``. ``ModelLoadError`` when none starts.

    Args:
        weights: ``NAME.json`` of the weights; ONNX files are looked for beside it.
        backend: ``auto``, ``tensorrt``, ``onnxruntime`` or ``pytorch``.
        device: ``auto``, ``cpu`` or ``cuda``.
        precision: ``fp32`` or ``fp16`` (GPU backends only; CPU stays fp32).
        max_batch: clips per clip-network call (default 4 on CPU, 64 on GPU; TensorRT: the
            engine profile's opt and max).
        threads: CPU threads for ONNX Runtime.
    """
    weights = Path(weights).with_suffix(".json")
    requested = (backend or os.environ.get(ENV_BACKEND) or "auto").strip().lower()
    chain = _chain(requested, weights)
    reasons: list[str] = []
    for name in chain:
        try:
            rt = _BACKENDS[name](
                weights, device=device, precision=precision, max_batch=max_batch, threads=threads
            )
        except RuntimeUnavailable as e:
            reasons.append(f"{name}: {e}")
            logger.warning("runtime %s unavailable (%s); trying the next one", name, e)
            continue
        rt.details["requested"] = requested
        if reasons:
            rt.details["fallbacks"] = reasons
        why = f"requested {requested}" + (f"; skipped {'; '.join(reasons)}" if reasons else "")
        logger.info("runtime: %s [%s]", rt.describe(), why)
        return rt
    raise ModelLoadError(f"no inference runtime could start: {'; '.join(reasons)}")
