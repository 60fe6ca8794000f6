"""``mam serve``: the BentoML service (REST) with the KServe v2 gRPC server beside it.

The process becomes ``bentoml serve`` (``os.execvpe``) rather than starting it as a child: in
Kubernetes ``mam serve`` is the pod's first process, and a SIGTERM (rolling update, a supervisor,
a test's cleanup) must reach the server itself, which then stops taking requests, finishes the
ones in flight and exits with its workers. A child behind ``subprocess.call`` kept running and
holding the ports when ``mam serve`` was killed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mam.cli import options as O
from mam.screening import default_weights

SERVICE_LAUNCHER = "service.launch"  # bentoml serve with the service's patches
SERVICE = "service.app:Screening"
DEMO_BANNER = (
    "mam serve: serving the DEMO weights {name} {version} (digest {digest}), trained on "
    "SIMULATED infants: NOT FOR CLINICAL USE. Serve a site's weights with --weights or "
    "MAM_WEIGHTS, or build them into a bento with `mam build --weights W`."
)


def register(sub) -> None:
    s = sub.add_parser("serve", help="start the screening service (REST + KServe v2 gRPC)")
    O.add_verbose(s)
    s.add_argument("--port", type=int, default=3000, help="REST port (default 3000)")
    s.add_argument("--host", default="127.0.0.1", help="REST bind address (default loopback)")
    s.add_argument("--grpc-port", type=int, default=O.setting("grpc_port"),
                   help="KServe v2 gRPC port (default MAM_GRPC_PORT or 8001; 0: off)")  # fmt: skip
    O.add_weights(s)
    O.add_pose_backend(s)
    s.add_argument("--no-auth", action="store_true", help="no API keys (local development)")
    s.add_argument("--hash-key", metavar="KEY", help="print the MAM_API_KEY_HASHES entry for KEY")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.hash_key is not None:
        from mam.audit import key_digest

        others = args.given - {"hash_key", "verbose"}
        O.reject(args, sorted(others), "--hash-key only prints a digest; nothing is served")
        print(key_digest(args.hash_key))
        return 0
    root = Path(__file__).resolve().parents[2]
    if not (root / "service" / "app.py").is_file():
        raise O.UsageError("the service/ folder is not beside mam/ (run from a checkout)")
    env = dict(os.environ)  # copied for the service (a child process), the options written in
    env["MAM_GRPC_PORT"] = str(args.grpc_port)
    if "host" in args.given:  # gRPC listens where REST does, unless MAM_GRPC_HOST says otherwise
        env.setdefault("MAM_GRPC_HOST", args.host)
    if args.weights:
        env["MAM_WEIGHTS"] = str(args.weights.resolve())
    env["MAM_POSE_BACKEND"] = args.pose_backend
    if args.no_auth:
        env["MAM_AUTH_DISABLED"] = "1"
        print("mam serve: API-key authentication is OFF (--no-auth); local use only",
              file=sys.stderr)  # fmt: skip
    # In the worker's memory: nothing of a task is written to disk (service.bentoml_compat).
    env.setdefault("BENTOML_RESULT_STORE", ":memory:")
    announce_model(Path(env.get("MAM_WEIGHTS") or default_weights()))
    cmd = serve_command(args.port, args.host, root)
    sys.stdout.flush()
    sys.stderr.flush()
    os.chdir(root)  # `python -m` finds service/ in the working folder
    os.execvpe(cmd[0], cmd, env)  # never returns: this process is now the server
    return 0  # pragma: no cover


def serve_command(port: int, host: str, root: Path) -> list[str]:
    """``bentoml serve`` of the service through its launcher, named by module: ``mam`` never
    imports ``service`` (the service depends on ``mam``, not the other way round);
    ``service.process.serve_command`` is this command."""
    return [sys.executable, "-m", SERVICE_LAUNCHER, "serve", SERVICE, "--port", str(port),
            "--host", host, "--working-dir", str(root)]  # fmt: skip


def announce_model(weights: Path) -> None:
    """Say on stderr which model will be served, loudly when it is the demo's (a site must not
    mistake it for its own); ``GET /model`` says the same with ``demo: true``."""
    from mam.model.card import is_demo
    from mam.model.weights import load_meta

    meta = load_meta(weights)[0]  # weights that do not load fail here, before the server starts
    short = (meta.digest or "unknown")[:12]
    if is_demo(weights, meta):
        line = "!" * 78
        text = DEMO_BANNER.format(name=meta.name, version=meta.version, digest=short)
        print(f"{line}\n{text}\n{line}", file=sys.stderr)
    else:
        print(f"mam serve: serving {meta.name} {meta.version} (digest {short})", file=sys.stderr)
