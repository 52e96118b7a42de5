"""The command line: the options every command shares, and one subcommand a command module."""

from __future__ import annotations

import argparse

from . import explain, inspect_block, ls, purge, serve_metrics, stats, verify
from .options import Parser

# In the order --help lists them; each module has NAME, add_parser(sub, common) and run(args).
COMMANDS = {m.NAME: m for m in (stats, ls, inspect_block, purge, verify, explain, serve_metrics)}


def build_parser() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    common.add_argument("--path", help="store directory (default: $KVSTORE_PATH)")
    common.add_argument("--config", metavar="FILE",
                        help="the engine's TOML config, for budget, TTL and block size (default: $KVSTORE_CONFIG)")
    common.add_argument("--json", action="store_true", help="print JSON instead of text")
    p = Parser(prog="kvstore", description="Inspect, clean, verify and explain a kvstore KV-cache store.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS.values():
        command.add_parser(sub, common)
    return p
