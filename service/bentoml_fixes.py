"""A fix for BentoML 1.4.40's ``TimeoutMiddleware``, which leaked memory per request.

Found by the 10-minute soak of ``loadtest/sweep.py --soak`` (issue 7): both worker processes grew
about 36 MiB/min under steady load. tracemalloc and ``gc`` showed every request's state alive
long after its response: each request's ``TimeoutMiddleware`` schedules ``loop.call_later(timeout,
...)`` and never cancels it, and an asyncio ``TimerHandle`` keeps the ``contextvars.Context`` it
was scheduled in, which holds the request's OpenTelemetry span, its ASGI ``send`` closures and
BentoML's request context. So every request stayed reachable for the whole service timeout
(600 s for ``ClipModel``, an hour for ``Screening``): about 1,000 live timers per worker after a
few minutes.

The replacement behaves the same (504 after ``timeout`` seconds without a response start) but
schedules its timer in an empty context, so the timer holds nothing of the request, and cancels
it when the request ends (asyncio drops cancelled timers from its heap once they are the
majority, or when they fall due). ``tests/test_service.py`` checks the patched class
leaves no live timer behind. Applied once at import of ``service.app`` in every worker process.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging

logger = logging.getLogger("mam.service")


FIXED_VERSION = "1.4.40"  # the BentoML release whose TimeoutMiddleware this replaces


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
    if bentoml.__version__ != FIXED_VERSION or not callable(getattr(cls, "_set_timer_out", None)):
        logger.warning(
            "BentoML %s is not %s: its TimeoutMiddleware timer fix was not applied",
            bentoml.__version__, FIXED_VERSION,
        )  # fmt: skip
        return False
    cls.__call__ = _timeout_call
    return True
