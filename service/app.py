"""The BentoML services: ``ClipModel`` (the clip network behind one adaptive batcher) and
``Screening`` (REST, and the process that serves KServe v2 over gRPC and REST).

Why two services: BentoML batches only calls that arrive through HTTP or a ``bentoml.depends``
proxy, never ``self.method()`` calls (DESIGN.md). So every instance, from a recording, a pose
file, a tensors request or a v2 call, goes to ``ClipModel.clip`` through the proxy, and
instances of all concurrent requests share one batcher. Everything else (admission, the video
pool, tasks, the bag head and Info branch, fusion and calibration through the same
:class:`mam.screening.Screener` the CLI uses) is ``service.core.DataPlane``; the endpoints here
are adapters over it, as are ``service.grpc_app`` and ``service.v2_rest``.

Serve with ``mam serve`` or ``bentoml serve service.app:Screening``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Annotated

import bentoml
import numpy as np
from bentoml.validators import ContentType

from mam import dicom_video
from mam.features import CLIP_FRAMES, expand_differences
from mam.model.weights import load_meta
from mam.review.mount import review_from_environment
from mam.runtime import create_runtime
from mam.schemas import InfantData, InstancesResult, ScreeningResult
from service import bentoml_compat as compat
from service import core
from service import errors as E
from service.core import RuntimeInfo, TaskProgress
from service.metrics import get_metrics, watch_agreement
from service.middleware import ServiceMiddleware
from service.packaging import served_weights
from service.settings import get_settings
from service.v2_rest import V2Rest

logger = logging.getLogger("mam.service")
S = get_settings()
compat.apply()  # the BentoML internals this service depends on, version-gated, in one place
S.weights = served_weights(S.weights)  # a bento from `mam build`: the weights it names
AUDIT = S.audit_log()  # one audit trail per process: the middleware's lines and the tasks'
_meta = load_meta(S.weights)[0]
AUDIT.set_model(_meta.name, _meta.version, _meta.digest)  # every audit line names the model


@bentoml.service(
    name="mam_clip",
    workers=S.clip_workers,
    traffic={"timeout": S.request_timeout_s},
)
class ClipModel:
    """The clip network (the FLOPs of MAM) on :mod:`mam.runtime`, batched across requests."""

    def __init__(self) -> None:
        self.runtime = create_runtime(S.weights, S.runtime, device=S.device, precision=S.precision)
        # Warm-up: the first ONNX Runtime / TensorRT call allocates; readiness waits for it.
        self.runtime.clip(np.zeros((1, CLIP_FRAMES, 3, 17, 17), np.float32))
        self.metrics = get_metrics()
        meta, _, _ = load_meta(S.weights)
        self.metrics.model_info.labels(
            name=meta.name,
            version=meta.version,
            digest=meta.digest or "unknown",
            backend=self.runtime.backend,
            precision=self.runtime.precision,
            device=self.runtime.device,
        ).set(1)
        self.ready = True
        logger.info("clip network ready: %s", self.runtime.describe())

    def __is_ready__(self) -> bool:
        return self.ready

    @bentoml.api(
        batchable=True,
        batch_dim=0,
        max_batch_size=S.max_batch_size,
        max_latency_ms=S.max_latency_ms,
    )
    def clip(self, relative: np.ndarray) -> np.ndarray:
        """Instances as positions relative to joint 0, ``[N, 240, 3, 17]`` (``d[..., 0]`` of the
        difference matrices: 17x less to send between processes, expanded here exactly) ->
        ``[N, 3 + D]``: the two clip logits; in column 2 the executed batch's compute seconds
        (so that callers can split their wait into queue and compute without a second
        channel); then the clip embeddings, which the domain check needs."""
        t = time.perf_counter()
        features, logits = self.runtime.clip(expand_differences(relative))
        dt = time.perf_counter() - t
        self.metrics.batch_rows.observe(len(relative))
        self.metrics.compute_seconds.observe(dt)
        out = np.empty((len(logits), 3 + features.shape[1]), np.float32)
        out[:, :2] = logits
        out[:, 2] = dt
        out[:, 3:] = features
        return out

    @bentoml.api
    def describe(self) -> RuntimeInfo:
        e = self.runtime
        return RuntimeInfo(
            backend=e.backend, device=e.device, precision=e.precision, details=e.describe()
        )


def _request_id(ctx: bentoml.Context) -> str | None:
    return ctx.request.scope.get("state", {}).get("request_id")


def _state(ctx: bentoml.Context) -> dict:
    """The request's state, which the middleware reads for the audit line and FHIR answer."""
    return ctx.request.scope.setdefault("state", {})


