"""The BentoML internals the service patches (``service.bentoml_compat``): each patch still
applies, still does what it says, and the upstream behaviour it works around is still there (a
test here fails when an upgrade changes it; then revisit the patch)."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from pathlib import Path

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


def _multipart_request(body: bytes, ctype: str):
    from starlette.requests import Request

    scope = {"type": "http", "method": "POST", "path": "/x", "query_string": b"",
             "headers": [(b"content-type", ctype.encode())]}  # fmt: skip
    sent = []

    async def receive():
        if sent:
            return {"type": "http.disconnect"}
        sent.append(1)
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(scope, receive)


def _form_input():
    from _bentoml_sdk.io_models import IODescriptor

    class Form(IODescriptor):
        instances: Path
        infant: dict | None = None

    return Form


def _part(name: str, data: bytes, filename: str | None = "f.npy", boundary: str = "XYZ") -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return (f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"  # fmt: skip


def test_upstream_multipart_errors_are_500s_and_ours_are_400s(tmp_path, monkeypatch):
    """A body without its boundary: upstream raises starlette's HTTPException (BentoML answers
    500); ours a BadInput (400). JSON nested too deep: upstream RecursionError (500)."""
    import bentoml._internal.context as bctx
    from _bentoml_impl.serde import MultipartSerde
    from bentoml.exceptions import BadInput
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException

    monkeypatch.setattr(bctx, "request_temp_dir", lambda: str(tmp_path))
    form = _form_input()
    body = _part("instances", b"data") + b"--XYZ--\r\n"
    with pytest.raises((HTTPException, MultiPartException)):
        asyncio.run(MultipartSerde().parse_request(_multipart_request(body, "multipart/form-data"),
                                                   form))  # fmt: skip
    deep = _part("instances", b"data") + _part("infant", b"[" * 5000 + b"]" * 5000, None)
    with pytest.raises(RecursionError):
        asyncio.run(
            MultipartSerde().parse_request(
                _multipart_request(deep + b"--XYZ--\r\n", "multipart/form-data; boundary=XYZ"), form
            )
        )
    cls = compat.install_uploads_only_multipart()
    deep_body = deep + b"--XYZ--\r\n"
    for payload, ctype in ((body, "multipart/form-data"),
                           (body, "multipart/form-data; boundary=ABC"),
                           (deep_body, "multipart/form-data; boundary=XYZ")):  # fmt: skip
        with pytest.raises(BadInput):
            asyncio.run(cls().parse_request(_multipart_request(payload, ctype), form))


def test_uploads_are_copied_under_a_neutral_name(tmp_path, monkeypatch):
    """Upstream named the copy after the client's file name (300 characters: OSError, a 500)."""
    import bentoml._internal.context as bctx

    monkeypatch.setattr(bctx, "request_temp_dir", lambda: str(tmp_path))
    cls = compat.install_uploads_only_multipart()
    name = "Patient_Name_" + "x" * 300 + ".npy"
    body = _part("instances", b"DATA" * 1000, name) + _part("infant", b'{"a": 1}', None)
    request = _multipart_request(body + b"--XYZ--\r\n", "multipart/form-data; boundary=XYZ")
    parsed = asyncio.run(cls().parse_request(request, _form_input()))
    assert parsed.instances.read_bytes() == b"DATA" * 1000 and parsed.infant == {"a": 1}
    assert parsed.instances.parent == tmp_path and "Patient" not in parsed.instances.name
    assert parsed.instances.suffix == ".npy"


# -- 3. the task store ------------------------------------------------------------------------
def test_upstream_task_store_writes_the_request_to_a_file_with_our_table(tmp_path):
    """BentoML's own init_db makes the table our in-memory store copies, in a file."""
    from _bentoml_impl.tasks.result import Sqlite3Store

    compat.install_private_task_store()
    store = tmp_path / "tasks.db"
    Sqlite3Store._mam_upstream_init_db.__func__(Sqlite3Store, str(store))
    with sqlite3.connect(store) as db:
        upstream = [r[1:3] for r in db.execute(f"PRAGMA table_info({compat.TASK_TABLE})")]
    with sqlite3.connect(":memory:") as db:
        db.execute(compat.TASK_TABLE_DDL)
        ours = [r[1:3] for r in db.execute(f"PRAGMA table_info({compat.TASK_TABLE})")]
    assert upstream == ours and ("input", "BLOB") in ours


