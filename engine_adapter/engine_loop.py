"""One engine thread and a bounded queue in front of it: the server's only path to the model.

The model runs one request at a time (batch 1, one forward pass at a time on this CPU); requests
wait in a queue of at most ``max_queue``; one more is refused at once (``QueueFull``: HTTP 429)
instead of waiting without bound. A request is cancelled by its ``Job.cancel`` (the client went
away): it is skipped if still queued, and its generation stops at the next token if running.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["Cancelled", "EngineLoop", "Job", "QueueFull"]


class QueueFull(Exception):
    """The queue holds ``max_queue`` requests already."""


class Cancelled(Exception):
    """The job was cancelled before it ran."""


class Job:
    """A unit of engine work: ``fn(job)`` runs on the engine thread; ``future`` gets its result."""

    def __init__(self, fn: Callable[[Job], Any]):
        self.fn = fn
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class EngineLoop:
    """Runs submitted jobs one at a time on one thread.

    Args:
        max_queue: jobs that may wait while one runs (>= 0).
    """

    def __init__(self, max_queue: int = 16):
        if max_queue < 0:
            raise ValueError(f"max_queue: expected >= 0, got {max_queue}")
        self.max_queue = max_queue
        # The slot for the running job is counted apart: max_queue is what waits.
        self._q: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._waiting

    def submit(self, fn: Callable[[Job], Any]) -> Job:
        """Queues ``fn``; raises QueueFull when ``max_queue`` jobs already wait."""
        job = Job(fn)
        with self._lock:
            if self._waiting >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting)")
            self._waiting += 1
        self._q.put(job)
        return job

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            with self._lock:
                self._waiting -= 1
            if job.cancelled:
                job.future.set_exception(Cancelled("cancelled while queued"))
                continue
            try:
                job.future.set_result(job.fn(job))
            except BaseException as e:  # delivered to the request that submitted it
                log.exception("engine job failed")
                job.future.set_exception(e)

    def close(self, timeout: float | None = 30.0) -> None:
        """Stops the thread after the jobs already queued."""
        self._q.put(None)
        self._thread.join(timeout)
