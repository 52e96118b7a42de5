"""The ``kvstore`` command under random argument vectors: only documented outcomes, never a traceback.

Each example runs ``tools.cli.main(argv)`` in-process against one real store (real LMDB, real
zstd) in a temp directory. ``argv`` is a subcommand (or a random word) followed by a random mix
of that subcommand's own options, read from ``build_parser()`` so that new options are fuzzed
without editing this file, with random values (numbers, durations, sizes, unicode, control
characters, undecodable bytes as a shell passes them, existing and missing paths) and junk tokens.

The contract checked (tools/cli.py's docstring): the call returns 0, 1 or 2 (a usage error; 3 is
only for corrupt records, and this store has none), or argparse exits with 0 (``--help``) or 2. A
failure prints exactly one line on stderr, ``kvstore[ COMMAND]: error: ...``; a success prints
nothing there (but ``verify --progress``'s bar). And no call changes what the store holds.

Three things are kept out so that an example costs milliseconds: ``serve-metrics`` and ``top`` are only parsed
(they run until stopped), ``purge`` only runs with ``--dry-run`` (this is a test of arguments,
not of removal), and prompt files are token ids or unusable files, never text or chat, which
would load a tokenizer (seconds each).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
from typing import NamedTuple

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from kvstore import KVStore, StoreConfig
from kvstore.codec import Codec
from kvstore.keys import block_keys
from tools import cli

from ..conftest import BLOCK_TOKENS as B, examples, make_block

# -- the parser, as the fuzz sees it ----------------------------------------------------------
PARSER = cli.build_parser()
SUBPARSERS: dict[str, argparse.ArgumentParser] = next(
    a.choices for a in PARSER._actions if isinstance(a, argparse._SubParsersAction))
COMMANDS = sorted(SUBPARSERS)
RUN_NOT_PARSE_ONLY = set(COMMANDS) - {"serve-metrics", "top"}  # they run until stopped (top: sleeps)
# Options whose value is a prompt file: only token-id files and unusable ones (see the docstring).
PROMPT_DESTS = {"a", "b", "prefix_of"}
# Choices that make a prompt be tokenized (a tokenizer load: seconds).
SLOW_CHOICES = {("format", "text"), ("format", "chat")}

ERROR_LINE = re.compile(r"kvstore(?: [a-z-]+)?: error: ")
PROGRESS = re.compile(r"(?:\r(?:verify|compact) \[[#.]{30}\] [^\r\n]*)+\n")  # the commands with --progress

# -- the store and the files the values may name ----------------------------------------------
DATA = {  # namespace -> prompts (token ids) whose full blocks are stored
    "tenant-a": [list(range(3 * B)), list(range(B)) + [7] * B],
    "tenant-b": [list(range(500, 500 + 2 * B))],
}


class World:
    """The store, the files around it, and what the store must still hold after every call."""

    def __init__(self, root):
        self.root = root
        self.store = root / "store"
        config = StoreConfig(path=self.store, block_tokens=B, host_bytes=1 << 20, disk_bytes=4 << 20,
                             disk_ttl_s=7 * 86400)
        seed = 0
        with KVStore.open(config) as store:
            for ns, prompts in DATA.items():
                for ids in prompts:
                    m = store.match(ids, namespace=ns)
                    n = len(ids) // B - m.num_blocks
                    store.put(ids, [make_block(seed + i) for i in range(n)], namespace=ns,
                              start_block=m.num_blocks)
                    seed += n
            store.pin(DATA["tenant-b"][0], 3600, namespace="tenant-b")
            store.flush()
        self.keys = sorted({k.hex() for ns, prompts in DATA.items() for ids in prompts
                            for k in block_keys(ns, ids, B)})
        files = root / "files"
        files.mkdir()

        def write(name: str | bytes, content: str | bytes) -> str:
            path = os.path.join(os.fsencode(files), os.fsencode(name))
            with open(path, "wb") as f:
                f.write(content.encode() if isinstance(content, str) else content)
            return os.fsdecode(path)  # as argv holds it: undecodable bytes as surrogates

        toml = f'path = "{self.store}"\nblock_tokens = {B}\ndisk_bytes = "4MiB"\ndisk_ttl_s = "7d"\n'
        self.configs = [
            write("kvstore.toml", toml),
            write("other-settings.toml", f'path = "{self.store}"\nblock_tokens = 3\ndisk_bytes = "1KiB"\n'
                                         f'disk_ttl_s = "1s"\nhost_ttl_s = 0\n'),
            write("no-disk.toml", f'path = "{self.store}"\ndisk_bytes = 0\n'),
            write("no-path.toml", "block_tokens = 8\n"),
            write("unknown-key.toml", toml + "colour = 'blue'\n"),
            write("bad-value.toml", f'path = "{self.store}"\nblock_tokens = -1\ndisk_ttl_s = "soon"\n'),
            write("not.toml", "path = [unclosed\n\x01"),
            write("elsewhere.toml", f'path = "{root / "nowhere"}"\n'),
        ]
        ids = DATA["tenant-a"][0]
        self.good_prompts = [
            write("a.json", json.dumps(ids)),
            write("b.json", json.dumps({"input_ids": DATA["tenant-a"][1] + [9] * 3})),
            write("c.json", json.dumps({"prompt_token_ids": DATA["tenant-b"][0]})),
            write("one-token.json", "[5]"),
            write(b"caf\xe9-latin1.json", json.dumps(ids[:B + 1])),  # a name that is not UTF-8
            write("new\nline.json", json.dumps(ids[:2 * B])),
        ]
        self.prompts = self.good_prompts + [
            write("empty.json", "[]"),
            write("negative.json", "[-1, 2]"),
            write("huge.json", f"[{1 << 40}]"),
            write("floats.json", "[1.5, 2]"),
            write("bools.json", "[true, false]"),
            write("nested.json", json.dumps({"input_ids": {"x": 1}})),
            write("bad-chat.json", json.dumps([{"role": "user", "content": 3}])),
            write("neither.json", '{"neither": 1}'),
            write("not-utf8.json", b"[1, 2, \xff\xfe]"),
            str(files), str(root / "missing.json"),
        ]
        self.others = [str(self.store), str(self.store / "disk"), str(root), str(files),
                       str(root / "nowhere"), os.devnull, *self.configs]

    def check_intact(self) -> None:
        """Every block is still held and its record still decodes (read through the store itself,
        not the CLI under test)."""
        config = StoreConfig(path=self.store, block_tokens=B, host_bytes=0, disk_bytes=4 << 20,
                             disk_ttl_s=7 * 86400, write_queue_bytes=0, io_threads=1)
        codec = Codec()
        with KVStore.open(config) as store:
            assert sorted(k.hex() for k, _ in store.tier("disk").entries()) == self.keys
            for key, _ in store.tier("disk").entries():
                codec.decode(store.tier("disk").read_record(key)[0])


def _stream(errors: str) -> io.TextIOWrapper:
    return io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors=errors, write_through=True)


def _text(stream: io.TextIOWrapper) -> str:
    return stream.buffer.getvalue().decode("utf-8", "surrogateescape")


class Outcome(NamedTuple):
    code: int | str | None
    exited: bool  # by SystemExit (argparse: --help, a usage error), not by main's return
    out: str
    err: str


def run(argv: list[str], parse_only: bool = False) -> Outcome:
    """One in-process call of main (or of the parser alone). The streams encode as a real
    process's do in a UTF-8 locale: stdout strict (an unencodable character raises), stderr with
    backslash escapes."""
    out, err = _stream("strict"), _stream("backslashreplace")
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            if parse_only:
                PARSER.parse_args(argv)
                code = 0
            else:
                code = cli.main(argv)
            exited = False
        except SystemExit as e:
            code, exited = e.code, True
    return Outcome(code, exited, _text(out), _text(err))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-fuzz")
    w = World(root)
    cwd = root / "cwd"
    cwd.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        # Relative random paths name nothing; the store and files come only from --path and friends.
        mp.chdir(cwd)
        for name in [n for n in os.environ if n.startswith("KVSTORE_")]:
            mp.delenv(name)
        mp.setenv("HF_HUB_OFFLINE", "1")  # a random --tokenizer never reaches for the network
        mp.setenv("LANGUAGE", "C")  # argparse looks each message up: this skips the locale files
        yield w


# -- values -----------------------------------------------------------------------------------
NOTABLE = [
    "", " ", "-", "--", "=", "0", "-0", "1", "-1", "+1", "3", "65536", "-3h", "5m", "6h", "2d", "1w",
    "0.5s", "1e999", "-1e999", "1e-999", "nan", "NaN", "inf", "-inf", "10GiB", "1.5KiB", "-1MiB", "0x10",
    "1_000", "9" * 40, "-" + "9" * 40, "#", "#zz", "#" + "f" * 16, "#" + "0" * 40, "0x", "beef", "BEEF",
    "x" * 5000, "☃", "\u202e", "\ufeff", "a\nb", "a\rb", "\t", "\x1b[31m", "\x7f", "\udcff", "true",
    "false", "None", "null", "..", ".", "/", "~", "~nobody", "$HOME", "%s", "%(prog)s", "{}", "{0}", "[]",
    "tenant-a", "tenant-b", "default", "key", "size", "depth", "text", "ids",
]
units = st.sampled_from(["", "s", "m", "h", "d", "w", "ms", "y", " h", "H", "B", "KiB", "MiB", "GiB", "TB", "kb"])
numbers = st.one_of(
    st.integers(-(1 << 70), 1 << 70).map(str),
    st.integers(-5, 70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.tuples(st.one_of(st.integers(-100, 10 ** 7), st.floats(-1e6, 1e6)), units).map(lambda t: f"{t[0]}{t[1]}"),
)
# argv never holds NUL; it holds undecodable bytes as surrogates (os.fsdecode).
junk_text = st.one_of(
    st.text(st.characters(exclude_characters="\x00"), max_size=20),
    st.text(st.sampled_from("\n\r\t\x1b\x7f\x85\u2028\udcff aé☃-=#/.0"), min_size=1, max_size=8),
    st.text(st.characters(codec="ascii", exclude_characters="\x00"), max_size=10),
    st.binary(max_size=20).map(lambda b: os.fsdecode(b.replace(b"\x00", b""))),
)


def key_prefixes(world: World, shortest: int) -> st.SearchStrategy[str]:
    return st.sampled_from(world.keys).flatmap(lambda k: st.integers(shortest, 66).map(lambda n: k[:n]))


def values(world: World, action: argparse.Action) -> st.SearchStrategy[str]:
    """Values for ``action``: its own choices, then anything."""
    if action.dest in PROMPT_DESTS:
        return st.one_of(st.sampled_from(world.good_prompts), st.sampled_from(world.prompts),
                         junk_text.map(lambda s: "no-such-" + s))
    own = [str(c) for c in action.choices or () if (action.dest, c) not in SLOW_CHOICES]
    if action.type in (int, float, cli._positive_int):
        own += [str(n) for n in (-1, 0, 1, 2, 3, 8, 100, 10 ** 9)]
    elif action.type is cli._duration:
        own += ["0", "30", "90s", "5m", "6h", "2d", "1w", "3.5h"]
    anything = st.one_of(st.sampled_from(NOTABLE), numbers, junk_text, key_prefixes(world, 1),
                         st.sampled_from(world.others + world.prompts))
    return st.one_of(st.sampled_from(own), anything) if own else anything


@st.composite
def option(draw, world: World, action: argparse.Action) -> list[str]:
    """One use of an option: ``--opt``, ``--opt V``, ``--opt=V``, or an abbreviation of them."""
    name = draw(st.sampled_from(action.option_strings))
    if name.startswith("--") and draw(st.integers(0, 5)) == 0:
        name = name[:draw(st.integers(3, len(name)))]  # argparse takes unique prefixes
    if action.nargs == 0:
        return [name] if draw(st.integers(0, 19)) else [f"{name}={draw(values(world, action))}"]
    value = draw(values(world, action))
    form = draw(st.integers(0, 9))
    return [name, value] if form < 6 else [f"{name}={value}"] if form < 9 else [name]


@st.composite
def argvs(draw, world: World) -> list[str]:
    """A command (rarely a random word), its options and positionals in random order, mostly
    ``--path`` to the store, sometimes a junk token."""
    if draw(st.integers(0, 19)):
        command = draw(st.sampled_from(COMMANDS))
    else:
        command = draw(st.one_of(st.sampled_from(["-h", "--help", "--json", "--path", "STATS", "lsx", ""]),
                                 junk_text))
    sub = SUBPARSERS.get(command)
    pieces: list[list[str]] = []
    if sub is not None:
        options = [a for a in sub._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
        if not draw(st.integers(0, 49)):
            options = [a for a in sub._actions if isinstance(a, argparse._HelpAction)]
        pieces += draw(st.lists(st.sampled_from(options).flatmap(lambda a: option(world, a)), max_size=5))
        for a in sub._actions:  # positionals: mostly given; inspect's KEY mostly a real one
            if not a.option_strings and draw(st.integers(0, 19)):
                value = values(world, a)
                pieces.append([draw(value if a.dest in PROMPT_DESTS else st.one_of(key_prefixes(world, 4), value))])
        if draw(st.integers(0, 5)):  # mostly against the store, so that commands get past opening it
            pieces.append(draw(st.sampled_from([["--path", str(world.store)], [f"--path={world.store}"],
                                                ["--config", world.configs[0]]])))
    if not draw(st.integers(0, 7)):
        pieces.append([draw(st.one_of(st.sampled_from(NOTABLE), junk_text))])
    order = draw(st.permutations(range(len(pieces))))
    argv = [command] + [t for i in order for t in pieces[i]]
    if command == "purge":
        argv.insert(1, "--dry-run")  # see run_parse_only for the argv that still push it out
    return argv


def check_contract(argv: list[str], got: Outcome) -> None:
    code, out, err = got.code, got.out, got.err
    where = f"argv={argv!r}\nstdout={out[-2000:]!r}\nstderr={err[-2000:]!r}"
    # main returns 2 too, for arguments that parse but do not go together (UsageError).
    assert code in ((0, 2) if got.exited else (0, 1, 2)), f"exit code {code!r}: {where}"
    assert "Traceback" not in err, where
    if code == 0:
        assert err == "" or PROGRESS.fullmatch(err), f"stderr on success: {where}"
    else:
        assert err.endswith("\n") and "\n" not in err[:-1] and "\r" not in err, f"not one line: {where}"
        assert ERROR_LINE.match(err), f"not a kvstore error line: {where}"


def parse(argv: list[str]) -> argparse.Namespace | None:
    """What ``argv`` asks for; None when argparse refuses it (or prints help)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            return PARSER.parse_args(argv)
        except SystemExit:
            return None


