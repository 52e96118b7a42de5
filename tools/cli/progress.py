"""A one-line progress bar on stderr (verify, compact)."""

from __future__ import annotations

import sys
import time

from .render import human_bytes, span


class Progress:
    """A one-line progress bar on stderr, redrawn at most 10 times a second; counts items
    (``advance``) or, with ``unit="bytes"``, bytes (``to``)."""

    def __init__(self, label: str, total: int, enabled: bool, unit: str = "items"):
        self.label, self.total, self.enabled, self.unit = label, total, enabled, unit
        self.t0 = self._last = time.monotonic()
        self.done = self.nbytes = 0

    def advance(self, nbytes: int) -> None:
        self.done += 1
        self.nbytes += nbytes
        self._maybe_draw()

    def to(self, nbytes: int) -> None:
        """Bytes done so far (``unit="bytes"``)."""
        self.done = self.nbytes = min(nbytes, self.total)
        self._maybe_draw()

    def _maybe_draw(self) -> None:
        now = time.monotonic()
        if self.enabled and (now - self._last >= 0.1 or self.done == self.total):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        frac = self.done / self.total if self.total else 1.0
        width = 30
        bar = "#" * int(frac * width) + "." * (width - int(frac * width))
        secs = max(now - self.t0, 1e-9)
        eta = (self.total - self.done) * secs / self.done if self.done else 0
        count = (f"{human_bytes(self.done)}/{human_bytes(self.total)}" if self.unit == "bytes"
                 else f"{self.done}/{self.total}")
        sys.stderr.write(f"\r{self.label} [{bar}] {count} {frac:4.0%} "
                         f"{human_bytes(self.nbytes / secs)}/s eta {span(eta)} ")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled:
            if self.done < self.total or not self.total:  # else advance() drew the final state
                self._draw(time.monotonic())
            sys.stderr.write("\n")
