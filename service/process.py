"""Start ``bentoml serve`` for the service as a child process, for the tests, the benchmarks and
the load tests, with the command ``mam serve`` execs (``mam.cli.serve.serve_command``)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from mam.cli.serve import serve_command as _serve_command

REPO = Path(__file__).resolve().parent.parent


def serve_command(port: int, host: str = "127.0.0.1") -> list[str]:
    """``bentoml serve`` through ``service.launch`` (one metrics folder per instance)."""
    return _serve_command(port, host, REPO)


def private_task_store() -> str:
    """Where BentoML's task store lives: in the worker's memory (``service.bentoml_compat``
    keeps it there whatever this says; this only stops BentoML from naming a file in its home).
    Nothing of a task is written to disk, and no folder is left behind by a start."""
    return ":memory:"


class ServerProcess:
    """``with ServerProcess(port, env) as s:`` starts the service in a session of its own, waits
    for ``/readyz``, and stops the whole process group on exit. Output goes to ``log_path``.
    ``command``: its argv (default: ``serve_command(port)``, as ``mam serve`` starts it)."""

    def __init__(
        self,
        port: int,
        env: dict[str, str],
        log_path: Path,
        ready_timeout_s=240.0,
        *,
        command: list[str] | None = None,
        cwd: Path = REPO,
    ):
        self.port, self.env, self.log_path = port, env, Path(log_path)
        self.ready_timeout_s = ready_timeout_s
        self.command, self.cwd = command or serve_command(port), cwd
        self.base = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        import httpx

        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self.command, env=self.env, cwd=self.cwd, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + self.ready_timeout_s
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError("bentoml serve exited:\n" + self.log_tail())
                try:
                    if httpx.get(self.base + "/readyz", timeout=2).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"not ready in {self.ready_timeout_s:g} s:\n" + self.log_tail()
                    )
                time.sleep(0.5)
        except BaseException:
            self.__exit__()
            raise

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, n: int = 3000) -> str:
        return self.log()[-n:]

    def __exit__(self, *exc) -> None:
        self.stop()
        self._log.close()

    def stop(self) -> None:
        """SIGTERM to the process group (the server and every worker), SIGKILL after 30 s; a
        process that already exited is left as it is (a test may check it exited cleanly)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
