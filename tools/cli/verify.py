"""``kvstore verify``: check every record's checksums; ``--repair`` removes the corrupt ones and
the blocks chained below them."""

from __future__ import annotations

import argparse
import sys
import time

from kvstore.codec import Codec
from kvstore.errors import CorruptEntryError

from .progress import Progress
from .reading import open_view
from .render import Result

NAME = "verify"


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    vp = sub.add_parser(NAME, parents=[common], help="check every record's checksum")
    vp.add_argument("--repair", action="store_true", help="remove corrupt records (and blocks chained below them)")
    vp.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="progress bar on stderr (default: when stderr is a terminal)")


def run(args: argparse.Namespace) -> Result:
    """Exit code 3 when corrupt records were found and not removed."""
    bad: dict[bytes, str] = {}
    codec = Codec()
    with open_view(args, writable=args.repair) as view:
        entries = view.entries()
        progress = Progress("verify", len(entries),
                            sys.stderr.isatty() if args.progress is None else args.progress)
        ok = vanished = 0
        t0 = time.monotonic()
        for key, _ in entries:
            found = view.read_record(key)  # one short read transaction per record
            if found is None:
                vanished += 1  # evicted or purged since the listing: not an error
                progress.advance(0)
                continue
            record, m = found
            try:
                codec.decode(record)
                ok += 1
            except CorruptEntryError as e:
                bad[key] = str(e)
            progress.advance(m.raw_bytes)
        progress.finish()
        seconds = time.monotonic() - t0
        repaired: list[bytes] = []
        below: set[bytes] = set()
        if args.repair and bad:
            # Check again right before deleting: the engine may have replaced a bad record.
            still = set()
            for key in bad:
                found = view.read_record(key)
                try:
                    if found is not None:
                        codec.decode(found[0])
                except CorruptEntryError:
                    still.add(key)
            plan = view.plan_purge(keys=still)  # and what is chained below them
            below = set(plan.chained_below)
            # The bad records count as corrupt (evictions and corrupt records in stats); the
            # blocks chained below them, sound but unreachable now, as purged.
            view.remove(frozenset(still), reason="corrupt")
            view.remove(plan.keys - still)
            repaired = sorted(still)
    data = {"checked": len(entries), "ok": ok, "corrupt": len(bad), "vanished": vanished,
            "seconds": round(seconds, 3),
            "bad": [{"key": k.hex(), "error": e, "removed": k in repaired} for k, e in sorted(bad.items())],
            "repaired": len(repaired), "chained_below_removed": len(below)}
    return Result(data, 3 if bad and not repaired else 0)
