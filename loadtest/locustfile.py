"""Locust scenarios for the screening service; one User class per scenario, each task tagged.

    locust -f loadtest/locustfile.py --headless -u 8 -r 8 -t 60s --host http://127.0.0.1:3000 \
        TensorsUser                      # or: --tags tensors | video | grpc

- ``TensorsUser`` (tag ``tensors``): ``POST /screen_instances``, one infant's bag of instance
  tensors as ``.npy`` multipart, with infant data (request name ``POST /screen_instances``).
- ``VideoUser`` (tag ``video``): the demo recording through ``/screen/submit``, polling
  ``/screen/status`` until done, then ``/screen/get``; the whole exchange is one more request
  event named ``video end-to-end`` (its latency is what a clinician waits).
- ``GrpcUser`` (tag ``grpc``): KServe v2 ``ModelInfer`` of model ``mam`` with the same bags,
  reported as ``grpc ModelInfer``.

Payloads are real infant motion (``loadtest/payloads.py``). Every request carries, in its
context, ``clips`` (instances scored) and, for the custom events, ``status`` (HTTP-like; gRPC
codes mapped so that only the service's ``overloaded`` counts as a 503). Settings come from the
environment: ``MAM_API_KEY`` (sent as ``Authorization: Bearer``), ``MAM_GRPC_TARGET`` (default:
the ``--host``'s address, port 8001), ``LOADTEST_BAGS`` (distinct bags, 8),
``LOADTEST_INSTANCES`` (cap per request; default: the whole bag), ``LOADTEST_POLL_S`` (1),
``LOADTEST_ALLOW_REMOTE=1`` to target a non-loopback host (refused otherwise) and
``LOADTEST_NO_BACKOFF=1`` to resend at once after a 503 instead of honouring Retry-After.
"""

from __future__ import annotations

import itertools
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # at 1: locust drops sys.path[0] (its own entry) after the import
    sys.path.insert(1, str(ROOT))

import gevent  # noqa: E402
from locust import FastHttpUser, User, constant, events, tag, task  # noqa: E402

from loadtest.payloads import (  # noqa: E402
    DEMO_VIDEO,
    INFANT,
    INFANT_VECTOR,
    Payloads,
    encode_multipart,
    is_loopback,
    load_payloads,
)
from loadtest.summary import grpc_status  # noqa: E402

TENSORS = "POST /screen_instances"
VIDEO = "video end-to-end"
GRPC = "grpc ModelInfer"


@dataclass
class Config:
    api_key: str = os.environ.get("MAM_API_KEY", "")
    grpc_target: str = os.environ.get("MAM_GRPC_TARGET", "")
    bags: int = int(os.environ.get("LOADTEST_BAGS", "8"))
    instances: int | None = int(os.environ.get("LOADTEST_INSTANCES") or 0) or None
    poll_s: float = float(os.environ.get("LOADTEST_POLL_S", "1"))
    video_timeout_s: float = 3600.0
    allow_remote: bool = os.environ.get("LOADTEST_ALLOW_REMOTE") == "1"
    # After a 503 a user waits Retry-After (1 s if absent) x uniform(0.5, 1.5), as the service
    # asks and mam.batch.service_client does; LOADTEST_NO_BACKOFF=1 resends at once (a
    # hammering client).
    backoff: bool = os.environ.get("LOADTEST_NO_BACKOFF") != "1"


CONFIG = Config()
_cache: dict[str, object] = {}
_grpc_patched = []  # grpcio's gevent integration, once per process
_user_ids = itertools.count()


def configure(**kw) -> None:
    """Override settings (the sweep does, before any user starts); drops built payloads."""
    for k, v in kw.items():
        if not hasattr(CONFIG, k):
            raise AttributeError(k)
        setattr(CONFIG, k, v)
    _cache.clear()


def payloads() -> Payloads:
    """Built once per process, on first use, shared by all users."""
    if "payloads" not in _cache:
        p = load_payloads(CONFIG.bags, CONFIG.instances)
        print(f"payload: {p.describe()}", flush=True)
        _cache["payloads"] = p
    return _cache["payloads"]  # type: ignore[return-value]


def auth_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {CONFIG.api_key}"} if CONFIG.api_key else {}


