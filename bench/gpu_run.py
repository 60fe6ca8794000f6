"""Everything a lent GPU machine is for, in one run of under 5 minutes, figures into ``$OUT``.

Steps, each in its own process with its own time limit, each logged to ``$OUT/<step>.log``:

1. ``setup``: the wheels carried in ``.whl/`` (``bench/gpu_wheels.sh`` fills it here) into
   ``/tmp/site``, the BlazePose tflite files from ``.whl/mediapipe_stub``, the project itself with
   ``--no-deps`` over the image's packages (its numpy is 2.x; the project pins < 2 for mediapipe,
   which the GPU path does not import), then every import the later steps need, naming what is
   missing.
2. ``gpu_tests``: ``pytest -m gpu`` over the test files that carry GPU markers.
3. ``pipeline``: a 5-minute 1080p recording, rendered there in parallel parts (``mam.synth``,
   real-motion background) and joined, screened by ``bench/pipeline.py`` with the pose networks
   on CUDA (``MAM_POSE_DEVICE=cuda``, ``MAM_POSE_RUNTIME=pytorch``).
4. ``clip``: the clip network's throughput, ``bench/clip_throughput.py --device cuda``.

``$OUT/gpu_figures.json`` gathers each step's status, seconds and key figures.

    python3 bench/gpu_run.py             # on the lent machine (carry .whl)
    python bench/gpu_run.py --dry-run    # here, on CPU, in seconds: tiny recording, no install;
                                         # what needs CUDA is skipped with the reason printed

Figures, never assertions: a step that fails is recorded and the next one still runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"
SITE = Path("/tmp/site")
STUB = WHEELS / "mediapipe_stub"
# What the screening path imports beyond the standard library (the image has the rest).
NEEDED = ["numpy", "torch", "onnxruntime", "onnx", "av", "pydantic", "tflite", "cv2", "pydicom",
          "mam.screening", "mam.pose.blazepose.backend", "export.onnx"]  # fmt: skip
GPU_MARKERS = ("needs_cuda", "needs_tensorrt")
# Run in the installed environment: each module of argv imported, what fails named.
CHECK = """
import importlib, json, sys
missing = {}
for m in sys.argv[1:]:
    try:
        importlib.import_module(m)
    except Exception as e:
        missing[m] = f"{type(e).__name__}: {e}"
import numpy, torch
print(json.dumps({"missing": missing, "numpy": numpy.__version__, "torch": torch.__version__,
                  "cuda": torch.cuda.is_available()}))
