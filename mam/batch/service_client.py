"""Screening through a running service (``mam batch --service URL``): the same outcomes as the
in-process pipeline, with retries where the service asks for them.

Recordings go through the task API (``/screen/submit``, poll ``/screen/status``, ``/screen/get``)
so that long recordings outlive any single HTTP timeout; pose files through ``/screen_pose``.
503 (overloaded), 504 (timeout) and dropped connections are retried with exponential back-off;
every other error is the service's typed answer and is final. The API key comes from
``MAM_API_KEY``; it is sent only to the URL given.
"""

from __future__ import annotations

import json
import mimetypes
import random
import time
from pathlib import Path

RETRY_STATUS = frozenset({502, 503, 504})

Outcome = tuple[str, str | None, str, str]  # (status, error code, message, result JSON)


class ServiceClient:
    """Args: base URL; retries per recording; first back-off in seconds (doubles, jittered);
    poll interval for tasks; overall deadline per recording."""

    def __init__(
        self,
        url: str,
        retries: int = 5,
        backoff_s: float = 1.0,
        poll_s: float = 2.0,
        deadline_s: float = 3600.0,
        api_key: str | None = None,
    ) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.retries, self.backoff_s, self.poll_s = retries, backoff_s, poll_s
        self.deadline_s = deadline_s
        if api_key is None:
            from mam.settings import current

            api_key = current().api_key_value()
        self.api_key = key = api_key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=120)

    def close(self) -> None:
        self.http.close()

    def check(self) -> None:
        """Fail fast, before any work, if the service is not there or not ready."""
        import httpx

        try:
            r = self.http.get("/readyz", timeout=10)
        except httpx.HTTPError as e:
            raise ConnectionError(f"service at {self.url} unreachable: {type(e).__name__}") from e
        if r.status_code != 200:
            raise ConnectionError(f"service at {self.url} is not ready (HTTP {r.status_code})")

    def model(self) -> dict | None:
        """The service's ``GET /model`` (name, version, digest, ...), so that results are keyed
        by the model that made them; None when the service does not say (an older service)."""
        r = self._send("GET", "/model")
        if r.status_code != 200:
            return None
        try:
            info = r.json()
        except ValueError:
            return None
        return info if isinstance(info, dict) else None

    def _send(self, method: str, path: str, **kw):
        """One request with back-off on 502/503/504 and on dropped connections."""
        import httpx

        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                r = self.http.request(method, path, **kw)
                if r.status_code not in RETRY_STATUS or attempt == self.retries:
                    return r
            except httpx.TransportError:
                if attempt == self.retries:
                    raise
            time.sleep(delay * (0.5 + random.random()))
            delay *= 2
        raise AssertionError("unreachable")

    def screen(self, file: str | Path, kind: str, infant: dict | None) -> Outcome:
        try:
            return self._screen(Path(file), kind, infant)
        except Exception as e:  # noqa: BLE001 - one recording must not stop the archive
            return "failed", "service_unavailable", f"{type(e).__name__}: {e}", ""

    def _screen(self, file: Path, kind: str, infant: dict | None) -> Outcome:
        data = {"infant": json.dumps(infant)} if infant else {}
        content = file.read_bytes()
        if kind == "pose":
            files = {"pose": ("pose" + file.suffix.lower(), content, "application/octet-stream")}
            return _outcome(self._send("POST", "/screen_pose", files=files, data=data))
        # Neutral part name: archive file names often carry patient names.
        ctype = mimetypes.guess_type(file.name)[0] or "video/mp4"
        ctype = ctype if ctype.startswith("video/") else "video/mp4"
        files = {"video": ("recording" + file.suffix.lower(), content, ctype)}
        r = self._send("POST", "/screen/submit", files=files, data=data)
        if r.status_code != 200:
            return _outcome(r)
        task_id = r.json()["task_id"]
        deadline = time.monotonic() + self.deadline_s
        while time.monotonic() < deadline:
            s = self._send("GET", "/screen/status", params={"task_id": task_id})
            if s.status_code != 200:
                return _outcome(s)
            status = s.json()["status"]
            if status in ("completed", "failed"):
                return _outcome(self._send("GET", "/screen/get", params={"task_id": task_id}))
            if status == "canceled":
                return "failed", "canceled", "the service cancelled the task", ""
            time.sleep(self.poll_s)
        self._send("PUT", "/screen/cancel", params={"task_id": task_id})
        return "failed", "timeout", f"no result within {self.deadline_s:g} s", ""


def _outcome(r) -> Outcome:
    if r.status_code == 200:
        return "done", None, "", r.text
    try:
        err = r.json()["error"]
        return "failed", err["code"], err["message"], ""
    except (ValueError, KeyError, TypeError):
        return "failed", f"http_{r.status_code}", r.text[:200], ""
