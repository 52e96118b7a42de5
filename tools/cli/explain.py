"""``kvstore explain A B``: why prompt B does or does not hit the blocks prompt A left (the
comparison itself is tools.explain); with a store, also what it holds of both."""

from __future__ import annotations

import argparse
import time

from kvstore.keys import block_keys

from .. import explain as explainlib
from .blocks import namespace_filter
from .options import count, prompt_options
from .prompts import TokenizerChoice, chat_template
from .reading import StoreView, config, namespace_names, open_view, store_given
from .render import Result

NAME = "explain"


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    ep = sub.add_parser(NAME, parents=[common], help="why prompt B does or does not hit after prompt A",
                        description="Compare two prompts' block chains: where they part, the tokens there, "
                                    "and how much of B hits after A. With --path, also what the store holds.")
    ep.add_argument("a", metavar="A", help="prompt file: text, JSON token ids, or JSON chat messages")
    ep.add_argument("b", metavar="B", help="prompt file, same kinds")
    ep.add_argument("--namespace", help="namespace of the keys, a name or (with a store) its '#' id "
                                        "(default: the store's that holds the prompts)")
    ep.add_argument("--context", type=count, default=8, metavar="N", help="tokens shown around the split (default 8)")
    prompt_options(ep)


def run(args: argparse.Namespace) -> Result:
    with_store = store_given(args)
    tokenizer = TokenizerChoice(args, (lambda: namespace_names(args)) if with_store else None)
    template = chat_template(args)
    a = explainlib.load_prompt(args.a, tokenizer, args.format, template)
    b = explainlib.load_prompt(args.b, tokenizer, args.format, template)
    decode = None
    if args.tokenizer or a.kind != "ids" or b.kind != "ids":  # ids alone are shown undecoded
        tok = tokenizer()
        for p in (a, b):  # ids beyond the vocabulary would be explained as tokens they are not
            explainlib.check_vocabulary(p, tok)
        decode = lambda t: tok.decode([t])  # noqa: E731
    held = None
    namespace = args.namespace
    if with_store:
        with open_view(args) as view:
            bt = args.block_tokens or view.block_tokens
            now = time.time()
            others: list[str] = []
            if namespace is not None and namespace.startswith("#"):  # a short id: keys need the name
                names = view.namespaces()
                namespace = names[namespace_filter(namespace, names)]
            if namespace is None:
                namespace, others = _pick_namespace(view, [a.ids, b.ids], bt, now)
            keys = list(dict.fromkeys(block_keys(namespace, a.ids, bt) + block_keys(namespace, b.ids, bt)))
            present = dict(zip(keys, view.contains_many(keys, now)))
            held = lambda ks: [present[k] for k in ks]  # noqa: E731
    else:
        # No store: the block size still comes from the configuration (KVSTORE_*, --config).
        bt = args.block_tokens or config(args, path=".").block_tokens
        namespace = namespace or "default"
    report = explainlib.compare(a, b, bt, namespace, context=args.context, decode=decode, held=held)
    if held is not None:
        report["store"]["other_namespaces"] = others
    if tokenizer.chosen is not None:
        report["tokenizer"] = tokenizer.chosen
    return Result(report)


def _pick_namespace(view: StoreView, prompts: list[list[int]], bt: int, now: float) -> tuple[str, list[str]]:
    """The store's namespace holding most blocks of ``prompts`` (else its only one, else the
    config's), and the other namespaces that hold some of them."""
    names = sorted(view.namespaces().values())
    held = {}
    for ns in names:
        keys = [k for p in prompts for k in block_keys(ns, p, bt)]
        held[ns] = sum(view.contains_many(keys, now))
    best = max(names, key=lambda ns: held[ns], default=None)
    if best is None or not held[best]:
        return (names[0] if len(names) == 1 else view.namespace), []
    return best, [ns for ns in names if ns != best and held[ns]]
