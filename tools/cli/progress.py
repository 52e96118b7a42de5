"""A one-line progress bar on stderr (verify)."""

from __future__ import annotations

import sys
import time

from .render import human_bytes, span


class Progress:
    """A one-line progress bar on stderr, redrawn at most 10 times a second."""

    def __init__(self, label: str, total: int, enabled: bool):
        self.label, self.total, self.enabled = label, total, enabled
        self.t0 = self._last = time.monotonic()
        self.done = self.nbytes = 0

    def advance(self, nbytes: int) -> None:
        self.done += 1
        self.nbytes += nbytes
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
        sys.stderr.write(f"\r{self.label} [{bar}] {self.done}/{self.total} {frac:4.0%} "
                         f"{human_bytes(self.nbytes / secs)}/s eta {span(eta)} ")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled:
            if self.done < self.total or not self.total:  # else advance() drew the final state
                self._draw(time.monotonic())
            sys.stderr.write("\n")