def grpc_target(host: str | None) -> str:
    if CONFIG.grpc_target:
        return CONFIG.grpc_target
    parts = urlsplit(host or "http://127.0.0.1")
    name = parts.hostname or "127.0.0.1"
    return f"[{name}]:8001" if ":" in name else f"{name}:8001"


def fire(environment, kind: str, name: str, t0: float, start: float, status: int, clips: int,
         exception: BaseException | None) -> None:  # fmt: skip
    """Report a custom request (video flow, gRPC) the way locust's HTTP clients do."""
    environment.events.request.fire(
        request_type=kind,
        name=name,
        response_time=(time.perf_counter() - t0) * 1000,
        response_length=0,
        response=None,
        context={"status": status, "clips": clips},
        exception=exception,
        start_time=start,
        url=None,
    )


def poisson_pacing(rate_per_user: float):
    """A ``wait_time`` giving each user Poisson arrivals at ``rate_per_user`` (scheduled from the
    previous arrival, not from the end of the request; never bursting to catch up). Locust's
    ``constant_throughput`` would make users that started together fire together, in bursts,
    which is not the load that "50% of capacity" means."""

    def wait_time(user) -> float:
        now = time.monotonic()
        due = getattr(user, "_next_arrival", now) + random.expovariate(rate_per_user)
        user._next_arrival = max(due, now)
        return max(0.0, due - now)

    return wait_time


def back_off(retry_after: str | None) -> None:
    """Pause this user after a 503 (see ``Config.backoff``); the pause is not a request."""
    if CONFIG.backoff:
        try:
            base = max(float(retry_after or 1.0), 0.0)
        except ValueError:
            base = 1.0
        gevent.sleep(base * random.uniform(0.5, 1.5))


class Failure(Exception):
    """A failed exchange; the message starts with the status, as locust's failure table shows."""


def _remote_targets(environment) -> list[str]:
    hosts = [environment.host or "", grpc_target(environment.host)]
    return [] if CONFIG.allow_remote else [h for h in hosts if h and not is_loopback(h)]


@events.init.add_listener
def _refuse_remote_at_start(environment, **_kw) -> None:
    """Loopback only: the command line's ``--host`` is known here, before any user starts."""
    if bad := _remote_targets(environment):
        print(f"refusing non-loopback target(s) {bad}; LOADTEST_ALLOW_REMOTE=1 allows them",
              file=sys.stderr, flush=True)  # fmt: skip
        raise SystemExit(2)


@events.test_start.add_listener
def _refuse_remote_per_test(environment, **_kw) -> None:
    """The web UI can change the host per test: stop such a test as soon as it starts."""
    if bad := _remote_targets(environment):
        print(f"refusing non-loopback target(s) {bad}", file=sys.stderr, flush=True)
        if environment.runner is not None:
            gevent.spawn_later(0, environment.runner.stop)


class TensorsUser(FastHttpUser):
    """(a) REST tensors-in: one bag per request, users spread over the distinct bags."""

    wait_time = constant(0)  # closed loop: concurrency = users
    network_timeout = 900.0  # let the service time out (504), not the client
    connection_timeout = 60.0

    def on_start(self) -> None:
        self.i = next(_user_ids)

    @tag("tensors")
    @task
    def screen_instances(self) -> None:
        p = payloads()
        body, ctype = p.multipart(self.i)
        n = len(p.bags[self.i % len(p.bags)])
        self.i += 1
        headers = {"Content-Type": ctype, **auth_headers()}
        with self.client.post("/screen_instances", data=body, headers=headers, name=TENSORS,
                              context={"clips": n}, catch_response=True) as r:  # fmt: skip
            if r.status_code == 200 and b'"risk_probability"' not in (r.content or b""):
                r.failure("200 without a result")
        if r.status_code == 503:
            back_off(r.headers.get("retry-after"))


