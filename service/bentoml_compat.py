"""Every place the service reaches into BentoML's internals, gated on the release it was written
for (BentoML ``KNOWN_VERSION``), each with a test (``tests/test_bentoml_compat.py``) that fails
when an upgrade changes the behaviour it patches:

1. ``fix_timeout_middleware``: 1.4.40's ``TimeoutMiddleware`` leaked memory per request (below).
2. ``UploadsOnlyMultipart``: BentoML's multipart parsing fetches a file field given as a string
   as a URL (the service must never fetch on a client's behalf) and turns a binary part under an
   unexpected name into a 500; both become 400.
3. ``forget_task_input``: BentoML's task store (``_bentoml_impl.tasks.result``, table ``result``,
   column ``input``) keeps each task's request, here the recording and the Authorization header.
4. ``quiet_request_error_logs``: BentoML logs input-validation failures with the pydantic error,
   whose text quotes the submitted values (infant data); the line stays, the exception goes.

Applied once, at import of ``service.app``, in every worker process (``apply``). On another
BentoML release each patch still applies where the patched object has the expected shape, with a
warning, so an upgrade is noticed; run the compat tests and the soak before trusting it.

The timeout fix, found by the 10-minute soak of ``loadtest/sweep.py --soak`` (issue 7): both
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
import contextvars
import json
import logging
import sqlite3
from contextlib import closing

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
def _multipart_class():
    from _bentoml_impl.serde import MultipartSerde
    from bentoml.exceptions import BadInput
    from starlette.datastructures import UploadFile

    class UploadsOnlyMultipart(MultipartSerde):
        """BentoML's multipart parsing with the two holes closed (module docstring, 2)."""

        @staticmethod
        async def ensure_file(obj):
            if isinstance(obj, UploadFile):
                return obj
            raise BadInput("file fields must be uploaded files (multipart parts with a filename)")

        async def parse_request(self, request, cls):
            try:
                return await super().parse_request(request, cls)
            except UnicodeDecodeError:
                raise BadInput(
                    "a binary part was sent under an unexpected name; expected "
                    f"{sorted(cls.model_fields)}"
                ) from None

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


# -- 3. the task store keeps no recording ------------------------------------------------------
TASK_TABLE, TASK_INPUT = "result", "input"


def forget_task_input(task_id: str, store_file: str | None = None) -> None:
    """Overwrite a finished task's stored request with an empty one (retry is refused by the
    middleware) and truncate the write-ahead log, so no recording stays on disk."""
    if store_file is None:
        from bentoml._internal.configuration.containers import BentoMLContainer

        store_file = BentoMLContainer.result_store_file.get()
    empty = {"scope": {"type": "http", "method": "POST", "path": "/screen", "headers": []}}
    empty["content"] = ""
    try:
        # One connection, closed here (sqlite3's context manager only commits); the checkpoint
        # has to run outside the UPDATE's transaction.
        with closing(sqlite3.connect(store_file, timeout=30)) as db:
            db.execute("PRAGMA secure_delete=ON")
            with db:
                db.execute(
                    f"UPDATE {TASK_TABLE} SET {TASK_INPUT} = ? WHERE task_id = ?",
                    (json.dumps(empty), task_id),
                )
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except sqlite3.Error:
        logger.exception("could not clear a finished task's stored input")


# -- 4. no submitted values in BentoML's logs --------------------------------------------------
REQUEST_ERROR_LOGGERS = ("bentoml._internal.server.http_app", "bentoml.access")


class NoTracebacks(logging.Filter):
    """Keep the line (path and method), drop the exception (its text quotes the input)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return True


def quiet_request_error_logs() -> None:
    for name in REQUEST_ERROR_LOGGERS:
        lg = logging.getLogger(name)
        if not any(isinstance(f, NoTracebacks) for f in lg.filters):
            lg.addFilter(NoTracebacks())


def apply() -> None:
    """The patches that act at import (1, 2, 4); 3 is called per finished task. 4 is applied
    again at server start-up, after BentoML has configured its loggers."""
    fix_timeout_middleware()
    install_uploads_only_multipart()
    quiet_request_error_logs()
