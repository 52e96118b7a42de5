"""``kvstore compact``: give the space freed by purges and evictions back to the filesystem.

LMDB never shrinks its data file; freed pages are only reused by later writes. Compaction
replaces the file with LMDB's compacting copy (settings and lifetime counters included). It
needs the store to itself: while an engine or another command has it open it is refused, naming
those processes, and a process that opens the store meanwhile waits until the copy is in place.
"""

from __future__ import annotations

import argparse
import sys

from .progress import Progress
from .reading import compact, config
from .render import Result

NAME = "compact"


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    cp = sub.add_parser(NAME, parents=[common],
                        help="shrink the data file to the pages in use (needs the store to itself)")
    cp.add_argument("dir", nargs="?", metavar="DIR", help="store directory (instead of --path)")
    cp.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="progress bar on stderr (default: when stderr is a terminal)")


def run(args: argparse.Namespace) -> Result:
    if args.dir:
        args.path = args.dir
    bar: Progress | None = None
    enabled = sys.stderr.isatty() if args.progress is None else args.progress

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = Progress("compact", total, enabled, unit="bytes")
        bar.to(done)
    usage = compact(args, progress)
    if bar is not None:
        bar.finish()
    before, after = usage["before"], usage["after"]
    return Result({"path": str(config(args).path), "before": before, "after": after,
                   "reclaimed_bytes": before["file_bytes"] - after["file_bytes"]})
