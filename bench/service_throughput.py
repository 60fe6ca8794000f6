"""Clip throughput through the running service against the in-process runtime, in one run.

1. In-process: the runtime the service's ClipModel uses (``mam.runtime.create_runtime``, same
   settings) on batches of 1, 4, 16 and 64 instances; the best is the reference figure.
2. Through the service: ``bentoml serve`` started here (loopback), then 1, 4, 16 and 64
   concurrent clients, each sending requests of ``--instances`` instance tensors (binary ``.npy``
   multipart over REST, or raw_input_contents over KServe v2 gRPC) for ``--seconds``.

Printed per level: clips/s, requests/s, p50/p95 latency, errors, the rows-per-batch distribution
that the batcher produced (from the service's ``mam_batch_rows`` histogram) and the ratio to the
in-process best. Clients run on the same machine and share its cores with the server: on a 2-core
machine that is part of what is measured. Figures, never assertions.

    python bench/service_throughput.py
    python bench/service_throughput.py --protocol grpc --levels 1 16 64 --seconds 20
    python bench/service_throughput.py --network reference   # the paper's size, random weights

``--network reference`` serves the authors' configuration (``MAMConfig.reference()``, about 10x
the demo network's FLOPs) with random weights exported to ONNX in a temporary folder (needs the
export extra): speed does not depend on the weights, and the share of time spent moving bytes
depends on how heavy the network is.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mam.runtime import create_runtime  # noqa: E402
from mam.screening import default_weights  # noqa: E402
from service.process import ServerProcess  # noqa: E402
from tests.service_helpers import free_port, npy_bytes, simulated  # noqa: E402


def reference_weights(folder: Path) -> Path:
    """Random-weight reference-configuration model, saved and exported as a trained one is."""
    import subprocess

    import torch

    from mam.features import Normalizer
    from mam.model.config import MAMConfig
    from mam.model.network import MAM
    from mam.model.weights import ModelMeta, save_weights

    torch.manual_seed(0)
    cfg = MAMConfig.reference()
    summary = {"summary": "random weights: for speed measurements only"}
    meta = ModelMeta(name="reference_random", version="0.0.0", config=cfg,
                     normalizer=Normalizer(), provenance=summary)  # fmt: skip
    js = save_weights(MAM(cfg).eval(), meta, folder / "reference_random")
    subprocess.run([sys.executable, "-m", "export", "onnx", "--weights", str(js), "--no-parity"],
                   check=True, cwd=ROOT, capture_output=True)  # fmt: skip
    return js


def in_process(weights: Path, batches: list[int], seconds: float) -> dict[int, float]:
    engine = create_runtime(weights)
    x = simulated("continuous", 1, duration_s=60.0)[2]
    out = {}
    for b in batches:
        xb = np.resize(x, (b, *x.shape[1:])).astype(np.float32)
        engine.clip(xb)  # warm-up
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            engine.clip(xb)
            n += b
        out[b] = n / (time.perf_counter() - t0)
    print(f"in-process {engine.describe()}")
    return out


def histogram(text: str, name: str) -> dict[float, float]:
    """Cumulative bucket counts of an unlabelled histogram."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "_bucket{"):
            le = line.split('le="')[1].split('"')[0]
            out[float("inf") if le == "+Inf" else float(le)] = float(line.split()[-1])
    return out


def distribution(before: dict, after: dict) -> str:
    prev, parts = 0.0, []
    for le in sorted(after):
        cum = after[le] - before.get(le, 0.0)
        if cum - prev > 0:
            parts.append(f"<={le:g}:{int(cum - prev)}")
        prev = cum
    return " ".join(parts) or "-"


def run_level(make_call, clients: int, seconds: float, per_request: int):
    lat, errors, lock = [], [0], threading.Lock()
    stop = time.perf_counter() + seconds

    def worker():
        call = make_call()
        while time.perf_counter() < stop:
            t = time.perf_counter()
            ok = call()
            dt = time.perf_counter() - t
            with lock:
                if ok:
                    lat.append(dt)
                else:
                    errors[0] += 1

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return len(lat) * per_request / wall, len(lat) / wall, lat, errors[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--seconds", type=float, default=15.0, help="per level")
    p.add_argument("--instances", type=int, default=4, help="instances per request")
    p.add_argument("--protocol", choices=["rest", "grpc"], default="rest")
    p.add_argument("--max-batch", type=int, default=64, help="MAM_MAX_BATCH_SIZE")
    p.add_argument("--network", choices=["demo", "reference"], default="demo")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="mam-bench-"))
    weights = default_weights() if args.network == "demo" else reference_weights(tmp)

    import httpx

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}")  # fmt: skip
    print(f"network: {args.network} ({weights.name})")
    ref = in_process(weights, [1, 4, 16, 64], min(args.seconds, 5.0))
    best_b = max(ref, key=ref.get)
    for b, v in ref.items():
        print(f"in-process batch {b:3d}: {v:8.1f} clips/s")
    print(f"in-process best: {ref[best_b]:.1f} clips/s at batch {best_b}")

    x = simulated("continuous", 1, duration_s=60.0)[2][: args.instances].astype(np.float32)
    body = npy_bytes(x)
    port, gport = free_port(), free_port()
    env = os.environ | {
        "MAM_WEIGHTS": str(weights),
        "MAM_AUTH_DISABLED": "1",
        "MAM_GRPC_PORT": str(gport),
        "MAM_MAX_BATCH_SIZE": str(args.max_batch),
        "MAM_MAX_LATENCY_MS": "600000",  # measure throughput, not shedding
        "BENTOML_HOME": str(tmp / "home"),
        "BENTOML_RESULT_STORE": str(tmp / "tasks.db"),
    }
    with ServerProcess(port, env, tmp / "server.log") as server:
        base = server.base

        def make_rest():
            client = httpx.Client(timeout=600)
            files = {"instances": ("x.npy", body, "application/octet-stream")}
            return lambda: client.post(base + "/screen_instances", files=files).status_code == 200

        def make_grpc():
            from service.grpc_v2.client import V2Client, make_request

            client = V2Client(f"127.0.0.1:{gport}", timeout=600)
            req = make_request("mam", {"instances": x}, outputs=["fms_probability"])

            def call():
                try:
                    client.infer_request(req)
                    return True
                except Exception:
                    return False

            return call

        make = make_rest if args.protocol == "rest" else make_grpc
        run_level(make, 2, 3.0, args.instances)  # warm-up: connections, first batches
        print(f"\nservice ({args.protocol}, {args.instances} instances/request, "
              f"max batch {args.max_batch}), {args.seconds:g} s per level:")  # fmt: skip
        print(f"{'clients':>7} {'clips/s':>8} {'req/s':>7} {'p50 ms':>7} {'p95 ms':>7} "
              f"{'errors':>6} {'vs in-proc':>10}  rows per batch")  # fmt: skip
        for c in args.levels:
            before = histogram(httpx.get(base + "/metrics").text, "mam_batch_rows")
            clips, reqs, lat, errors = run_level(make, c, args.seconds, args.instances)
            after = histogram(httpx.get(base + "/metrics").text, "mam_batch_rows")
            q = statistics.quantiles(lat, n=20) if len(lat) >= 2 else [float("nan")] * 19
            ratio, dist = clips / ref[best_b], distribution(before, after)
            print(f"{c:7d} {clips:8.1f} {reqs:7.1f} {q[9] * 1e3:7.0f} {q[18] * 1e3:7.0f} "
                  f"{errors:6d} {ratio:9.0%}  {dist}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
