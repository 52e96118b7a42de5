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


def positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return n


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
