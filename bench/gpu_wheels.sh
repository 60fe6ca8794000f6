#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with what bench/gpu_run.sh needs on a lent GPU machine that the
# machine's image lacks, for python 3.12 manylinux x86_64 (the image has torch, onnxruntime,
# numpy 2, opencv, onnx, flatbuffers, httpx, tqdm, scikit-learn, matplotlib, pytest):
#   wheels: av, pydantic, pydantic-core, annotated-types, typing-inspection, pydicom, tflite
#   .whl/mediapipe_stub/: the two BlazePose tflite files of the mediapipe wheel installed here, in
#     the layout mam.pose.blazepose.convert finds them (mediapipe itself pins numpy < 2 and
#     is ~36 MB; the onnx backend needs only these files, converted on the machine).
# Run here, in the repository root:  bash bench/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-/work/venv/bin/python}
WHEELS=(
  "av==18.1.1" "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0"
  "typing-inspection==0.4.5" "pydicom==3.0.2" "tflite==2.18.0"
)
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "${WHEELS[@]}"
"$PY" - <<'PYEOF'
import shutil
from pathlib import Path

from mam.pose.blazepose.convert import DETECTOR, LANDMARK, tflite_path

stub = Path(".whl/mediapipe_stub/mediapipe")
stub.mkdir(parents=True, exist_ok=True)
(stub / "__init__.py").write_text('"""BlazePose tflite files only (bench/gpu_wheels.sh)."""\n')
for net in (DETECTOR, LANDMARK):
    src = tflite_path(net)
    dest = stub / "modules" / src.parent.name / src.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
PYEOF
ls -la .whl .whl/mediapipe_stub/mediapipe/modules/*
du -sh .whl
