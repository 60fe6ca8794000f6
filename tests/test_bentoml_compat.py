"""The BentoML internals the service patches (``service.bentoml_compat``): each patch still
applies, still does what it says, and the upstream behaviour it works around is still there (a
test here fails when an upgrade changes it; then revisit the patch)."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3

import pytest

pytest.importorskip("bentoml")

from service import bentoml_compat as compat  # noqa: E402


def test_written_for_this_bentoml():
    import bentoml

    assert bentoml.__version__ == compat.KNOWN_VERSION


# -- 1. TimeoutMiddleware ----------------------------------------------------------------------
def _timeout_middleware(inner, timeout: float):
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    from service.bentoml_compat import fix_timeout_middleware

    assert fix_timeout_middleware()
    return TimeoutMiddleware(inner, timeout=timeout)


def test_finished_requests_are_not_kept_alive_by_the_timeout_timer():
    """BentoML's TimeoutMiddleware held every request's context for the whole service timeout
    (the soak's memory growth): after the fix, nothing of a finished request stays reachable."""
    import asyncio
    import contextvars
    import gc
    import weakref

    request_state = contextvars.ContextVar("request_state")

    class State:  # stands for the span, closures and request BentoML keeps in the context
        pass

    async def inner(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def main() -> list:
        mw = _timeout_middleware(inner, timeout=600)
        refs = []

        async def one():
            state = State()
            refs.append(weakref.ref(state))
            request_state.set(state)
            await mw({"type": "http"}, _receive, _discard)

        for _ in range(50):
            await asyncio.create_task(one())
        for _ in range(3):
            await asyncio.sleep(0)  # let the last request's done-callbacks run
        gc.collect()
        return [r for r in refs if r() is not None]

    assert asyncio.run(main()) == []


def test_the_fixed_timeout_middleware_still_answers_504():
    import asyncio

    sent = []

    async def slow(scope, receive, send):
        await asyncio.sleep(5)

    async def record(message):
        sent.append(message)

    asyncio.run(_timeout_middleware(slow, timeout=0.05)({"type": "http"}, _receive, record))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 504


async def _receive():
    return {"type": "http.request", "body": b""}


async def _discard(message):
    pass


def test_the_fixed_timeout_middleware_ends_with_an_app_that_never_answers():
    """An app that fails or returns before starting a response ends the request at once (the
    original waited for the timer: up to an hour on Screening)."""
    import asyncio

    async def raises(scope, receive, send):
        raise RuntimeError("boom")

    async def silent(scope, receive, send):
        return None

    async def main():
        async with asyncio.timeout(5):
            with pytest.raises(RuntimeError, match="boom"):
                await _timeout_middleware(raises, timeout=600)({"type": "http"}, _receive, _discard)
            await _timeout_middleware(silent, timeout=600)({"type": "http"}, _receive, _discard)

    asyncio.run(main())


def test_upstream_timeout_middleware_still_leaks_its_timer():
    """Unpatched (a fresh process), the middleware leaves a live timer behind every finished
    request: the leak the patch fixes is still upstream."""
    import subprocess
    import sys

    code = (
        "import asyncio\n"
        "from bentoml._internal.server.http.traffic import TimeoutMiddleware\n"
        "async def inner(scope, receive, send):\n"
        "    await send({'type': 'http.response.start', 'status': 200, 'headers': []})\n"
        "async def rcv():\n"
        "    return {'type': 'http.request', 'body': b''}\n"
        "async def snd(m):\n"
        "    pass\n"
        "async def main():\n"
        "    for _ in range(5):\n"
        "        await TimeoutMiddleware(inner, timeout=600)({'type': 'http'}, rcv, snd)\n"
        "    print(sum(not h.cancelled() for h in asyncio.get_running_loop()._scheduled))\n"
        "asyncio.run(main())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert int(out.stdout.strip().splitlines()[-1]) >= 5, out.stderr[-2000:]


# -- 2. multipart: uploads only ----------------------------------------------------------------
def test_upstream_multipart_fetches_a_string_file_field_and_ours_refuses():
    import contextlib

    import _bentoml_impl.serde as serde
    import httpx
    from _bentoml_impl.serde import ALL_SERDE, MultipartSerde
    from bentoml.exceptions import BadInput
    from starlette.datastructures import UploadFile

    # Upstream: a string is a URL the server downloads (recorded here instead of fetched).
    fetched = []

    async def get(self, url, *a, **kw):
        fetched.append(url)
        raise httpx.ConnectError("not fetched in tests")

    mp = pytest.MonkeyPatch()
    mp.setattr(httpx.AsyncClient, "get", get)
    mp.setattr(serde, "make_safe_connect", contextlib.nullcontext)
    try:
        with pytest.raises(httpx.ConnectError):
            asyncio.run(MultipartSerde.ensure_file("http://127.0.0.1:9/recording.mp4"))
    finally:
        mp.undo()
    assert fetched == ["http://127.0.0.1:9/recording.mp4"]
    cls = compat.install_uploads_only_multipart()
    assert ALL_SERDE[MultipartSerde.media_type] is cls and issubclass(cls, MultipartSerde)
    with pytest.raises(BadInput, match="uploaded files"):
        asyncio.run(cls.ensure_file("http://127.0.0.1:9/recording.mp4"))
    upload = UploadFile(file=None, filename="x.mp4")
    assert asyncio.run(cls.ensure_file(upload)) is upload


# -- 3. the task store -------------------------------------------------------------------------
def test_task_store_keeps_the_request_where_forget_task_input_clears_it(tmp_path):
    from _bentoml_impl.tasks.result import Sqlite3Store

    store = tmp_path / "tasks.db"
    Sqlite3Store.init_db(str(store))
    with sqlite3.connect(store) as db:
        cols = {r[1] for r in db.execute(f"PRAGMA table_info({compat.TASK_TABLE})")}
        assert {"task_id", compat.TASK_INPUT} <= cols
        db.execute(
            f"INSERT INTO {compat.TASK_TABLE} (task_id, name, {compat.TASK_INPUT}, status) "
            "VALUES (?, ?, ?, ?)",
            ("t1", "screen", b"RECORDING-BYTES Authorization: Bearer secret", "in_progress"),
        )
    compat.forget_task_input("t1", str(store))
    with sqlite3.connect(store) as db:
        (stored,) = db.execute(f"SELECT {compat.TASK_INPUT} FROM result").fetchone()
    assert json.loads(stored)["content"] == ""
    assert b"RECORDING-BYTES" not in store.read_bytes()


# -- 4. no submitted values in BentoML's logs --------------------------------------------------
def test_request_error_logs_keep_the_line_without_the_exception():
    from bentoml._internal.server import http_app

    assert http_app.logger.name in compat.REQUEST_ERROR_LOGGERS
    compat.quiet_request_error_logs()
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    lg = logging.getLogger(http_app.logger.name)
    h = Keep()
    lg.addHandler(h)
    try:
        try:
            raise ValueError("birth_weight_g: 3100 is not valid")
        except ValueError:
            lg.error("Exception on /screen [POST]", exc_info=True)
    finally:
        lg.removeHandler(h)
    assert records == ["Exception on /screen [POST]"]
