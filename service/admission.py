"""Admission of tensor and pose requests: a bound on how many a worker handles at once.

The closed-loop load sweep (``loadtest/sweep.py``) showed why it is needed. Past saturation, a
10 MB tensors request spends most of its time waiting to be received and parsed on the event
loop, before anything reaches the batcher. So neither BentoML's latency budget
(``MAM_MAX_LATENCY_MS``) nor the queued-instance limit (``MAM_MAX_QUEUED_INSTANCES``) could bound
latency: at 64 closed-loop clients p95 was 9 s.
Counting requests from the moment their body has arrived, REST and gRPC together, and refusing
the excess with 503 before it is parsed keeps the work in progress bounded. Counting from the
headers instead let 16 clients sending a byte a second lock every other request out; slow
bodies are bounded by the body-read deadline (``MAM_BODY_TIMEOUT_S``) and parsing runs in
threads, off the event loop.

Video requests are not counted: they have their own slots and queue (``MAM_VIDEO_CONCURRENCY``,
``MAM_VIDEO_QUEUE``). Used only from the worker's event loop, so a plain counter is enough.
"""

from __future__ import annotations

from contextlib import contextmanager

from service import errors as E


class Admission:
    """At most ``limit`` requests at once: ``try_acquire``/``release``, or ``enter()``, which
    raises 503 ``overloaded`` when full."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the admission limit must be at least 1")
        self.limit, self.active = limit, 0

    def try_acquire(self) -> bool:
        if self.active >= self.limit:
            return False
        self.active += 1
        return True

    def release(self) -> None:
        self.active -= 1

    def refusal(self) -> E.ServiceError:
        return E.ServiceError(
            E.OVERLOADED,
            f"{self.active} tensor and pose requests are in progress, the limit of this server; "
            "retry with back-off",
        )

    @contextmanager
    def enter(self):
        if not self.try_acquire():
            raise self.refusal()
        try:
            yield
        finally:
            self.release()


_ADMISSION: Admission | None = None


def get_admission() -> Admission:
    """The worker's one gate (``MAM_MAX_TENSOR_REQUESTS``), shared by REST and gRPC."""
    global _ADMISSION
    if _ADMISSION is None:
        from service.settings import get_settings

        _ADMISSION = Admission(get_settings().max_tensor_requests)
    return _ADMISSION