def run_parse_only(args: argparse.Namespace | None) -> bool:
    """serve-metrics serves until stopped; a purge without --dry-run ("--" can push it out) removes."""
    return args is not None and (args.command not in RUN_NOT_PARSE_ONLY
                                 or args.command == "purge" and not args.dry_run)


# New inputs every run (no derandomize); hypothesis' database (.hypothesis/, git-ignored) replays
# the failures it found, and print_blob prints how to reproduce one anywhere.
@settings(max_examples=examples(1000), deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_random_arguments_get_only_documented_outcomes(world, data):
    argv = data.draw(argvs(world), label="argv")
    parsed = parse(argv)  # None: main() exits the same way, and is run for its real output
    parse_only = run_parse_only(parsed)
    got = run(argv, parse_only=parse_only)
    check_contract(argv, got)
    if got.code == 1:
        assert got.err.startswith(f"kvstore {parsed.command}: error: "), got.err
    if not parse_only and got.code == 0 and parsed is not None and parsed.json:
        json.loads(got.out)  # --json output is JSON
    if parsed is not None and not parse_only:  # argparse refuses before anything is opened
        world.check_intact()


def test_the_fuzz_sees_the_parsers_options():
    """The options come from the parser itself: a command's own and the common ones."""
    for name in COMMANDS:
        flags = {s for a in SUBPARSERS[name]._actions for s in a.option_strings}
        assert {"--path", "--config", "--json", "--help"} <= flags, name
    flags = {s for a in SUBPARSERS["ls"]._actions for s in a.option_strings}
    assert {"--older-than", "--limit", "--offset", "--sort", "--namespace"} <= flags
    assert {a.dest for a in SUBPARSERS["explain"]._actions if not a.option_strings} == {"a", "b"}
