"""Every place the service reaches into BentoML's internals, gated on the release it was written
for (BentoML ``KNOWN_VERSION``), each with a test (``tests/test_bentoml_compat.py``) that fails
when an upgrade changes the behaviour it patches:

1. ``fix_timeout_middleware``: 1.4.40's ``TimeoutMiddleware`` leaked memory per request (below).
2. ``UploadsOnlyMultipart``: BentoML's multipart parsing fetches a file field given as a string
   as a URL (the service must never fetch on a client's behalf) and turns a binary part under an
   unexpected name into a 500; both become 400.
3. ``install_private_task_store``: BentoML's task store (``_bentoml_impl.tasks.result``) wrote
   each task's request (the recording, its file name, the infant data and the Authorization
   header) and its result to a SQLite file; it now lives in memory and keeps no request.
4. ``quiet_request_error_logs``: BentoML logs input-validation failures with the pydantic error,
   whose text quotes the submitted values (infant data); the line stays, the exception goes.
   Its access log quotes the raw path: control characters are escaped, so that a client's
   ``%0a`` cannot write a line of its own.
5. ``install_private_prometheus_dir`` (by ``service.launch``, before BentoML starts): one
   multi-process metrics folder per service instance, not the one shared by all on a host.

Applied once, at import of ``service.app``, in every worker process (``apply``). On another
BentoML release each patch still applies where the patched object has the expected shape, with a
warning, so an upgrade is noticed; run the compat tests and the soak before trusting it.

The timeout fix, found by the 10-minute soak of ``loadtest/sweep.py --soak``: both
worker processes grew about 36 MiB/min under steady load. tracemalloc and ``gc`` showed every
request's state alive long after its response: each request's ``TimeoutMiddleware`` schedules
``loop.call_later(timeout, ...)`` and never cancels it, and an asyncio ``TimerHandle`` keeps the
``contextvars.Context`` it was scheduled in, which holds the request's OpenTelemetry span, its
ASGI ``send`` closures and BentoML's request context. So every request stayed reachable for the
whole service timeout. The replacement behaves the same (504 after ``timeout`` seconds without a
response start) but schedules its timer in an empty context and cancels it when the request ends.
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger("mam.service")


KNOWN_VERSION = "1.4.40"  # the BentoML release these patches were written and tested for


async def _timeout_call(self, scope, receive, send) -> None:
    """``TimeoutMiddleware.__call__`` with its timer scheduled context-free and cancelled.

    Unlike the original it also ends when the app ends without starting a response (it raised,
    or sent nothing): the original waited for the timer then, whatever the timeout."""
    from starlette.responses import JSONResponse

    if scope["type"] not in ("http", "websocket"):
        return await self.app(scope, receive, send)
    loop = asyncio.get_running_loop()
    started = loop.create_future()
    timer = loop.call_later(
        self.timeout, self._set_timer_out, started, context=contextvars.Context()
    )

    async def _send(message) -> None:
        if not started.done():
            started.set_result(None)  # the response has started: the timeout no longer applies
        await send(message)

    fut = asyncio.ensure_future(self.app(scope, receive, _send), loop=loop)
    try:
        await asyncio.wait({started, fut}, return_when=asyncio.FIRST_COMPLETED)
        timed_out = started.done() and not started.cancelled() and started.exception()
        if timed_out and fut.cancel():
            msg = f"Not able to process the request in {self.timeout} seconds"
            await JSONResponse({"error": msg}, status_code=504)(scope, receive, send)
            return
        await fut
    finally:
        timer.cancel()
        if not fut.done():
            fut.cancel()  # the caller went away (the client disconnected): nobody awaits it


def fix_timeout_middleware() -> bool:
    """Install the fix for the BentoML release it was written for; elsewhere warn and leave
    BentoML as it is (then rerun the soak to see whether upstream fixed the leak)."""
    import bentoml
    from bentoml._internal.server.http import traffic

    cls = traffic.TimeoutMiddleware
    if cls.__call__ is _timeout_call:
        return True
    if bentoml.__version__ != KNOWN_VERSION or not callable(getattr(cls, "_set_timer_out", None)):
        logger.warning(
            "BentoML %s is not %s: its TimeoutMiddleware timer fix was not applied",
            bentoml.__version__, KNOWN_VERSION,
        )  # fmt: skip
        return False
    cls.__call__ = _timeout_call
    return True


def _version_check(what: str) -> None:
    import bentoml

    if bentoml.__version__ != KNOWN_VERSION:
        logger.warning("BentoML %s is not %s: %s patched on trust; run the compat tests",
                       bentoml.__version__, KNOWN_VERSION, what)  # fmt: skip


# -- 2. multipart: uploads only ----------------------------------------------------------------
MAX_FORM_FIELD_BYTES = 64 * 1024  # a JSON field (infant data) is a few hundred bytes
_COPY_CHUNK = 1 << 20


def _spool(upload, folder: str) -> Path:
    """Copy an upload to a file of its own in ``folder``, a chunk at a time (in a thread).
    The name is neutral: never the client's file name (too long, or a patient's name)."""
    import shutil as _shutil

    suffix = Path(upload.filename or "").suffix
    suffix = suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,8}", suffix) else ""  # a hint for FFmpeg
    upload.file.seek(0)
    fd, name = tempfile.mkstemp(prefix="upload-", suffix=suffix, dir=folder)
    with os.fdopen(fd, "wb") as out:
        _shutil.copyfileobj(upload.file, out, _COPY_CHUNK)
    return Path(name)


def _content_types(field) -> list[str]:
    """The media types a file field accepts (``ContentType(...)``, which BentoML folds into the
    field's ``FileSchema``)."""
    return [c for m in field.metadata if isinstance(c := getattr(m, "content_type", None), str)]


def _multipart_class():
    import fnmatch
    from http import HTTPStatus
    from typing import get_args

    from _bentoml_impl.serde import MultipartSerde, is_list_type, is_union_type
    from bentoml.exceptions import BadInput, BentoMLException
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException

    class UploadsOnlyMultipart(MultipartSerde):
        """BentoML's multipart parsing with its holes closed (module docstring, 2)."""

        @staticmethod
        async def ensure_file(obj):
            if isinstance(obj, UploadFile):
                return obj
            raise BadInput("file fields must be uploaded files (multipart parts with a filename)")

        async def parse_request(self, request, cls):
            """As BentoML's, except: a malformed body (no or another boundary) is a 400, not a
            500; a form field is at most 64 KiB and JSON nested too deep is a 400; file parts are
            copied to the request's folder in a thread, under a neutral name (BentoML read each
            whole upload into memory on the event loop and named the copy after the client's
            file name, so a 300-character name was a 500); validation runs in a thread."""
            from bentoml._internal.context import request_temp_dir

            try:
                form = await request.form(max_files=8, max_fields=16,
                                          max_part_size=MAX_FORM_FIELD_BYTES)  # fmt: skip
            except (HTTPException, MultiPartException) as e:  # as the app is mounted or not
                detail = getattr(e, "detail", None) or getattr(e, "message", "")
                raise BadInput(f"malformed multipart body: {detail}") from None
            except UnicodeDecodeError:
                raise BadInput(
                    "a binary part was sent under an unexpected name; expected "
                    f"{sorted(cls.model_fields)}"
                ) from None
            data = {}
            for k in form:
                if k in cls.multipart_fields:
                    values = [await self.ensure_file(v) for v in form.getlist(k)]
                    allowed = _content_types(cls.model_fields[k])
                    folder = request_temp_dir()
                    paths = []
                    for v in values:
                        ctype = (v.content_type or "").split(";")[0].strip().lower()
                        if allowed and not any(fnmatch.fnmatch(ctype, a) for a in allowed):
                            raise BentoMLException(
                                f"{k}: Invalid content type {ctype or 'none'}, expected "
                                f"{' or '.join(allowed)}",
                                error_code=HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                            )
                        paths.append(await asyncio.to_thread(_spool, v, folder))
                        await v.close()
                    field = cls.model_fields[k].annotation
                    if is_union_type(field):
                        field = get_args(field)[0]
                    data[k] = paths if is_list_type(field) else paths[0]
                    continue
                v = form[k]
                if isinstance(v, UploadFile):
                    raise BadInput(
                        f"a file was sent under '{k}'; expected {sorted(cls.multipart_fields)}"
                    )
                try:
                    data[k] = json.loads(v)
                except json.JSONDecodeError:
                    data[k] = v
                except RecursionError:
                    raise BadInput(f"'{k}': JSON nested too deeply") from None
            return await asyncio.to_thread(cls.model_validate, data)

    return UploadsOnlyMultipart


def install_uploads_only_multipart():
    """Register ``UploadsOnlyMultipart`` for ``multipart/form-data``; returns the class."""
    from _bentoml_impl.serde import ALL_SERDE, MultipartSerde

    current = ALL_SERDE.get(MultipartSerde.media_type)
    if getattr(current, "__name__", "") == "UploadsOnlyMultipart":
        return current
    _version_check("multipart parsing")
    if not callable(getattr(MultipartSerde, "ensure_file", None)):
        raise RuntimeError("BentoML's MultipartSerde has no ensure_file: the patch cannot apply")
    cls = _multipart_class()
    ALL_SERDE[MultipartSerde.media_type] = cls
    return cls


# -- 3. the task store: in memory, without inputs ---------------------------------------------
TASK_TABLE, TASK_INPUT = "result", "input"
MEMORY = ":memory:"


def _empty_input(request) -> bytes:
    """What the store keeps of a task's request: its route, nothing the client sent."""
    scope = {"type": "http", "method": "POST", "path": request.scope.get("path", ""),
             "headers": []}  # fmt: skip
    return json.dumps({"scope": scope, "content": ""}).encode()


def install_private_task_store():
    """BentoML's task store (``_bentoml_impl.tasks.result.Sqlite3Store``) writes each task's
    whole request (the Authorization header and the base64 upload, the recording, its file name
    and the infant data) and the result (which echoes the infant data) to a SQLite file. Patched
    so that the store lives in the worker's memory (``Screening`` has one worker, so every task
    id is known to the process that polls it) and keeps only the route of a request: retry,
    the one reader of the input, is refused by the middleware. Nothing of a task reaches a file,
    and nothing is left on disk by a start or a crash. Returns the store class."""
    from _bentoml_impl.tasks.result import Sqlite3Store

    if getattr(Sqlite3Store, "_mam_private", False):
        return Sqlite3Store
    _version_check("the task store")
    for name in ("_connect", "init_db", "new_entry", "__aenter__"):
        if not callable(getattr(Sqlite3Store, name, None)):
            raise RuntimeError(f"BentoML's Sqlite3Store has no {name}: the patch cannot apply")
    connect, enter = Sqlite3Store._connect, Sqlite3Store.__aenter__
    upstream_init_db = Sqlite3Store.init_db

    def _connect(self, db_file: str):
        return connect(self, MEMORY)

    async def __aenter__(self):
        await enter(self)
        # BentoML's table (its init_db, which made it in a file), in this connection.
        await self._conn.execute(TASK_TABLE_DDL)
        await self._conn.commit()
        return self

    async def new_entry(self, name: str, input) -> str:
        import uuid

        # The body must be read while the client is still sending it (the task runs after the
        # answer); it stays in this process's memory, never in the store.
        await input.body()
        task_id = uuid.uuid4().hex
        await self._conn.execute(
            f"INSERT INTO {TASK_TABLE} (task_id, name, {TASK_INPUT}, status) VALUES (?, ?, ?, ?)",
            (task_id, name, _empty_input(input), "in_progress"),
        )
        await self._conn.commit()
        return task_id

    Sqlite3Store._connect = _connect
    Sqlite3Store.__aenter__ = __aenter__
    Sqlite3Store.init_db = classmethod(lambda cls, db_file: None)  # no file is made
    Sqlite3Store.new_entry = new_entry
    Sqlite3Store._mam_private = True
    Sqlite3Store._mam_upstream_init_db = upstream_init_db
    return Sqlite3Store


TASK_TABLE_DDL = f"""CREATE TABLE IF NOT EXISTS {TASK_TABLE} (
    task_id TEXT PRIMARY KEY, name TEXT, {TASK_INPUT} BLOB, status TEXT, result BLOB,
    created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP, executed_at TIMESTAMP DEFAULT
    CURRENT_TIMESTAMP, completed_at TIMESTAMP DEFAULT NULL)"""


# -- 5. one Prometheus folder per service instance ---------------------------------------------
PROMETHEUS_PREFIX = "mam-prometheus-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_prometheus_dirs(root: str | None = None) -> int:
    """Folders of instances that are gone (killed before their exit handler ran)."""
    root_path = Path(root or tempfile.gettempdir())
    removed = 0
    for d in root_path.glob(PROMETHEUS_PREFIX + "*"):
        pid = d.name[len(PROMETHEUS_PREFIX) :].split("-", 1)[0]
        if d.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
            removed += 1
    return removed


def install_private_prometheus_dir() -> str:
    """``bentoml serve`` empties ``$BENTOML_HOME/prometheus_multiproc_dir`` at every start and
    points every worker at it, so two services on one host wiped and mixed each other's metric
    files (in-flight gauges read 0 during a running job). Patched, before BentoML starts, to a
    private folder per instance (named by the serving process's pid, removed at exit; folders of
    instances that died without exiting are removed at the next start). Returns the folder."""
    import bentoml.serving as serving

    current = getattr(serving, "ensure_prometheus_dir", None)
    if getattr(current, "_mam_dir", None):
        return current._mam_dir
    _version_check("the Prometheus multi-process folder")
    if not callable(current):
        raise RuntimeError("bentoml.serving has no ensure_prometheus_dir: the patch cannot apply")
    remove_stale_prometheus_dirs()
    path = tempfile.mkdtemp(prefix=f"{PROMETHEUS_PREFIX}{os.getpid()}-")
    atexit.register(shutil.rmtree, path, True)

    def ensure_prometheus_dir(*args, **kwargs) -> str:
        return path

    ensure_prometheus_dir._mam_dir = path
    serving.ensure_prometheus_dir = ensure_prometheus_dir
    # prometheus_client's own variable, written for it and its readers: not a mam.settings one.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path


# -- 4. no submitted values in BentoML's logs --------------------------------------------------
REQUEST_ERROR_LOGGERS = ("bentoml._internal.server.http_app", "bentoml.access", "uvicorn.access",
                         "uvicorn.error")  # fmt: skip


def _client_error(exc: BaseException) -> bool:
    from bentoml.exceptions import BentoMLException
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException

    if isinstance(exc, BentoMLException):
        return int(getattr(exc.error_code, "value", exc.error_code)) < 500
    if isinstance(exc, HTTPException):
        return exc.status_code < 500
    return isinstance(exc, ValidationError)


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}


class NoTracebacks(logging.Filter):
    """Keep the line (path and method), drop the exception (its text quotes the input), and
    escape control characters (a path's ``%0a`` would start a forged line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if isinstance(record.exc_info, tuple) else None
        if exc is not None and _client_error(exc) and record.levelno > logging.INFO:
            # A request the client got wrong (answered 4xx) is no fault of the service.
            record.levelno, record.levelname = logging.INFO, "INFO"
        record.exc_info, record.exc_text = None, None
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record stays as it is
            return True
        escaped = message.translate(_CONTROL)
        if escaped != message:
            record.msg, record.args = escaped, None
        return True


def quiet_request_error_logs() -> None:
    for name in REQUEST_ERROR_LOGGERS:
        lg = logging.getLogger(name)
        if not any(isinstance(f, NoTracebacks) for f in lg.filters):
            lg.addFilter(NoTracebacks())


def apply() -> None:
    """Every patch; 4 is applied again at server start-up, after BentoML has configured its
    loggers."""
    fix_timeout_middleware()
    install_uploads_only_multipart()
    install_private_task_store()
    quiet_request_error_logs()