"""


def log(msg: str) -> None:
    print(f"[gpu_run {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def step(name: str, cmd: list[str], out: Path, env: dict, limit: float) -> dict:
    """Run ``cmd`` with a time limit, its output into ``out/<name>.log``; status and seconds."""
    log(f"{name}: {' '.join(cmd)} (limit {limit:.0f} s)")
    t = time.perf_counter()
    with open(out / f"{name}.log", "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                timeout=limit).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            rc = "timeout"
    text = (out / f"{name}.log").read_text(errors="replace")
    sys.stdout.write(text[-3000:])
    res = {"status": "ok" if rc == 0 else f"failed ({rc})", "seconds": round(time.perf_counter()
           - t, 1)}  # fmt: skip
    log(f"{name}: {res['status']} in {res['seconds']} s")
    return res


def setup(env: dict, out: Path, dry_run: bool) -> dict:
    """Install the carried wheels and the project, then check the imports."""
    py = sys.executable
    lines = []
    if dry_run:
        lines.append("dry run: nothing installed, this environment's packages used")
    else:
        wheels = sorted(str(p) for p in WHEELS.glob("*.whl"))
        if wheels:
            r = subprocess.run([py, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                "--no-compile", "--no-cache-dir", "--upgrade", "--target",
                                str(SITE), *wheels], capture_output=True, text=True)  # fmt: skip
            lines.append(f"wheels: {len(wheels)} -> {SITE} (rc {r.returncode}) {r.stderr[-500:]}")
        else:
            lines.append("wheels: none in .whl/ (run bench/gpu_wheels.sh here and carry .whl)")
        r = subprocess.run([py, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                            "--no-build-isolation", "-e", str(ROOT)], capture_output=True,
                           text=True)  # fmt: skip
        lines.append(f"project --no-deps (rc {r.returncode}) {r.stderr[-500:]}")
        paths = [str(SITE), str(STUB), str(ROOT)]
        env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    r = subprocess.run([py, "-c", CHECK, *NEEDED], capture_output=True, text=True, env=env,
                       cwd=ROOT)  # fmt: skip
    (out / "setup.log").write_text("\n".join(lines) + f"\n{r.stdout}{r.stderr}")
    print("\n".join(lines), flush=True)
    try:
        found = json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"status": "failed", "detail": r.stderr[-2000:]}
    for m, why in found["missing"].items():
        log(f"MISSING import {m}: {why}")
    ok = not found["missing"]
    return {"status": "ok" if ok else "missing imports", **found}


def gpu_test_files() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if any(m in p.read_text() for m in GPU_MARKERS))  # fmt: skip


def _render_part(joints, path: str, width: int, height: int) -> str:
    from mam.synth.render import render_video

    render_video(joints, path, width=width, height=height, preset="veryfast")
    return path


def render_recording(minutes: float, width: int, height: int, dest: Path, parts: int) -> Path:
    """A simulated infant (real-motion background) ``minutes`` long, rendered in ``parts``
    processes and joined by remuxing (no re-encode): one continuous motion, as one file."""
    import av
    import numpy as np

    from mam.synth.backgrounds import load_library
    from mam.synth.motion import SimParams, simulate_infant

    if dest.is_file():
        return dest
    sim = simulate_infant(np.random.default_rng(18), "bench", "intermittent", minutes * 60,
                          SimParams(), background=load_library("external"))  # fmt: skip
    chunks = np.array_split(sim.clean_joints, parts)
    tmp = Path(tempfile.mkdtemp(prefix="gpu_run_"))
    paths = [str(tmp / f"part{k}.mp4") for k in range(len(chunks))]
    with ProcessPoolExecutor(min(parts, os.cpu_count() or 1)) as pool:
        list(pool.map(_render_part, chunks, paths, [width] * parts, [height] * parts))
    dest.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(dest), "w") as out:
        ostream, offset = None, 0
        for p in paths:
            with av.open(p) as inp:
                s = inp.streams.video[0]
                if ostream is None:
                    ostream = out.add_stream_from_template(s)
                end = offset
                for pkt in inp.demux(s):
                    if pkt.dts is None:
                        continue
                    pkt.pts += offset
                    pkt.dts += offset
                    end = max(end, pkt.pts + (pkt.duration or 0))
                    pkt.stream = ostream
                    out.mux(pkt)
                offset = end
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny recording, no install")
    ap.add_argument("--out", type=Path, default=None, help="figures folder (default $OUT)")
    ap.add_argument("--minutes", type=float, default=None, help="recording length")
    args = ap.parse_args(argv)
    out = args.out or Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="gpu_run_out_"))
    out.mkdir(parents=True, exist_ok=True)
    dry = args.dry_run
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    figures: dict = {"dry_run": dry, "steps": {}}
    figures["steps"]["setup"] = found = setup(env, out, dry)
    cuda = bool(found.get("cuda"))
    if not cuda:
        log("no CUDA device visible to torch: GPU rows and GPU tests skip, with the reason")
    py = sys.executable

    files = gpu_test_files()
    figures["steps"]["gpu_tests"] = step(
        "gpu_tests", [py, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
                      *files], out, env, 40 if dry else 75)  # fmt: skip

    minutes = args.minutes or (0.2 if dry else 5.0)
    width, height = (160, 120) if dry else (1920, 1080)
    video = Path(tempfile.gettempdir()) / f"gpu_run_{minutes:g}min_{width}x{height}.mp4"
    t = time.perf_counter()
    try:
        render_recording(minutes, width, height, video, parts=2 if dry else 15)
        figures["render_s"] = round(time.perf_counter() - t, 1)
        log(f"recording: {minutes:g} min {width}x{height} rendered in {figures['render_s']} s")
        penv = dict(env)
        if cuda:
            penv.update(MAM_POSE_DEVICE="cuda", MAM_POSE_RUNTIME="pytorch")
        else:
            log("pipeline: no CUDA, pose on CPU (onnxruntime)")
        figures["steps"]["pipeline"] = step(
            "pipeline", [py, "bench/pipeline.py", str(video)], out, penv, 60 if dry else 120
        )
        text = (out / "pipeline.log").read_text(errors="replace")
        rtf = [ln for ln in text.splitlines() if ln.startswith("real-time factor")]
        if rtf:
            x = float(rtf[-1].split(":")[1].split("x")[0])
            figures["steps"]["pipeline"].update(
                real_time_factor=x, seconds_for_recording=round(minutes * 60 / x, 2)
            )
    except Exception as e:  # a figure missing is reported, the next step still runs
        figures["steps"]["pipeline"] = {"status": f"failed ({type(e).__name__}: {e})"}
        log(f"pipeline: {figures['steps']['pipeline']['status']}")

    clip = [py, "bench/clip_throughput.py", "--seconds", "0.2" if dry else "1.5"]
    if dry:
        clip += ["--models", "demo", "--batches", "2"]
    else:
        clip += ["--device", "cuda", "--models", "reference", "demo", "--batches", "1", "64",
                 "256", "--skip-cpu"]  # fmt: skip
    figures["steps"]["clip"] = step("clip", clip, out, env, 60 if dry else 90)
    figures["total_s"] = round(time.perf_counter() - t0, 1)
    (out / "gpu_figures.json").write_text(json.dumps(figures, indent=1) + "\n")
    log(f"done in {figures['total_s']} s; figures in {out}/gpu_figures.json")
    print(json.dumps(figures))
    return 0 if all(s.get("status") == "ok"
                    for s in figures["steps"].values()) else 1  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