def _headers(ctx: bentoml.Context) -> dict:
    return {k.lower(): v for k, v in ctx.request.headers.items()}


def _configure_logging() -> None:
    """BentoML configures only its own loggers; give the service's (request ids, no data) a
    handler in the same shape."""
    lg = logging.getLogger("mam.service")
    if not lg.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] [%(name)s] %(message)s"))
        lg.addHandler(h)
        lg.setLevel(logging.INFO)
        lg.propagate = False


async def _answer(ctx: bentoml.Context, where: str, work, uploads: list[Path] | None = None):
    """The one place where a REST endpoint's work becomes its answer: the result, or the error
    envelope of a typed failure (``core.typed_failure``); the uploads (``work`` may append the
    renamed one) deleted either way. BentoML overwrites a returned response's status with
    ``ctx.response.status_code`` when the API takes a context, so it is set there too."""
    rid, uploads = _request_id(ctx), uploads if uploads is not None else []
    try:
        return await work()
    except Exception as e:  # noqa: BLE001 - every failure becomes a typed answer
        err = core.typed_failure(e, rid, where, uploads[-1] if uploads else None)
        response = E.from_exception(err, rid)
        ctx.response.status_code = response.status_code
        return response
    finally:
        for p in set(uploads):
            p.unlink(missing_ok=True)


@bentoml.service(
    name="mam",
    workers=1,  # one process owns the gRPC port; the heavy work runs in threads and ClipModel
    traffic={"timeout": max(S.request_timeout_s, S.task_timeout_s) + 30},
    # BentoML's HTTP metrics label requests with the raw path, so a client probing
    # /patients/<id> would mint label values; ServiceMiddleware meters this service instead
    # (fixed endpoint names). ClipModel keeps BentoML's metrics (its routes are internal).
    metrics={"enabled": False},
)
class Screening:
    """Screening of recordings, pose arrays and instance tensors: the REST adapter over
    ``service.core.DataPlane``, which gRPC and v2 REST share."""

    clip_model = bentoml.depends(ClipModel)

    def __init__(self) -> None:
        self.plane = core.DataPlane(S, AUDIT, self.clip_model)
        self.screener = self.plane.screener
        core.serve(self.plane)
        self._grpc = None

    def __is_ready__(self) -> bool:
        return self.plane.is_ready()

    @bentoml.task
    async def screen(
        self,
        video: Annotated[Path, ContentType("video/*")],
        infant: InfantData | None = None,
        ctx: bentoml.Context = None,
    ) -> ScreeningResult:
        """Screen a recording of an infant lying supine (multipart: ``video``, the file with a
        ``video/*`` type, a DICOM video object too; optional ``infant`` JSON). ``POST /screen``
        answers when done (up to ``MAM_REQUEST_TIMEOUT_S``); ``/screen/submit`` starts a task,
        polled with ``/screen/status``, ``/screen/progress`` and fetched with ``/screen/get``.
        Decision support only, not a diagnosis."""
        task_id, uploads = getattr(ctx.request.state, "task_id", None), [video]

        async def work():
            dicom = dicom_video.is_dicom(video)  # named for what it is, not for the client's
            uploads.append(
                core.neutral_name(video, "recording", ".dcm" if dicom else video.suffix[:8])
            )
            return await self.plane.screen_recording(
                uploads[-1], infant, _headers(ctx), _state(ctx), _request_id(ctx), task_id, dicom,
                None if task_id else ctx.request.is_disconnected,  # a task outlives its client
            )  # fmt: skip

        return await _answer(ctx, "screen", work, uploads)

    @bentoml.api(route="/screen/progress")
    def progress_of(self, task_id: str) -> TaskProgress:
        """Progress of a submitted screening task: stage and frames through pose."""
        return self.plane.progress.get(task_id)

    @bentoml.api
    async def screen_pose(
        self, pose: Path, infant: InfantData | None = None, ctx: bentoml.Context = None
    ) -> ScreeningResult:
        """Screen a precomputed 3D pose (multipart: ``pose``, a ``.npy`` ``[T, 17, 3]`` at 25 fps
        or an ``.npz`` with ``joints`` and optional ``confidence``; optional ``infant``)."""
        uploads = [pose]

        async def work():
            with open(pose, "rb") as f:
                zipped = f.read(8).startswith(b"PK")  # the format's magic, not the whole upload
            uploads.append(core.neutral_name(pose, "pose", ".npz" if zipped else ".npy"))
            return await self.plane.screen_pose_file(
                uploads[-1], infant, _headers(ctx), _state(ctx), _request_id(ctx)
            )

        return await _answer(ctx, "screen_pose", work, uploads)

    @bentoml.api
    async def screen_instances(
        self, instances: Path, infant: InfantData | None = None, ctx: bentoml.Context = None
    ) -> InstancesResult:
        """Score ready-made instance tensors (multipart: ``instances``, a ``.npy`` float32
        ``[N, 240, 3, 17, 17]`` of smoothed, normalised joint differences; optional ``infant``)."""
        work = lambda: self.plane.screen_instances_file(instances, infant, _state(ctx))  # noqa: E731
        return await _answer(ctx, "screen_instances", work, [instances])

    # -- lifecycle --------------------------------------------------------------------------------
    @bentoml.on_startup
    async def _start(self) -> None:
        self.plane.start()
        _configure_logging()
        compat.quiet_request_error_logs()  # BentoML has configured its loggers by now
        if S.grpc_port:
            from service.grpc_app import start_grpc

            self._grpc = await start_grpc(self.plane, S.grpc_host, S.grpc_port)

    @bentoml.on_shutdown
    async def _stop(self) -> None:
        if self._grpc is not None:
            from service.grpc_v2.server import stop_server

            await stop_server(self._grpc, grace=5.0)
        self.plane.close()


