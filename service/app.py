"""The BentoML services: ``ClipModel`` (the clip network behind one adaptive batcher) and
``Screening`` (REST, the KServe v2 gRPC server, and everything around the model).

Why two services: BentoML batches only calls that arrive through HTTP or a ``bentoml.depends``
proxy, never ``self.method()`` calls (DESIGN.md). So every instance, from a recording, a pose
file, a tensors request or a gRPC call, goes to ``ClipModel.clip`` through the proxy, and
instances of all concurrent requests share one batcher. The tiny bag head and Info branch, and
fusion and calibration, run in ``Screening`` through the same :class:`mam.screening.Screener` the
CLI uses.

Serve with ``mam serve`` or ``bentoml serve service.app:Screening``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Literal

import bentoml
import numpy as np
from bentoml.validators import ContentType
from pydantic import BaseModel, Field

from mam import dicom_video
from mam.audit import key_id
from mam.errors import InvalidPoseError, InvalidTensorError, MamError
from mam.features import CLIP_FRAMES, expand_differences, validate_instances
from mam.model.card import find_card
from mam.model.card import model_document as model_document_of
from mam.model.weights import load_meta, sha256_of
from mam.pose import load_pose_file
from mam.pose.from_video import estimate_video_pose
from mam.review.mount import review_from_environment
from mam.runtime import create_runtime
from mam.schemas import InfantData, InstancesResult, ScreeningResult
from mam.screening import ClipScores, Screener, ScreeningOptions, softmax
from service import bentoml_compat as compat
from service import errors as E
from service import integration as I
from service.admission import get_admission
from service.auth import key_from_headers
from service.metrics import get_metrics, observe_result
from service.middleware import ServiceMiddleware
from service.packaging import served_weights
from service.settings import get_settings
from service.uploads import check_instances_file, check_pose_file

logger = logging.getLogger("mam.service")
S = get_settings()
compat.apply()  # the BentoML internals this service depends on, version-gated, in one place
S.weights = served_weights(S.weights)  # a bento from `mam build`: the weights it names
AUDIT = S.audit_log()  # one audit trail per process: the middleware's lines and the tasks'
_meta = load_meta(S.weights)[0]
AUDIT.set_model(_meta.name, _meta.version, _meta.digest)  # every audit line names the model

INSTANCES_POSE_BACKEND = "none (instances given)"
MAX_INSTANCE_VALUE = 1e4


class RuntimeInfo(BaseModel):
    backend: str
    device: str
    precision: str
    details: str


@bentoml.service(
    name="mam_clip",
    workers=S.clip_workers,
    traffic={"timeout": S.request_timeout_s},
)
class ClipModel:
    """The clip network (the FLOPs of MAM) on :mod:`mam.runtime`, batched across requests."""

    def __init__(self) -> None:
        self.engine = create_runtime(S.weights, S.runtime, device=S.device, precision=S.precision)
        # Warm-up: the first ONNX Runtime / TensorRT call allocates; readiness waits for it.
        self.engine.clip(np.zeros((1, CLIP_FRAMES, 3, 17, 17), np.float32))
        self.metrics = get_metrics()
        meta, _, _ = load_meta(S.weights)
        self.metrics.model_info.labels(
            name=meta.name,
            version=meta.version,
            digest=meta.digest or "unknown",
            backend=self.engine.backend,
            precision=self.engine.precision,
            device=self.engine.device,
        ).set(1)
        self.ready = True
        logger.info("clip network ready: %s", self.engine.describe())

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
        features, logits = self.engine.clip(expand_differences(relative))
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
        e = self.engine
        return RuntimeInfo(
            backend=e.backend, device=e.device, precision=e.precision, details=e.describe()
        )


class _SharedBatcherRuntime:
    """The Screener's runtime inside the service: the clip network through the shared batcher,
    the bag head and Info branch (microseconds) on a local ONNX Runtime CPU session."""

    def __init__(self, local, clip_outputs) -> None:
        self.local, self._clip_outputs = local, clip_outputs
        self.backend, self.device, self.precision = local.backend, local.device, local.precision

    def clip(self, instances: np.ndarray):
        logits, features = self._clip_outputs(instances)
        return features, logits

    def bag(self, logits: np.ndarray):
        return self.local.bag(logits)

    def info(self, x: np.ndarray):
        return self.local.info(x)


class TaskProgress(BaseModel):
    task_id: str
    stage: Literal["unknown", "queued", "pose", "model", "done", "failed"]
    frames_done: int = 0
    frames_total: int = 0
    fraction: float = Field(0.0, ge=0, le=1, description="Of decoding and pose, the slow part.")


class _Progress:
    """Progress of running tasks, bounded; kept in memory only (task ids are random)."""

    def __init__(self, size: int = 4096) -> None:
        self._d: OrderedDict[str, TaskProgress] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def set(self, task_id: str | None, **kw) -> None:
        if not task_id:
            return
        with self._lock:
            p = self._d.pop(task_id, None) or TaskProgress(task_id=task_id, stage="queued")
            self._d[task_id] = p.model_copy(update=kw)
            while len(self._d) > self._size:
                self._d.popitem(last=False)

    def get(self, task_id: str) -> TaskProgress:
        with self._lock:
            return self._d.get(task_id) or TaskProgress(task_id=task_id, stage="unknown")


class _Cancel(threading.Event):
    """The cancel flag of a video job, with why it was set."""

    code, why = E.TIMEOUT, "it ran past its time limit"

    def cancel(self, code: str) -> None:
        self.code = code
        self.why = "its client disconnected" if code == E.CLIENT_CLOSED else self.why
        self.set()


async def _watch_client(request, cancelled: _Cancel, every_s: float = 0.5) -> None:
    """Set ``cancelled`` once the client of ``request`` has disconnected."""
    try:
        while not cancelled.is_set():
            if await request.is_disconnected():
                logger.info("client disconnected; cancelling its recording")
                cancelled.cancel(E.CLIENT_CLOSED)
                return
            await asyncio.sleep(every_s)
    except asyncio.CancelledError:
        raise
    except Exception:  # noqa: BLE001 - a request without a readable channel: nothing to watch
        return


def _request_id(ctx: bentoml.Context) -> str | None:
    return ctx.request.scope.get("state", {}).get("request_id")


def _neutral_name(upload: Path, stem: str, suffix: str = "") -> Path:
    """Uploads keep the client's file name as a suffix; patient names in file names are common,
    so rename before anything can echo it."""
    target = upload.with_name(stem + suffix)
    upload.rename(target)
    return target


def _fail(ctx: bentoml.Context, response):
    """BentoML overwrites a returned response's status with ``ctx.response.status_code`` when the
    API takes a context, so set it there too."""
    ctx.response.status_code = response.status_code
    return response


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


def _failure(ctx: bentoml.Context, rid, exc: Exception, where: str, upload: Path | None = None):
    """The error response of a handler: typed errors as they are (an upload's server path
    replaced), anything else logged with its traceback and answered as internal_error."""
    if isinstance(exc, MamError | E.ServiceError):
        if upload is not None:
            exc.message = _scrub(exc.message, upload)
    else:
        logger.error("request_id=%s unexpected error in %s", rid, where, exc_info=exc)
    return _fail(ctx, E.from_exception(exc, rid))


def _valid_instances(tensors: np.ndarray) -> np.ndarray:
    x = validate_instances(tensors, max_instances=S.max_instances)
    # Normalised joint differences are a few units; values this large come from a broken
    # client and would overflow inside the network.
    if float(np.abs(x).max()) > MAX_INSTANCE_VALUE:
        raise InvalidTensorError(
            f"expected normalised joint differences (|value| <= {MAX_INSTANCE_VALUE:g}); "
            f"received values up to {float(np.abs(x).max()):.3g}"
        )
    return x


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except Exception:
        raise E.ServiceError(
            E.MALFORMED, "'instances' is not a readable .npy array (no pickles)"
        ) from None


def _scrub(message: str, path: Path) -> str:
    return message.replace(str(path), "the uploaded file").replace(path.name, "the uploaded file")


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
    """Screening of recordings, pose arrays and instance tensors, over REST and gRPC."""

    clip_model = bentoml.depends(ClipModel)

    def __init__(self) -> None:
        self.metrics = get_metrics()
        local = create_runtime(S.weights, "onnxruntime", device="cpu", threads=1)
        self.runtime = _SharedBatcherRuntime(local, self._clip_outputs_from_thread)
        options = ScreeningOptions(limits=S.video_limits(), pose_backend=S.pose_backend)
        self.screener = Screener(S.weights, options=options, runtime=self.runtime)
        self.metrics.export_expectations(self.screener.meta)  # the drift alerts' bands
        card = find_card(S.weights, self.screener.meta.name)
        self.card_text = card.read_text(encoding="utf-8", errors="replace") if card else None
        ident = self.screener.model_identity()
        if ident["demo"]:
            logger.warning("serving the DEMO weights %s %s (trained on simulated infants): not for "
                           "clinical use", ident["name"], ident["version"])  # fmt: skip
        logger.info("model %s %s digest %s", ident["name"], ident["version"], ident["digest"])
        _SERVED["screening"] = self
        self.progress = _Progress()
        self._video_pool = ThreadPoolExecutor(S.video_concurrency, thread_name_prefix="video")
        # Fail at start, not on every recording, when the pose backend cannot run here (e.g.
        # hrnet-videopose3d without the site's weights). Made in a video thread, which keeps it
        # for its first recording (conversions and exports on first use happen now too).
        self._video_pool.submit(self.screener.pose_estimator).result()
        self._video_slots = asyncio.Semaphore(S.video_concurrency)
        self._video_waiting = 0
        self._queued_rows = 0  # instances in ClipModel's batcher; read and written on the loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._described = False
        self._grpc = None
        self.pushes = I.Pushes(S, self.metrics, AUDIT)  # FHIR push to MAM_FHIR_BASE_URL, if set

    def __is_ready__(self) -> bool:
        return self.screener is not None

    # -- the shared batcher -----------------------------------------------------------------------
    async def _describe_clip_model(self) -> None:
        """Results name the runtime that ran the clip network, which lives in ClipModel."""
        import aiohttp

        if self._described:
            return
        try:
            info = await self.clip_model.to_async.describe()
        except aiohttp.ClientConnectionError:
            return  # ClipModel is gone (shutting down): _one_call runs the network here
        info = info if isinstance(info, RuntimeInfo) else RuntimeInfo(**info)
        s = self.screener
        s.runtime, s.device, s.precision = info.backend, info.device, info.precision
        self._described = True

    async def clip_outputs(self, instances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Instances -> clip logits ``[N, 2]`` and embeddings ``[N, D]`` through the shared
        batcher. A long bag is sent as several calls of at most one batch, so other requests'
        instances can ride along."""
        await self._describe_clip_model()
        b = S.max_batch_size
        m = self.metrics
        relative = np.ascontiguousarray(instances[..., 0])  # exact: see ClipModel.clip
        m.queue_rows.inc(len(instances))
        self._queued_rows += len(instances)
        try:
            outs = await asyncio.gather(
                *(self._one_call(relative[i : i + b]) for i in range(0, len(relative), b))
            )
        finally:
            m.queue_rows.dec(len(instances))
            self._queued_rows -= len(instances)
        out = np.concatenate(outs)
        return out[:, :2], out[:, 3:]

    async def _one_call(self, chunk: np.ndarray) -> np.ndarray:
        import aiohttp

        t = time.perf_counter()
        try:
            for attempt in range(3):
                try:
                    out = np.asarray(await self.clip_model.to_async.clip(chunk))
                    break
                except aiohttp.ClientConnectionError:
                    # Under load the proxy sometimes reuses a keep-alive connection that
                    # ClipModel's server has just closed (ServerDisconnectedError). The call is
                    # a pure function of its input, so sending it again is safe.
                    if attempt == 2:
                        return await self._clip_here(chunk)
        except bentoml.exceptions.BentoMLException as e:
            # The batcher sheds calls it predicts will exceed MAM_MAX_LATENCY_MS with a 503.
            if getattr(e, "error_code", None) == 503:
                raise E.ServiceError(E.OVERLOADED, "the model is at capacity; retry later") from e
            raise
        self.metrics.queue_wait_seconds.observe(max(time.perf_counter() - t - float(out[0, 2]), 0))
        return out

    async def _clip_here(self, relative: np.ndarray) -> np.ndarray:
        """The clip network in this process, when ClipModel cannot be reached. On a SIGTERM
        (rolling update) BentoML stops ClipModel while this service drains its requests in
        flight; a recording in its last second must still get its answer. Same network and
        ONNX files, only without batching across requests; counted in
        ``mam_clip_fallback_total``."""
        logger.warning("ClipModel unreachable; running the clip network in this worker")
        self.metrics.clip_fallback.inc()
        t = time.perf_counter()
        features, logits = await asyncio.to_thread(
            self.runtime.local.clip, expand_differences(relative)
        )
        out = np.empty((len(logits), 3 + features.shape[1]), np.float32)
        out[:, :2], out[:, 2], out[:, 3:] = logits, time.perf_counter() - t, features
        return out

    def admit(self) -> None:
        """Refuse new tensor and pose work with 503 while the batcher is full.

        Without it, latency grows without bound past saturation: BentoML sheds only calls it
        predicts will exceed MAM_MAX_LATENCY_MS, and its estimate lags after bursts (issue 7's
        load runs). A bound on queued instances keeps the wait of admitted requests to about
        MAM_MAX_QUEUED_INSTANCES / throughput, and tells clients early to back off."""
        if self._queued_rows >= S.max_queued_instances:
            raise E.ServiceError(
                E.OVERLOADED,
                f"the model queue is full ({self._queued_rows} instances waiting); "
                "retry with back-off",
            )

    def _clip_outputs_from_thread(self, instances: np.ndarray):
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(self.clip_outputs(instances), self._loop).result()

    async def score(self, tensors: np.ndarray, infant: InfantData | None) -> InstancesResult:
        """Validated instance tensors -> result; REST and gRPC both come here. Validation
        (copies and checks of up to ``MAM_MAX_INSTANCES`` tensors) runs in a thread."""
        x = await asyncio.to_thread(_valid_instances, tensors)
        self.admit()
        async with asyncio.timeout(S.tensor_timeout_s):
            logits, embeddings = await self.clip_outputs(x)
        sc = self.screener
        s: ClipScores = sc.score_logits(logits, infant, embeddings)
        fields = sc.summarize(s, "instances", None, sc.instance_gates(x))
        result = InstancesResult(
            **fields,
            fms_probability=[round(float(p), 4) for p in softmax(logits)[:, 1]],
            attention_weight=[round(float(a), 4) for a in s.attention],
            infant=infant,
            model=sc.model_info(INSTANCES_POSE_BACKEND, s.used_info, s.calibrated_as),
            warnings=sc.result_warnings(fields, infant),
        )
        observe_result(result)
        return result

    # -- recordings -------------------------------------------------------------------------------
    async def _run_video(self, job, timeout_s: float, request=None):
        """Run ``job(cancelled)`` in the video pool: a bounded queue (503 beyond it), a deadline
        over waiting and running (504), and a cancel flag the job checks per frame. With
        ``request`` (a synchronous call), the flag is also set when its client disconnects: no
        one would read the answer, and the video slot is freed for the next recording."""
        m = self.metrics
        if self._video_slots.locked() and self._video_waiting >= S.video_queue:
            raise E.ServiceError(E.OVERLOADED, "too many recordings queued; retry with back-off")
        cancelled = _Cancel()
        watcher = asyncio.create_task(_watch_client(request, cancelled)) if request else None
        self._video_waiting += 1
        m.video_jobs.labels(state="waiting").inc()
        acquired = False
        try:
            async with asyncio.timeout(timeout_s):
                await self._video_slots.acquire()
                acquired = True
                self._video_waiting -= 1
                m.video_jobs.labels(state="waiting").dec()
                m.video_jobs.labels(state="running").inc()
                fut = self._loop.run_in_executor(self._video_pool, job, cancelled)

                def release(_):
                    self._video_slots.release()
                    m.video_jobs.labels(state="running").dec()

                fut.add_done_callback(release)
                return await asyncio.shield(fut)
        except TimeoutError:
            cancelled.cancel(E.TIMEOUT)
            raise E.ServiceError(
                E.TIMEOUT, f"screening took longer than the limit of {timeout_s:g} s"
            ) from None
        finally:
            if watcher is not None:
                watcher.cancel()
            if not acquired:
                self._video_waiting -= 1
                m.video_jobs.labels(state="waiting").dec()

    def _screen_file(self, path: Path, infant, task_id, cancelled) -> ScreeningResult:
        m, o = self.metrics, self.screener.options

        def progress(done: int, total: int) -> None:
            if cancelled.is_set():
                raise E.ServiceError(cancelled.code, "screening cancelled: " + cancelled.why)
            if task_id and (done % 25 == 0 or done == total):
                self.progress.set(
                    task_id, stage="pose", frames_done=done, frames_total=total,
                    fraction=min(done / max(total, 1), 1.0),
                )  # fmt: skip

        self.progress.set(task_id, stage="pose")
        backend = self.screener.pose_estimator()  # this video thread's, kept between videos
        seq, timings = estimate_video_pose(path, backend, o.limits, o.max_side, progress)
        pose_s = timings["pose_total"]
        m.pose_seconds.observe(pose_s)
        m.pose_frames.inc(seq.num_frames)
        m.pose_fps.observe(seq.num_frames / max(pose_s, 1e-9))
        m.video_seconds.inc(seq.duration_s)
        self.progress.set(task_id, stage="model")
        return self.screener.screen_pose(seq, infant, timings=timings)

    # -- hospital integration: content digests, echoed DICOM UIDs, FHIR push, task audit ----------
    async def _intake(
        self, ctx, path: Path, headers: dict, task_id: str | None = None, dicom: bool = False
    ):
        """Note the upload's SHA-256 for the audit line (in the request's state, which the
        middleware reads) and, when the caller asked for them, a DICOM upload's UIDs for the
        FHIR answer (state for a synchronous call, ``integration.UIDS`` for a task). ``dicom``:
        the caller has sniffed the upload as a DICOM object."""
        state = ctx.request.scope.setdefault("state", {})
        state["content_sha256"] = await asyncio.to_thread(sha256_of, path)
        uids = None
        if dicom and I.echo_uids(headers):
            try:
                uids = await asyncio.to_thread(dicom_video.read_uids, path)
            except MamError:
                uids = None  # the screening itself will say what is wrong with the file
            state["dicom_uids"] = uids
            if task_id and uids is not None:
                I.UIDS.put(task_id, uids)
        return state["content_sha256"], uids

    def _push(self, result, headers: dict, result_id: str | None, uids=None) -> None:
        """The result's Bundle to the site's FHIR server, in the background (if configured)."""
        if not self.pushes.enabled or not result_id:
            return
        try:
            self.pushes.push(result, I.context(headers, result_id, uids))
        except MamError as e:  # references are checked by the middleware; belt and braces
            logger.warning("FHIR push skipped: %s", e.code)

    @staticmethod
    def _task_audit(headers, rid, task_id, sha, outcome: str, t0: float) -> None:
        AUDIT.record(
            "screening_task", request_id=rid,
            api_key_id=key_id(key_from_headers(headers), S.auth_disabled),
            route="screen_submit", protocol="rest", content_sha256=sha, result_id=task_id,
            outcome=outcome, duration_ms=(time.perf_counter() - t0) * 1000,
        )  # fmt: skip

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
        rid = _request_id(ctx)
        task_id = getattr(ctx.request.state, "task_id", None)
        timeout = S.task_timeout_s if task_id else S.request_timeout_s
        t0, sha = time.perf_counter(), None
        headers = {k.lower(): v for k, v in ctx.request.headers.items()}
        path = video
        try:
            dicom = dicom_video.is_dicom(video)  # named for what it is, not for the client's name
            suffix = ".dcm" if dicom else (video.suffix[:8] if video.suffix else "")
            path = _neutral_name(video, "recording", suffix)
            sha, uids = await self._intake(ctx, path, headers, task_id, dicom)
            result = await self._run_video(
                lambda c: self._screen_file(path, infant, task_id, c),
                timeout,
                None if task_id else ctx.request,  # a task runs after its client has gone
            )
            self.metrics.videos.labels(outcome="ok").inc()
            observe_result(result)
            self.progress.set(task_id, stage="done", fraction=1.0)
            self._push(result, headers, task_id or rid, uids)
            if task_id:
                self._task_audit(headers, rid, task_id, sha, "ok", t0)
            return result
        except Exception as e:
            self.metrics.videos.labels(outcome="error").inc()
            self.progress.set(task_id, stage="failed")
            if task_id:
                code = e.code if isinstance(e, MamError | E.ServiceError) else E.INTERNAL
                self._task_audit(headers, rid, task_id, sha, code, t0)
            return _failure(ctx, rid, e, "screen", path)
        finally:
            for p in {video, path}:
                p.unlink(missing_ok=True)

    @bentoml.api(route="/screen/progress")
    def progress_of(self, task_id: str) -> TaskProgress:
        """Progress of a submitted screening task: stage and frames through pose."""
        return self.progress.get(task_id)

    # -- pose and tensors -------------------------------------------------------------------------
    @bentoml.api
    async def screen_pose(
        self, pose: Path, infant: InfantData | None = None, ctx: bentoml.Context = None
    ) -> ScreeningResult:
        """Screen a precomputed 3D pose (multipart: ``pose``, a ``.npy`` ``[T, 17, 3]`` at 25 fps
        or an ``.npz`` with ``joints`` and optional ``confidence``; optional ``infant``)."""
        rid = _request_id(ctx)
        path = pose
        try:
            with open(pose, "rb") as f:
                head = f.read(8)  # the format's magic, not the whole upload
            suffix = ".npz" if head.startswith(b"PK") else ".npy"
            path = _neutral_name(pose, "pose", suffix)
            headers = {k.lower(): v for k, v in ctx.request.headers.items()}
            # Admitted once the body is in (BentoML has parsed it): a slow client holds no slot.
            with get_admission().enter():
                await self._intake(ctx, path, headers)
                await asyncio.to_thread(check_pose_file, path, S.max_pose_frames)  # headers
                seq = await asyncio.to_thread(load_pose_file, path)
                if seq.num_frames > S.max_pose_frames:
                    raise InvalidPoseError(
                        f"expected at most {S.max_pose_frames} frames; received {seq.num_frames}"
                    )
                self.admit()
                async with asyncio.timeout(S.tensor_timeout_s):
                    result = await asyncio.to_thread(self.screener.screen_pose, seq, infant)
            observe_result(result)
            self._push(result, headers, rid)
            return result
        except TimeoutError:
            return _fail(ctx, E.error_response(E.TIMEOUT, "screening the pose took too long", rid))
        except Exception as e:
            return _failure(ctx, rid, e, "screen_pose", path)
        finally:
            for p in {pose, path}:
                p.unlink(missing_ok=True)

    @bentoml.api
    async def screen_instances(
        self, instances: Path, infant: InfantData | None = None, ctx: bentoml.Context = None
    ) -> InstancesResult:
        """Score ready-made instance tensors (multipart: ``instances``, a ``.npy`` float32
        ``[N, 240, 3, 17, 17]`` of smoothed, normalised joint differences; optional ``infant``)."""
        rid = _request_id(ctx)
        try:
            with get_admission().enter():  # once the body is in, as for poses
                await self._intake(ctx, instances, {})
                await asyncio.to_thread(check_instances_file, instances, S.max_instances)
                x = await asyncio.to_thread(_load_npy, instances)
                return await self.score(x, infant)
        except TimeoutError:
            return _fail(
                ctx, E.error_response(E.TIMEOUT, "scoring took longer than the limit", rid)
            )
        except Exception as e:
            return _failure(ctx, rid, e, "screen_instances")
        finally:
            instances.unlink(missing_ok=True)

    # -- lifecycle --------------------------------------------------------------------------------
    @bentoml.on_startup
    async def _start(self) -> None:
        self._loop = asyncio.get_running_loop()
        _configure_logging()
        compat.quiet_request_error_logs()  # BentoML has configured its loggers by now
        if S.grpc_port:
            from service.grpc_app import start_grpc

            self._grpc = await start_grpc(self, S.grpc_host, S.grpc_port)

    @bentoml.on_shutdown
    async def _stop(self) -> None:
        if self._grpc is not None:
            from service.grpc_v2.server import stop_server

            await stop_server(self._grpc, grace=5.0)
        self._video_pool.shutdown(wait=False, cancel_futures=True)
        self.pushes.close()


_SERVED: dict = {}  # the Screening instance of this process, for GET /model


def model_document() -> dict | None:
    """The body of ``GET /model`` (``mam.model.card.model_document``); None before the service
    has loaded its model."""
    screening = _SERVED.get("screening")
    if screening is None:
        return None
    sc = screening.screener
    return model_document_of(sc.model_identity(), screening.card_text, sc.meta)


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
Screening.add_asgi_middleware(ServiceMiddleware, **_middleware_kwargs())

__all__ = ["ClipModel", "Screening"]
