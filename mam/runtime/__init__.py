"""One inference interface for the MAM model, whatever runs it (``base``), one session factory
(``sessions``), one network runner (``networks``: ONNX Runtime, TensorRT or PyTorch, chunked over
the batch axis; the clip network and every pose network run through it), and the backends: ONNX
Runtime, TensorRT, eager PyTorch. Importing the package registers the backends without importing
onnxruntime, tensorrt or torch."""

from mam.runtime import onnx_runtime, pytorch_eager, tensorrt_backend  # noqa: F401 (registers)
from mam.runtime.base import (
    CPU_BATCH,
    DEFAULT_MAX_BATCH,
    InferenceRuntime,
    available_backends,
    create_runtime,
    has_current_export,
    load_manifest,
    manifest_path,
    register_backend,
)
from mam.runtime.networks import Network, OrtNetwork, TensorRTNetwork, TorchNetwork
from mam.runtime.sessions import RuntimeUnavailable, ort_session
from mam.runtime.tensorrt_engines import (
    TensorRTEngine,
    build_engine,
    build_engines,
    cached_engine,
    engine_cache_dir,
    engine_cache_key,
    gpu_name,
    import_tensorrt,
)

__all__ = [
    "CPU_BATCH",
    "DEFAULT_MAX_BATCH",
    "InferenceRuntime",
    "Network",
    "OrtNetwork",
    "RuntimeUnavailable",
    "TensorRTEngine",
    "TensorRTNetwork",
    "TorchNetwork",
    "available_backends",
    "build_engine",
    "build_engines",
    "cached_engine",
    "create_runtime",
    "engine_cache_dir",
    "engine_cache_key",
    "gpu_name",
    "has_current_export",
    "import_tensorrt",
    "load_manifest",
    "manifest_path",
    "ort_session",
    "register_backend",
]
