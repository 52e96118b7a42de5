"""``kvstore purge``: remove blocks (by age, idleness, namespace, or the blocks of a prompt) and
every block chained below them, which nothing could reach any more."""

from __future__ import annotations

import argparse

from kvstore.keys import block_keys

from .. import explain as explainlib
from .blocks import namespace_filter, ns_label
from .options import UsageError, count, duration, prompt_options
from .prompts import TokenizerChoice, chat_template
from .reading import namespace_names, open_view
from .render import Result

NAME = "purge"


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    pp = sub.add_parser(NAME, parents=[common], help="remove blocks (and those chained below them)")
    pp.add_argument("--all", action="store_true", help="remove everything")
    pp.add_argument("--older-than", type=duration, metavar="AGE", help="created more than AGE ago (e.g. 6h)")
    pp.add_argument("--idle-longer-than", type=duration, metavar="AGE", help="unused for more than AGE (e.g. 2d)")
    pp.add_argument("--namespace", help="only this namespace (its name, or '#' and its id)")
    pp.add_argument("--prefix-of", metavar="PROMPT",
                    help="a prompt file: its blocks and every block chained below them")
    pp.add_argument("--from-block", type=count, default=0, metavar="I",
                    help="with --prefix-of: keep the prompt's blocks before block I (e.g. a shared system prompt)")
    prompt_options(pp)
    pp.add_argument("--dry-run", action="store_true", help="report what would go, remove nothing")


def run(args: argparse.Namespace) -> Result:
    criteria = (args.all, args.older_than is not None, args.idle_longer_than is not None,
                args.namespace is not None, args.prefix_of is not None)
    if not any(criteria):
        raise UsageError("say what to remove: --all, --older-than, --idle-longer-than, "
                           "--namespace or --prefix-of")
    if args.all and any(criteria[1:]):
        raise UsageError("--all removes everything: it combines with no other criterion")
    prompt = None
    if args.prefix_of:
        tokenizer = TokenizerChoice(args, lambda: namespace_names(args))
        prompt = explainlib.load_prompt(args.prefix_of, tokenizer, args.format, chat_template(args))
    with open_view(args, writable=not args.dry_run) as view:
        names = view.namespaces()
        bt = args.block_tokens or view.block_tokens
        ns_id = namespace_filter(args.namespace, names) if args.namespace else None
        prompt_keys: set[bytes] | None = None
        if prompt is not None:
            # A prompt's keys depend on the namespace: with none given, take it out of every one.
            spaces = [names.get(ns_id, args.namespace)] if ns_id is not None else list(names.values())
            prompt_keys = {k for ns in spaces for k in block_keys(ns, prompt.ids, bt)[args.from_block:]}
        # One library call selects, with the blocks chained below (never reachable again).
        plan = view.plan_purge(all=args.all, older_than_s=args.older_than,
                               idle_longer_than_s=args.idle_longer_than, namespace=ns_id,
                               keys=prompt_keys)
        chosen, below, metas = plan.selected, plan.chained_below, plan.meta
        removed = view.remove(plan.keys) if not args.dry_run else 0
    gone = plan.keys
    by_ns: dict[str, int] = {}
    for k in gone:
        label = ns_label(names, metas[k].namespace_id)
        by_ns[label] = by_ns.get(label, 0) + 1
    data = {"dry_run": args.dry_run, "matched": len(gone), "removed": 0 if args.dry_run else removed,
            "selected": len(chosen), "chained_below": len(below),
            "stored_bytes": sum(metas[k].stored_bytes for k in gone), "namespaces": by_ns}
    if prompt is not None:
        data["prompt"] = {"source": prompt.source, "tokens": len(prompt.ids),
                          "full_blocks": len(prompt.ids) // bt, "blocks_held": len(chosen),
                          "from_block": args.from_block,
                          "namespaces": len({metas[k].namespace_id for k in chosen})}
    return Result(data)