def test_task_store_is_in_memory_and_keeps_no_request(tmp_path):
    from _bentoml_impl.tasks.result import ResultStatus, Sqlite3Store
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    compat.install_private_task_store()
    file = tmp_path / "tasks.db"
    Sqlite3Store.init_db(str(file))
    secret = b"RECORDING-BYTES patient.mp4 birth_weight_g"
    scope = {"type": "http", "method": "POST", "path": "/screen/submit",
             "headers": [(b"authorization", b"Bearer secret-key")]}  # fmt: skip

    async def receive():
        return {"type": "http.request", "body": secret, "more_body": False}

    async def run():
        async with Sqlite3Store(str(file)) as store:
            request = Request(scope, receive)
            task_id = await store.new_entry("screen", request)
            assert await request.body() == secret  # read while the client was there
            (stored,) = await (
                await store._conn.execute("SELECT input FROM result WHERE task_id = ?", (task_id,))
            ).fetchone()
            await store.set_result(task_id, JSONResponse({"ok": 1}), ResultStatus.COMPLETED)
            row = await store.get(task_id)
            return stored, row

    stored, row = asyncio.run(run())
    assert b"RECORDING" not in stored and b"secret-key" not in stored
    assert json.loads(stored)["scope"]["path"] == "/screen/submit"
    assert row.status is ResultStatus.COMPLETED and json.loads(row.result.body) == {"ok": 1}
    assert not file.exists() and list(tmp_path.iterdir()) == []


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


def test_request_error_logs_escape_control_characters_and_keep_4xx_below_error():
    from bentoml.exceptions import BadInput

    f = compat.NoTracebacks()
    rec = logging.LogRecord("bentoml.access", logging.INFO, "", 0, "path=%s", ("/x\nFORGED",), None)
    assert f.filter(rec) and rec.getMessage() == "path=/x\\x0aFORGED"
    try:
        raise BadInput("bad")
    except BadInput:
        import sys

        rec = logging.LogRecord("h", logging.ERROR, "", 0, "Exception on /x", (), sys.exc_info())
    assert f.filter(rec) and rec.levelno == logging.INFO and rec.exc_info is None
    try:
        raise KeyError("x")
    except KeyError:
        import sys

        rec = logging.LogRecord("h", logging.ERROR, "", 0, "Exception on /x", (), sys.exc_info())
    assert f.filter(rec) and rec.levelno == logging.ERROR


# -- 5. one Prometheus folder per instance ------------------------------------------------------
def test_upstream_empties_the_shared_prometheus_folder(tmp_path):
    from bentoml.serving import ensure_prometheus_dir

    shared = tmp_path / "prometheus_multiproc_dir"
    shared.mkdir()
    (shared / "counter_123.db").write_bytes(b"another instance's metrics")
    assert ensure_prometheus_dir(str(shared)) == str(shared)
    assert list(shared.iterdir()) == []  # what two services on one host did to each other


def test_each_instance_gets_its_own_prometheus_folder_removed_at_exit(tmp_path):
    import os
    import subprocess
    import sys

    stale = tmp_path / f"{compat.PROMETHEUS_PREFIX}999999999-abc"  # a pid that cannot exist
    live = tmp_path / f"{compat.PROMETHEUS_PREFIX}{os.getpid()}-abc"
    stale.mkdir(), live.mkdir()
    code = (
        "import os, bentoml.serving as s; from service import bentoml_compat as c; "
        "d = c.install_private_prometheus_dir(); "
        "assert s.ensure_prometheus_dir() == d == os.environ['PROMETHEUS_MULTIPROC_DIR']; print(d)"
    )
    env = os.environ | {"TMPDIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       cwd=Path(compat.__file__).parents[1], timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    made = Path(r.stdout.strip().splitlines()[-1])
    assert made.parent == tmp_path and not made.exists()  # removed when the instance exited
    assert not stale.exists() and live.exists()
