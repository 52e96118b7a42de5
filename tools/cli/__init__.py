"""The ``kvstore`` command: look at, clean, verify and explain a store, also while an engine holds
it open.

Every command takes ``--path`` (or ``KVSTORE_PATH``), ``--config`` (or ``KVSTORE_CONFIG`` and the
``KVSTORE_*`` settings the engine reads: the disk budget, TTL and block size shown come from
there) and ``--json``. Errors are one line on stderr and a non-zero exit code: 2 for bad
arguments (options that do not go together included), 1 for a store or input that cannot be used; ``verify`` exits 3 when it found corrupt
records it did not remove (``inspect`` when the record is corrupt).

Commands read the disk tier through short LMDB read transactions, which never block an engine's
writes. A purge removes blocks from the disk tier and logs them there; running engines drop the
same blocks from their RAM tiers within a second. ``compact`` alone needs the store to itself.

Layout: one module a command (``stats``, ``ls``, ``inspect_block``, ``purge``, ``verify``,
``explain``, ``serve_metrics``, ``top``, ``compact``), each with ``run(args)`` computing plain data; ``render`` turns
that data into text or JSON; ``reading`` is the one place that calls into the store; ``blocks``,
``prompts``, ``options``, ``counters`` and ``progress`` hold what several commands share; ``parser`` builds the
command line. A command module imports no other command module.
"""

from __future__ import annotations

import os
import sys

from kvstore import KVStoreError

from .options import UsageError, duration as _duration, positive_int as _positive_int  # noqa: F401 (tests use them)
from .parser import COMMANDS, build_parser
from .render import one_line, print_text, render

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = COMMANDS[args.command].run(args)
    except UsageError as e:  # as argparse reports its own: exit 2, and where to read more
        print(f"kvstore {args.command}: error: {one_line(str(e))} (see kvstore {args.command} --help)",
              file=sys.stderr)
        return 2
    except (KVStoreError, OSError, ValueError) as e:
        # Bad input and unusable stores are reported, not traced: one line naming the problem.
        print(f"kvstore {args.command}: error: {one_line(str(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"kvstore {args.command}: interrupted", file=sys.stderr)
        return 130
    try:
        text = render(args.command, result, args.json)
        if text:
            print_text(text)
    except BrokenPipeError:  # `kvstore ls | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return result.code
