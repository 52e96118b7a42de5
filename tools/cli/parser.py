"""The command line: the options every command shares, and one subcommand a command module."""

from __future__ import annotations

import argparse

from . import compact, explain, inspect_block, ls, purge, serve_metrics, stats, top, verify
from .options import Parser

# In the order --help lists them; each module has NAME, add_parser(sub, common) and run(args).
COMMANDS = {m.NAME: m for m in (stats, ls, inspect_block, purge, verify, explain, serve_metrics, top, compact)}


def build_parser() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    common.add_argument("--path", help="store directory (default: $KVSTORE_PATH)")
    common.add_argument("--config", metavar="FILE",
                        help="the engine's TOML config, for budget, TTL and block size (default: $KVSTORE_CONFIG)")
    common.add_argument("--json", action="store_true", help="print JSON instead of text")
    p = Parser(prog="kvstore", description="Inspect, clean, verify and explain a kvstore KV-cache store.")
    p.add_argument("--version", action=_Version, help="print the version and the data formats it reads, and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS.values():
        command.add_parser(sub, common)
    return p


class _Version(argparse.Action):
    """``--version``: the installed package's version and the record and disk formats this build
    reads (a store written by a newer format is refused)."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib.metadata import PackageNotFoundError, version

        from kvstore import __version__
        from kvstore.codec import FORMAT_VERSION
        from kvstore.tiers.disk.env import DISK_FORMAT_VERSION
        try:
            installed = version("kvstore")
        except PackageNotFoundError:  # run from a checkout that is not installed
            installed = __version__
        print(f"kvstore {installed} (record format {FORMAT_VERSION}, disk format {DISK_FORMAT_VERSION})")
        parser.exit(0)
