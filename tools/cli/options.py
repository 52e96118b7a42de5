"""Argument types and option groups shared by several commands, and the parser class."""

from __future__ import annotations

import argparse

from kvstore import KVStoreError
from kvstore.config import parse_duration

from .. import explain as explainlib
from .render import one_line


def duration(text: str) -> float:
    try:
        return parse_duration(text, "duration")
    except KVStoreError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("duration: ")) from None


def _int_at_least(text: str, low: int) -> int:
    try:
        n = int(text)
    except ValueError:
        n = low - 1
    if n < low:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
    return n


def positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def count(text: str) -> int:
    """A count or an index: an integer >= 0."""
    return _int_at_least(text, 0)


def port(text: str) -> int:
    """A TCP port: 0 (pick a free one) to 65535."""
    try:
        n = int(text)
    except ValueError:
        n = -1
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 0 (any free port) to 65535, got {text!r}")
    return n


def positive_seconds(text: str) -> float:
    """A number of seconds > 0 (as a plain number or a duration such as 5s, 2m)."""
    try:
        s = float(text)
    except ValueError:
        s = duration(text)
    if not (s > 0 and s != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return s


class UsageError(KVStoreError):
    """Arguments that are each valid but do not go together (exit code 2, like argparse's)."""


def hex_prefix(text: str) -> str:
    """``--key``'s value: hex digits (an optional ``0x``), lower-cased."""
    prefix = text.lower().removeprefix("0x")
    if not prefix or any(c not in "0123456789abcdef" for c in prefix):
        raise argparse.ArgumentTypeError(f"expected hex digits of a key, got {text!r}")
    return prefix


def prompt_options(p: argparse.ArgumentParser) -> None:
    """Options of commands that read prompt files (explain, purge --prefix-of)."""
    p.add_argument("--format", choices=explainlib.FORMATS, default="auto",
                   help="how to read prompt files (default: detect text, token ids or chat JSON)")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="tokenizer directory (default: that of the model the store's namespace records)")
    p.add_argument("--chat-template", metavar="FILE", help="Jinja chat template replacing the tokenizer's")
    p.add_argument("--block-tokens", type=positive_int, metavar="N",
                   help="tokens per block (default: the store's configured block size)")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (argparse prints the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")