def model_document() -> dict | None:
    """The body of ``GET /model`` (``mam.model.card.model_document``); None before the service
    has loaded its model."""
    plane = core.served()
    return None if plane is None else plane.model_document()


class ModelRoute:
    """``GET /model``: which model this service screens with (name, version, digest,
    provenance, intended use, training data, ``demo``). Public like ``/livez``: it holds no
    health data, and clients and operators read it before sending any. In front of the API-key
    middleware, which answers every path it does not know with 404."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") != "/model":
            return await self.app(scope, receive, send)
        from starlette.responses import Response

        if scope.get("method") not in ("GET", "HEAD"):
            resp = E.error_response(E.METHOD_NOT_ALLOWED, "GET /model only")
            resp.headers["allow"] = "GET, HEAD"
        elif (doc := model_document()) is None:
            resp = E.error_response(E.NOT_READY, "the model is still loading")
        else:
            resp = Response(json.dumps(doc, indent=2), media_type="application/json")
        await resp(scope, receive, send)


def _middleware_kwargs() -> dict:
    return {
        "key_hashes": S.key_hashes(),
        "auth_disabled": S.auth_disabled,
        # Multipart framing adds a little to the file itself.
        "max_body_bytes": int(S.max_upload_mb * 2**20) + 64 * 1024,
        "audit": AUDIT,
        "fhir_codes": S.fhir_codes(),
        "body_timeout_s": S.body_timeout_s,
    }


# The clinicians' review app (mam.review), when MAM_REVIEW_DIR names a batch output folder, at
# /review. It has its own login, sessions and CSRF checks (browsers send no API keys), so it is
# added before, i.e. in front of, the API-key middleware; the service's keys may log in to it.
Screening.add_asgi_middleware(ModelRoute)  # first added: in front of the review app and keys
_review = review_from_environment(S.key_hashes())
if _review is not None:
    Screening.add_asgi_middleware(_review[0], **_review[1])
    # Finished reviews feed the clinicians' agreement gauges on /metrics (read at scrape time).
    watch_agreement(_review[1]["mounted"].state.review, S.agreement_window_days)
Screening.add_asgi_middleware(ServiceMiddleware, **_middleware_kwargs())
Screening.add_asgi_middleware(V2Rest)  # last added: behind the keys, limits and metering

__all__ = ["ClipModel", "Screening"]
