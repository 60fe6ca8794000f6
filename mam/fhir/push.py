"""Posting a result's Bundle to a site's FHIR server as a transaction, with retries.

``FhirPusher.push`` POSTs the Bundle to the server's base URL (a FHIR transaction), with
``Authorization: Bearer <token>`` when a token is configured (read at every push from its
mounted secret file, so a rotated token is picked up). Connection failures, timeouts, 408, 425,
429 and 5xx are retried with exponential back-off (jittered, honouring ``Retry-After`` up to a
cap); any other 4xx is final (``rejected``: the server will not accept this Bundle however often
it is sent). Retrying is safe: the Bundle conditionally creates its resources on their
identifiers (``mam.fhir.bundle``), so a transaction that arrived although its answer was lost is
not duplicated.

A push never touches the result it carries: the service keeps answering ``/screen/get`` whatever
the push did, and every outcome is counted (``on_outcome``) and audited by the caller. Nothing
of the Bundle, the server's answer (an OperationOutcome may quote the data) or the token is
logged; log lines name the outcome, the status and the attempt count only.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
Outcome = Literal["ok", "failed", "rejected"]

__all__ = ["FHIR_JSON", "FhirPusher", "PushResult"]


@dataclass(frozen=True)
class PushResult:
    outcome: Outcome  # ok; failed (gave up after retries); rejected (a final 4xx)
    attempts: int
    status: int | None  # the last HTTP status (None: no answer)


class FhirPusher:
    """Args:
    base_url: the FHIR server's base (a transaction is POSTed to it).
    token: a bearer token, or None.
    token_file: a file holding the token (a mounted secret), read at every push.
    attempts: tries per Bundle, the first included.
    backoff_s: first wait between tries; doubles, jittered; ``max_backoff_s`` caps it.
    timeout_s: per request.
    on_outcome: called with each finished push's ``PushResult`` (metrics, audit).
    on_retry: called before each retry (metrics).
    transport: an httpx transport (tests).
    """

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        token_file: str | Path | None = None,
        attempts: int = 5,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        timeout_s: float = 30.0,
        on_outcome: Callable[[PushResult], None] | None = None,
        on_retry: Callable[[], None] | None = None,
        transport=None,
        workers: int = 2,
    ) -> None:
        import httpx

        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.base_url = base_url.rstrip("/")
        self._token, self._token_file = token, Path(token_file) if token_file else None
        self.attempts, self.backoff_s, self.max_backoff_s = attempts, backoff_s, max_backoff_s
        self.on_outcome, self.on_retry = on_outcome, on_retry
        self.http = httpx.Client(timeout=timeout_s, transport=transport)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="fhir-push")

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}
        token = self._token
        if self._token_file is not None:
            token = self._token_file.read_text().strip() or None
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def _wait(self, attempt: int, retry_after: str | None) -> None:
        delay = self.backoff_s * 2**attempt * (0.5 + random.random())
        if retry_after and retry_after.strip().isdigit():
            delay = max(delay, float(retry_after))
        time.sleep(min(delay, self.max_backoff_s))

    def push(self, bundle: dict) -> PushResult:
        """POST ``bundle``, retrying as the module docstring says; never raises for the
        server's or the network's failures."""
        import httpx

        body = json.dumps(bundle).encode()
        status: int | None = None
        result: PushResult | None = None
        for attempt in range(self.attempts):
            retry_after = None
            try:
                r = self.http.post(self.base_url, content=body, headers=self._headers())
                status = r.status_code
                if 200 <= status < 300:
                    result = PushResult("ok", attempt + 1, status)
                    break
                if status not in RETRY_STATUS:
                    result = PushResult("rejected", attempt + 1, status)
                    break
                retry_after = r.headers.get("retry-after")
            except (httpx.HTTPError, OSError) as e:
                status = None
                logger.warning("FHIR push attempt %d: %s", attempt + 1, type(e).__name__)
            if attempt + 1 < self.attempts:
                if self.on_retry:
                    self.on_retry()
                self._wait(attempt, retry_after)
        result = result or PushResult("failed", self.attempts, status)
        log = logger.info if result.outcome == "ok" else logger.warning
        log("FHIR push %s after %d attempt(s), last status %s", result.outcome, result.attempts,
            result.status)  # fmt: skip
        if self.on_outcome:
            self.on_outcome(result)
        return result

    def submit(self, bundle: dict, done: Callable[[PushResult], None] | None = None) -> Future:
        """Push in the background; ``done`` gets the result. The caller never waits."""

        def run() -> PushResult:
            try:
                result = self.push(bundle)
            except Exception:  # noqa: BLE001 - a push must never take the service down
                logger.exception("FHIR push failed unexpectedly")
                result = PushResult("failed", 0, None)
                if self.on_outcome:
                    self.on_outcome(result)
            if done:
                done(result)
            return result

        return self._pool.submit(run)

    def close(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait)
        self.http.close()