class VideoUser(FastHttpUser):
    """(b) REST video-in as a task: submit, poll, get; one ``video end-to-end`` event each."""

    wait_time = constant(0)
    network_timeout = 900.0
    connection_timeout = 60.0

    @staticmethod
    def body() -> tuple[bytes, str]:
        if "video" not in _cache:
            import json

            parts = [("video", "recording.mp4", "video/mp4", DEMO_VIDEO.read_bytes()),
                     ("infant", None, None, json.dumps(INFANT).encode())]  # fmt: skip
            _cache["video"] = encode_multipart(parts)
        return _cache["video"]  # type: ignore[return-value]

    @tag("video")
    @task
    def screen_video(self) -> None:
        t0, start = time.perf_counter(), time.time()
        try:
            clips = self._screen()
            fire(self.environment, "VIDEO", VIDEO, t0, start, 200, clips, None)
        except Failure as e:
            status = int(str(e).split(" ", 1)[0])
            fire(self.environment, "VIDEO", VIDEO, t0, start, status, 0, e)

    def _screen(self) -> int:
        body, ctype = self.body()
        r = self.client.post("/screen/submit", data=body, name="POST /screen/submit",
                             headers={"Content-Type": ctype, **auth_headers()})  # fmt: skip
        if r.status_code != 200:
            raise Failure(f"{r.status_code or 0} submit: {_text(r)}")
        task_id = r.json()["task_id"]
        deadline = time.monotonic() + CONFIG.video_timeout_s
        while True:
            gevent.sleep(CONFIG.poll_s)
            s = self.client.get(f"/screen/status?task_id={task_id}", name="GET /screen/status",
                                headers=auth_headers())  # fmt: skip
            if s.status_code != 200:
                raise Failure(f"{s.status_code or 0} status: {_text(s)}")
            state = s.json().get("status")
            if state in ("completed", "failed", "canceled"):
                break
            if time.monotonic() > deadline:
                raise Failure(f"0 client gave up after {CONFIG.video_timeout_s:g} s ({state})")
        g = self.client.get(f"/screen/get?task_id={task_id}", name="GET /screen/get",
                            headers=auth_headers())  # fmt: skip
        if state == "completed" and g.status_code == 200:
            return len(g.json()["clips"])
        code = g.status_code if g.status_code and g.status_code >= 400 else 500
        raise Failure(f"{code} task {state}: {_text(g)}")


def _text(r) -> str:
    try:
        return (r.text or "")[:200]
    except Exception:
        return "(no body)"


class GrpcUser(User):
    """(c) KServe v2 ``ModelInfer``: one channel per user (as separate clients have), requests
    built once per bag (raw_input_contents), outcome reported as ``grpc ModelInfer``."""

    wait_time = constant(0)

    def on_start(self) -> None:
        from service.grpc_v2.client import V2Client

        _grpc_gevent()
        self.i = next(_user_ids)
        most = max(len(b) for b in payloads().bags) * 240 * 3 * 17 * 17 * 4 + 2**20
        self.client = V2Client(grpc_target(self.host), timeout=900.0, max_message_bytes=most)
        self.metadata = [("authorization", f"Bearer {CONFIG.api_key}")] if CONFIG.api_key else None

    def on_stop(self) -> None:
        self.client.close()

    @tag("grpc")
    @task
    def model_infer(self) -> None:
        import grpc

        requests, sizes = _grpc_requests()
        k = self.i % len(requests)
        self.i += 1
        t0, start = time.perf_counter(), time.time()
        try:
            out = self.client.infer_request(requests[k], self.metadata)
        except grpc.RpcError as e:
            mam_code = dict(e.trailing_metadata() or ()).get("mam-error-code")
            status = grpc_status(e.code().name, mam_code)
            err = Failure(f"{status} {e.code().name}: {(e.details() or '')[:200]}")
            fire(self.environment, "grpc", GRPC, t0, start, status, 0, err)
            if status == 503:
                back_off(None)
            return
        if not any(o.name == "risk_probability" for o in out.outputs):
            fire(self.environment, "grpc", GRPC, t0, start, 0, 0, Failure("0 OK without a result"))
            return
        fire(self.environment, "grpc", GRPC, t0, start, 200, sizes[k], None)


def _grpc_gevent() -> None:
    """grpcio blocks the whole gevent hub unless told about gevent (once, before any channel)."""
    if not _grpc_patched:
        import grpc.experimental.gevent as grpc_gevent

        grpc_gevent.init_gevent()
        _grpc_patched.append(True)


def _grpc_requests():
    if "grpc" not in _cache:
        from service.grpc_v2.client import make_request

        bags = payloads().bags
        reqs = [make_request("mam", {"instances": b, "infant": INFANT_VECTOR}) for b in bags]
        _cache["grpc"] = (reqs, [len(b) for b in bags])
    return _cache["grpc"]
