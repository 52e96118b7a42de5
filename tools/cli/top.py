"""``kvstore top``: live rates from the store's persisted lifetime counters, like
``redis-cli --stat``; works from outside the engines.

Each line compares two samples of the counters every process persisted (engines flush theirs
every few seconds while they write), so a rate covers whole flushes: it is exact over the
interval's flushes, and an interval shorter than the engines' flush period shows bursts.

On a terminal it stops on ``q`` (read without Enter) or Ctrl-C, both a normal exit (0).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import sys
import termios
import time
import tty

from .counters import lifetime_counters
from .options import positive_seconds
from .reading import open_view
from .render import Result, print_text, top_header, top_line

NAME = "top"


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    tp = sub.add_parser(NAME, parents=[common], help="live rates: requests/s, hit rate, loads and stores, evictions/s",
                        description="Print the store's rates every interval, from the lifetime counters "
                                    "every process persists (requests/s, hit rate, hit tokens/s, loaded bytes/s "
                                    "and stored blocks and bytes/s by tier, evictions/s by tier and reason, disk occupancy).")
    tp.add_argument("--interval", type=positive_seconds, default=5.0, metavar="S",
                    help="seconds between samples, > 0 (default 5)")
    tp.add_argument("--once", action="store_true", help="one interval, one line, then exit")


def sample(view) -> tuple[float, dict[str, float], dict]:
    u = view.usage()
    # One block layout a store: the raw size of one block is the disk tier's mean.
    block = u.raw_bytes / u.entries if u.entries else 0.0
    return time.monotonic(), view.counters(), {"entries": u.entries, "bytes": u.bytes, "budget": u.budget,
                                               "block_raw_bytes": block}


def rates(first: tuple, second: tuple) -> dict:
    """The counters' rates between two samples, grouped as stats groups the totals."""
    (t0, c0, _), (t1, c1, disk) = first, second
    dt = t1 - t0
    per_s = {k: (v - c0.get(k, 0.0)) / dt for k, v in c1.items()}
    r = lifetime_counters(per_s)
    return {"seconds": dt, "requests_per_s": r["requests"], "hit_rate": r["hit_rate"],
            "hit_tokens_per_s": r["hit_tokens"], "miss_tokens_per_s": r["miss_tokens"],
            "stored_blocks_per_s": r["stored_blocks"], "loaded_bytes_per_s": r["loaded_bytes"],
            "stored_bytes_per_s": {t: v * disk["block_raw_bytes"] for t, v in r["stored_blocks"].items()},
            "evictions_per_s": r["evictions"],
            "dropped_writes_per_s": r["dropped_writes_total"], "disk": disk}


@contextlib.contextmanager
def _keys():
    """A ``wait(seconds) -> quit?`` function: on a terminal it returns early, True, when ``q`` or
    Ctrl-C is typed (the terminal in cbreak mode meanwhile, restored after); elsewhere it just
    sleeps (and Ctrl-C raises KeyboardInterrupt).

    On a terminal Ctrl-C raises nothing: its handler does nothing and the signal wakes ``wait``
    through ``signal.set_wakeup_fd``, so it never lands inside the store's code as a
    KeyboardInterrupt. (One that did once left top running after Ctrl-C, in CI.)"""
    fd = sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() else None
    if fd is None:
        def sleep(seconds: float) -> bool:
            time.sleep(seconds)
            return False
        yield sleep
        return
    woken, wake = os.pipe()
    os.set_blocking(wake, False)
    os.set_blocking(woken, False)
    handler = signal.signal(signal.SIGINT, lambda *_: None)
    old_wake = signal.set_wakeup_fd(wake)
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)  # keys without Enter; Ctrl-C still sends SIGINT

    def wait(seconds: float) -> bool:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            ready = select.select([woken, fd], [], [], left)[0]
            if woken in ready and signal.SIGINT in os.read(woken, 512):  # signal numbers
                return True
            if fd in ready and os.read(fd, 1) in (b"q", b"Q"):
                return True
        return False
    try:
        yield wait
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        signal.set_wakeup_fd(old_wake)
        signal.signal(signal.SIGINT, handler)
        os.close(woken)
        os.close(wake)


def run(args: argparse.Namespace) -> Result:
    """Prints a line an interval (a JSON object a line with --json) until ``q`` or Ctrl-C (exit
    0); no result."""
    try:
        with open_view(args) as view, _keys() as wait:
            _loop(args, view, wait)
    except KeyboardInterrupt:  # the usual way to stop a live view: not an error
        pass
    return Result(None)


def _loop(args: argparse.Namespace, view, wait) -> None:
    last = sample(view)
    lines = 0
    while True:
        if wait(args.interval):
            return
        now = sample(view)
        r = rates(last, now)
        last = now
        if args.json:
            print_text(json.dumps(r))
        else:
            if lines % 20 == 0:
                print_text(top_header())
            print_text(top_line(r))
        lines += 1
        if args.once:
            return
