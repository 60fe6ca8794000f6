"""Regenerate the Python stubs of ``grpc_predict_v2.proto``: ``python -m service.grpc_v2.generate``.

The proto is compiled with the repository root as include path, so the generated ``_pb2_grpc``
module imports ``from service.grpc_v2 import grpc_predict_v2_pb2`` and works as a package
without hand edits. The version guard exists because stubs are tied to a protobuf runtime: the
project must stay on protobuf 4.25 (mediapipe pins it) and only grpcio-tools 1.62.x emits code
for that runtime.
"""

from __future__ import annotations

import sys
from importlib import metadata, resources
from pathlib import Path

REQUIRED_TOOLS = "1.62."
PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parents[1]
PROTO = PACKAGE_DIR / "grpc_predict_v2.proto"
OUTPUTS = ("grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2.pyi", "grpc_predict_v2_pb2_grpc.py")


def check_tools_version() -> str:
    """Return the installed grpcio-tools version, or exit explaining why it must be 1.62.x."""
    try:
        version = metadata.version("grpcio-tools")
    except metadata.PackageNotFoundError:
        sys.exit("grpcio-tools is not installed: pip install 'grpcio-tools==1.62.3'")
    if not version.startswith(REQUIRED_TOOLS):
        sys.exit(
            f"grpcio-tools {version} found, 1.62.x required: newer releases emit stubs that "
            "demand protobuf >= 5/7, but mediapipe pins protobuf 4.25 in this project."
        )
    return version


def generate() -> list[Path]:
    """Run protoc (bundled with grpcio-tools) and return the files it wrote."""
    check_tools_version()
    from grpc_tools import protoc  # imported late: only after the version check passed

    well_known = resources.files("grpc_tools") / "_proto"
    rel_proto = PROTO.relative_to(REPO_ROOT).as_posix()
    args = [
        "grpc_tools.protoc",
        f"-I{REPO_ROOT}",
        f"-I{well_known}",
        f"--python_out={REPO_ROOT}",
        f"--pyi_out={REPO_ROOT}",
        f"--grpc_python_out={REPO_ROOT}",
        str(PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {rel_proto}")
    return [PACKAGE_DIR / name for name in OUTPUTS]


def main() -> None:
    for path in generate():
        sys.stdout.write(f"wrote {path.relative_to(REPO_ROOT)}\n")


if __name__ == "__main__":
    main()
