"""The service's data plane: scoring, screening, admission and tasks, whatever the protocol.

REST (``service.app``), KServe v2 gRPC (``service.grpc_app``) and KServe v2 REST
(``service.v2_rest``) are adapters over one :class:`DataPlane`: they convert their messages,
call it and convert back (KServe's servicers over its ``DataPlane``). Failures are typed errors
(``mam.errors``, ``service.errors``) that each adapter turns into its protocol's answer in one
place. Nothing here imports an adapter.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

import mam
from mam import dicom_video
from mam.audit import AuditLog, key_id
from mam.errors import InvalidInfantDataError, InvalidPoseError, InvalidTensorError, MamError
from mam.features import CLIP_FRAMES, expand_differences, validate_instances
from mam.model.card import find_card
from mam.model.card import model_document as model_document_of
from mam.model.weights import sha256_of
from mam.pose import load_pose_file
from mam.runtime import create_runtime
from mam.schemas import InfantData, InstancesResult, ScreeningResult
from mam.screening import ClipScores, Screener, ScreeningCancelled, ScreeningOptions, softmax
from service import errors as E
from service import integration as I
from service.admission import get_admission
from service.auth import key_from_headers
from service.grpc_v2.server import InferenceServicer, TensorSpec
from service.metrics import get_metrics, observe_result
from service.uploads import check_instances_file, check_pose_file

logger = logging.getLogger("mam.service")

INSTANCES_POSE_BACKEND = "none (instances given)"
MAX_INSTANCE_VALUE = 1e4
MODEL_NAME = "mam"
INSTANCE_BYTES = CLIP_FRAMES * 3 * 17 * 17 * 4  # one FP32 instance
CLASSIFICATION_LABELS = ("normal", "risk", "indeterminate")
# Who is calling, for the audit line of a v2 inference (set by the gRPC interceptor and the v2
# REST adapter): key id, start time, protocol, request id.
CALLER: contextvars.ContextVar[dict] = contextvars.ContextVar("mam_v2_caller")


class RuntimeInfo(BaseModel):
    backend: str
    device: str
    precision: str
    details: str


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


async def _watch_client(disconnected, cancelled: _Cancel, every_s: float = 0.5) -> None:
    """Set ``cancelled`` once ``await disconnected()`` says the client has gone."""
    try:
        while not cancelled.is_set():
            if await disconnected():
                logger.info("client disconnected; cancelling its recording")
                cancelled.cancel(E.CLIENT_CLOSED)
                return
            await asyncio.sleep(every_s)
    except asyncio.CancelledError:
        raise
    except Exception:  # noqa: BLE001 - a request without a readable channel: nothing to watch
        return


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


def neutral_name(upload: Path, stem: str, suffix: str = "") -> Path:
    """Uploads keep the client's file name as a suffix; patient names in file names are common,
    so rename before anything can echo it."""
    target = upload.with_name(stem + suffix)
    upload.rename(target)
    return target


def scrub(message: str, path: Path) -> str:
    return message.replace(str(path), "the uploaded file").replace(path.name, "the uploaded file")


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except Exception:
        raise E.ServiceError(
            E.MALFORMED, "'instances' is not a readable .npy array (no pickles)"
        ) from None


def _digest(x: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(x).data).hexdigest()


def typed_failure(exc: Exception, request_id: str | None, where: str, upload: Path | None = None):
    """The one mapping of a failure to what a client is told, whatever the protocol: typed
    errors as they are (an upload's server path replaced), anything else logged with its
    traceback, to be answered as ``internal_error`` (its text may quote data). Returns the
    exception to report."""
    if isinstance(exc, TimeoutError):
        return E.ServiceError(E.TIMEOUT, f"{where} took longer than the limit")
    if isinstance(exc, MamError | E.ServiceError):
        if upload is not None:
            exc.message = scrub(exc.message, upload)
        return exc
    logger.error("request_id=%s unexpected error in %s", request_id, where, exc_info=exc)
    return exc


class DataPlane:
    """Everything the service does, protocol-free.

    Args: settings (``service.settings.Settings``); audit: the process's audit trail;
    clip_model: the ``ClipModel`` dependency (``to_async.clip`` / ``to_async.describe``), the
    clip network behind the shared adaptive batcher."""

    def __init__(self, settings, audit: AuditLog, clip_model) -> None:
        s = self.s = settings
        self.audit, self.clip_model = audit, clip_model
        self.metrics = get_metrics()
        local = create_runtime(s.weights, "onnxruntime", device="cpu", threads=1)
        self.runtime = _SharedBatcherRuntime(local, self._clip_outputs_from_thread)
        options = ScreeningOptions(limits=s.video_limits(), pose_backend=s.pose_backend)
        self.screener = Screener(s.weights, options=options, runtime=self.runtime)
        self.metrics.export_expectations(self.screener.meta)  # the drift alerts' bands
        card = find_card(s.weights, self.screener.meta.name)
        self.card_text = card.read_text(encoding="utf-8", errors="replace") if card else None
        ident = self.screener.model_identity()
        if ident["demo"]:
            logger.warning("serving the DEMO weights %s %s (trained on simulated infants): not for "
                           "clinical use", ident["name"], ident["version"])  # fmt: skip
        logger.info("model %s %s digest %s", ident["name"], ident["version"], ident["digest"])
        self.progress = _Progress()
        self._video_pool = ThreadPoolExecutor(s.video_concurrency, thread_name_prefix="video")
        # Fail at start, not on every recording, when the pose backend cannot run here (e.g.
        # hrnet-videopose3d without the site's weights). Made in a video thread, which keeps it
        # for its first recording (conversions and exports on first use happen now too).
        self._video_pool.submit(self.screener.pose_estimator).result()
        self._video_slots = asyncio.Semaphore(s.video_concurrency)
        self._video_waiting = 0
        self._queued_rows = 0  # instances in ClipModel's batcher; read and written on the loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._described = False
        self.pushes = I.Pushes(s, self.metrics, audit)  # FHIR push to MAM_FHIR_BASE_URL, if set
        self.v2 = V2Model(self)

    def start(self) -> None:
        """On the serving event loop: the video threads hand clip calls back to it."""
        self._loop = asyncio.get_running_loop()

    def close(self) -> None:
        self._video_pool.shutdown(wait=False, cancel_futures=True)
        self.pushes.close()

    def is_ready(self) -> bool:
        return self.screener is not None

    def v2_servicer(self, **kwargs) -> InferenceServicer:
        """The v2 protocol over :class:`V2Model` (name and version checks, tensor decoding and
        limits), which the gRPC and REST transports share; ``kwargs``: the transport's
        status mapping and observer."""
        return InferenceServicer(
            self.v2, server_name=MODEL_NAME, server_version=mam.__version__,
            max_elements=self.s.max_instances * INSTANCE_BYTES // 4 + 4, **kwargs,
        )  # fmt: skip

    def model_document(self) -> dict:
        """The body of ``GET /model`` (``mam.model.card.model_document``)."""
        sc = self.screener
        return model_document_of(sc.model_identity(), self.card_text, sc.meta)

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
        r = self.runtime  # the screener's: results name what ran the clip network
        r.backend, r.device, r.precision = info.backend, info.device, info.precision
        self._described = True

    async def clip_outputs(self, instances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Instances -> clip logits ``[N, 2]`` and embeddings ``[N, D]`` through the shared
        batcher. A long bag is sent as several calls of at most one batch, so other requests'
        instances can ride along."""
        await self._describe_clip_model()
        b = self.s.max_batch_size
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
        import bentoml

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
        predicts will exceed MAM_MAX_LATENCY_MS, and its estimate lags after bursts. A bound on
        queued instances keeps the wait of admitted requests to about
        MAM_MAX_QUEUED_INSTANCES / throughput, and tells clients early to back off."""
        if self._queued_rows >= self.s.max_queued_instances:
            raise E.ServiceError(
                E.OVERLOADED,
                f"the model queue is full ({self._queued_rows} instances waiting); "
                "retry with back-off",
            )

    def _clip_outputs_from_thread(self, instances: np.ndarray):
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(self.clip_outputs(instances), self._loop).result()

    # -- tensors ----------------------------------------------------------------------------------
    def _valid_instances(self, tensors: np.ndarray) -> np.ndarray:
        x = validate_instances(tensors, max_instances=self.s.max_instances)
        # Normalised joint differences are a few units; values this large come from a broken
        # client and would overflow inside the network.
        if float(np.abs(x).max()) > MAX_INSTANCE_VALUE:
            raise InvalidTensorError(
                f"expected normalised joint differences (|value| <= {MAX_INSTANCE_VALUE:g}); "
                f"received values up to {float(np.abs(x).max()):.3g}"
            )
        return x

    async def score(self, tensors: np.ndarray, infant: InfantData | None) -> InstancesResult:
        """Instance tensors -> result; every protocol's tensors come here. Validation (copies
        and checks of up to ``MAM_MAX_INSTANCES`` tensors) runs in a thread."""
        x = await asyncio.to_thread(self._valid_instances, tensors)
        self.admit()
        async with asyncio.timeout(self.s.tensor_timeout_s):
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

    async def screen_instances_file(
        self, path: Path, infant: InfantData | None, state: dict
    ) -> InstancesResult:
        """An uploaded ``.npy`` of instances, admitted once its body is in (a slow client holds
        no slot)."""
        with get_admission().enter():
            await self._intake(state, path, {})
            await asyncio.to_thread(check_instances_file, path, self.s.max_instances)
            x = await asyncio.to_thread(_load_npy, path)
            try:
                return await self.score(x, infant)
            except TimeoutError:
                raise E.ServiceError(E.TIMEOUT, "scoring took longer than the limit") from None

    # -- poses ------------------------------------------------------------------------------------
    async def screen_pose_file(
        self, path: Path, infant: InfantData | None, headers: dict, state: dict, rid: str | None
    ) -> ScreeningResult:
        """An uploaded pose file (``.npy`` or ``.npz``, already renamed), admitted like
        tensors."""
        s = self.s
        with get_admission().enter():
            await self._intake(state, path, headers)
            await asyncio.to_thread(check_pose_file, path, s.max_pose_frames)  # headers only
            seq = await asyncio.to_thread(load_pose_file, path)
            if seq.num_frames > s.max_pose_frames:
                raise InvalidPoseError(
                    f"expected at most {s.max_pose_frames} frames; received {seq.num_frames}"
                )
            self.admit()
            try:
                async with asyncio.timeout(s.tensor_timeout_s):
                    result = await asyncio.to_thread(self.screener.screen_pose, seq, infant)
            except TimeoutError:
                raise E.ServiceError(E.TIMEOUT, "screening the pose took too long") from None
        observe_result(result)
        self._push(result, headers, rid)
        return result

    # -- recordings -------------------------------------------------------------------------------
    async def screen_recording(
        self, path: Path, infant: InfantData | None, headers: dict, state: dict,
        rid: str | None, task_id: str | None, dicom: bool, disconnected=None,
    ) -> ScreeningResult:  # fmt: skip
        """A recording (already renamed) through ``Screener.screen_video``, the CLI's path, in
        the video pool: synchronously (``disconnected``: the client's disconnect check) or as
        the task ``task_id`` (its progress kept, its outcome audited)."""
        t0, sha = time.perf_counter(), None
        timeout = self.s.task_timeout_s if task_id else self.s.request_timeout_s
        try:
            sha, uids = await self._intake(state, path, headers, task_id, dicom)
            result = await self._run_video(
                lambda c: self._screen_file(path, infant, task_id, c), timeout, disconnected
            )
            self.metrics.videos.labels(outcome="ok").inc()
            observe_result(result)
            self.progress.set(task_id, stage="done", fraction=1.0)
            self._push(result, headers, task_id or rid, uids, sha)
            if task_id:
                self._task_audit(headers, rid, task_id, sha, "ok", t0)
            return result
        except Exception as e:
            self.metrics.videos.labels(outcome="error").inc()
            self.progress.set(task_id, stage="failed")
            if task_id:
                code = e.code if isinstance(e, MamError | E.ServiceError) else E.INTERNAL
                self._task_audit(headers, rid, task_id, sha, code, t0)
            raise

    async def _run_video(self, job, timeout_s: float, disconnected=None):
        """Run ``job(cancelled)`` in the video pool: a bounded queue (503 beyond it), a deadline
        over waiting and running (504), and a cancel flag the job checks per frame. With
        ``disconnected`` (a synchronous call), the flag is also set when its client disconnects:
        no one would read the answer, and the video slot is freed for the next recording."""
        m = self.metrics
        if self._video_slots.locked() and self._video_waiting >= self.s.video_queue:
            raise E.ServiceError(E.OVERLOADED, "too many recordings queued; retry with back-off")
        cancelled = _Cancel()
        watcher = (
            asyncio.create_task(_watch_client(disconnected, cancelled)) if disconnected else None
        )
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

    def _screen_file(self, path: Path, infant, task_id, cancelled: _Cancel) -> ScreeningResult:
        """One recording in a video thread, through the same ``Screener.screen_video`` as
        ``mam screen`` (parts posed in parallel where the backend allows), so both give the
        same joints and result."""

        def progress(done: int, total: int) -> None:
            if task_id and (done % 25 == 0 or done == total):
                self.progress.set(
                    task_id, stage="pose" if done < total else "model", frames_done=done,
                    frames_total=total, fraction=min(done / max(total, 1), 1.0),
                )  # fmt: skip

        self.progress.set(task_id, stage="pose")
        try:
            result = self.screener.screen_video(path, infant, progress, cancelled)
        except ScreeningCancelled:
            raise E.ServiceError(cancelled.code, "screening cancelled: " + cancelled.why) from None
        m, pose_s = self.metrics, result.timings_s.get("pose_total", 0.0)
        frames = result.quality.frames_total
        m.pose_seconds.observe(pose_s)
        m.pose_frames.inc(frames)
        m.pose_fps.observe(frames / max(pose_s, 1e-9))
        m.video_seconds.inc(result.quality.duration_s)
        return result

    # -- hospital integration: content digests, echoed DICOM UIDs, FHIR push, task audit ----------
    async def _intake(
        self, state: dict, path: Path, headers: dict, task_id: str | None = None,
        dicom: bool = False,
    ):  # fmt: skip
        """Note the upload's SHA-256 for the audit line (in the request's ``state``, which the
        middleware reads) and, when the caller asked for them, a DICOM upload's UIDs for the
        FHIR answer (state for a synchronous call, ``integration.UIDS`` for a task). ``dicom``:
        the caller has sniffed the upload as a DICOM object."""
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

    def _push(self, result, headers: dict, result_id: str | None, uids=None,
              content_sha256: str | None = None) -> None:  # fmt: skip
        """The result's Bundle to the site's FHIR server, in the background (if configured);
        ``content_sha256``: the recording's, for the Provenance's input entity."""
        if not self.pushes.enabled or not result_id:
            return
        try:
            self.pushes.push(result, I.context(headers, result_id, uids, content_sha256))
        except MamError as e:  # references are checked by the middleware; belt and braces
            logger.warning("FHIR push skipped: %s", e.code)

    def _task_audit(self, headers, rid, task_id, sha, outcome: str, t0: float) -> None:
        self.audit.record(
            "screening_task", request_id=rid,
            api_key_id=key_id(key_from_headers(headers), self.s.auth_disabled),
            route="screen_submit", protocol="rest", content_sha256=sha, result_id=task_id,
            outcome=outcome, duration_ms=(time.perf_counter() - t0) * 1000,
        )  # fmt: skip


class V2Model:
    """The tensors-in model of the KServe v2 / Open Inference Protocol (gRPC and REST) over
    :meth:`DataPlane.score`.

    Model ``mam``:
      inputs  ``instances`` FP32 ``[N, 240, 3, 17, 17]``; optional ``infant`` FP32 ``[1, 4]`` =
              sex (1 male, 0 female), gestational age (weeks), birth weight (g), corrected age
              (weeks)
      outputs ``normal_probability`` / ``risk_probability`` / ``fms_frequency`` FP32 ``[1]``,
              ``fms_probability`` / ``attention_weight`` FP32 ``[N]``, ``classification`` INT32
              ``[1]`` (0 normal, 1 risk, 2 indeterminate), ``probabilities_usable`` and
              ``in_domain`` BOOL ``[1]``, ``domain_score`` FP32 ``[1]`` (NaN: not scored). v2
              has no enum type, and BYTES is not served here, so the label travels as its index
              in ``CLASSIFICATION_LABELS``; the reasons are REST's (``/screen_instances``).
    """

    name = MODEL_NAME
    platform = "onnxruntime"
    inputs = [
        TensorSpec("instances", "FP32", [-1, CLIP_FRAMES, 3, 17, 17]),
        TensorSpec("infant", "FP32", [1, 4], optional=True),
    ]
    outputs = [
        TensorSpec("normal_probability", "FP32", [1]),
        TensorSpec("risk_probability", "FP32", [1]),
        TensorSpec("fms_frequency", "FP32", [1]),
        TensorSpec("fms_probability", "FP32", [-1]),
        TensorSpec("attention_weight", "FP32", [-1]),
        TensorSpec("classification", "INT32", [1]),
        TensorSpec("probabilities_usable", "BOOL", [1]),
        TensorSpec("in_domain", "BOOL", [1]),
        TensorSpec("domain_score", "FP32", [1]),
    ]

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self.version = plane.screener.meta.version
        self.digest = plane.screener.model_digest  # ModelMetadata's second version

    def is_ready(self) -> bool:
        return self.plane.is_ready()

    async def infer(self, inputs: dict[str, np.ndarray], parameters: dict) -> dict[str, np.ndarray]:
        infant = _infant_of(inputs["infant"]) if "infant" in inputs else None
        call = CALLER.get({})
        digest = await asyncio.to_thread(_digest, inputs["instances"])
        outcome = "internal_error"
        try:
            with get_admission().enter():  # the same gate as REST's tensor requests
                r = await self.plane.score(inputs["instances"], infant)
            outcome = "ok"
        except TimeoutError:
            outcome = E.TIMEOUT
            raise E.ServiceError(E.TIMEOUT, "scoring took longer than the limit") from None
        except Exception as e:
            outcome = getattr(e, "code", outcome)
            raise
        finally:
            self.plane.audit.record(
                "screening_request", api_key_id=call.get("key_id", "none"),
                request_id=call.get("request_id"), route="model_infer",
                protocol=call.get("protocol", "grpc"), content_sha256=digest, format="v2",
                outcome=outcome,
                duration_ms=(time.perf_counter() - call.get("t0", time.perf_counter())) * 1000,
            )  # fmt: skip
        f32 = np.float32
        return {
            "normal_probability": np.array([r.normal_probability], f32),
            "risk_probability": np.array([r.risk_probability], f32),
            "fms_frequency": np.array([r.fms_frequency], f32),
            "fms_probability": np.array(r.fms_probability, f32),
            "attention_weight": np.array(r.attention_weight, f32),
            "classification": np.array(
                [CLASSIFICATION_LABELS.index(r.classification.label)], np.int32
            ),
            "probabilities_usable": np.array([r.probabilities_usable]),
            "in_domain": np.array([r.domain.in_domain]),
            "domain_score": np.array([np.nan if r.domain.score is None else r.domain.score], f32),
        }


def _infant_of(vector: np.ndarray) -> InfantData:
    v = np.asarray(vector, np.float64).reshape(-1)
    if not np.isfinite(v).all() or v[0] not in (0.0, 1.0):
        raise InvalidInfantDataError(
            "invalid infant data: 'infant' is [sex (1 male, 0 female), gestational age "
            "weeks, birth weight g, corrected age weeks], all finite"
        )
    return InfantData.parse(
        sex="male" if v[0] == 1.0 else "female",
        gestational_age_weeks=float(v[1]),
        birth_weight_g=float(v[2]),
        corrected_age_weeks=float(v[3]),
    )


_SERVED: dict[str, DataPlane] = {}  # the data plane of this process (one Screening per worker)


def serve(plane: DataPlane) -> None:
    """Register this process's data plane for the ASGI routes that live outside BentoML's
    (``/model``, ``/v2/...``)."""
    _SERVED["plane"] = plane


def served() -> DataPlane | None:
    """This process's data plane; None before the service has loaded its model."""
    return _SERVED.get("plane")


__all__ = ["DataPlane", "RuntimeInfo", "TaskProgress", "V2Model", "serve", "served"]
