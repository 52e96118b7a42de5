"""Prompt files for the commands that read them (explain, purge --prefix-of): the chat template
and which tokenizer to use.

The tokenizer is ``--tokenizer``, else the one of the model recorded in the namespace
(``--namespace``, else the store's namespaces, which must agree on one model). Without either,
a text or chat prompt is refused with a message saying so: kvstore never guesses a tokenizer
(another model's tokens would give keys that never match).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from kvstore import KVStoreError

from .. import explain as explainlib


class TokenizerChoice:
    """Loads the tokenizer once, on first use (a text or chat prompt); ``chosen`` then says which
    one and why (None while none was needed).

    Args:
        args: the command's arguments (``tokenizer``, ``namespace``).
        namespaces: the store's namespace names, or None when no store is given; called only when
            neither --tokenizer nor --namespace decides.
    """

    def __init__(self, args: argparse.Namespace, namespaces: Callable[[], list[str]] | None):
        self.args, self.namespaces = args, namespaces
        self.chosen: dict | None = None
        self._tokenizer: Any = None

    def __call__(self) -> Any:
        if self._tokenizer is None:
            source, why = self._source()
            self._tokenizer = explainlib.load_tokenizer(source)
            self.chosen = {"source": str(source), "from": why}
        return self._tokenizer

    def _source(self) -> tuple[str, str]:
        if self.args.tokenizer:
            return self.args.tokenizer, "--tokenizer"
        if self.args.namespace and not self.args.namespace.startswith("#"):  # a name, not an id
            return _of_namespace(self.args.namespace), f"the model of namespace {self.args.namespace}"
        if self.namespaces is None:
            raise KVStoreError("a text or chat prompt needs a tokenizer and none is known: pass --tokenizer DIR, "
                               "or --path/--config of the store (its namespaces record the model), or --namespace")
        names = sorted(self.namespaces())
        models = {ns: explainlib.namespace_model(ns) for ns in names}
        sources = {s for s in (explainlib.tokenizer_source(m) for m in models.values() if m) if s}
        if len(sources) == 1:
            (source,) = sources
            return source, "the model the store's namespaces record"
        if sources:
            raise KVStoreError(f"the store holds namespaces of {len(sources)} models ({', '.join(sorted(sources))}): "
                               f"pick one with --namespace, or pass --tokenizer DIR")
        if not names:
            raise KVStoreError("a text or chat prompt needs a tokenizer, and the store holds no namespace "
                               "that records a model: pass --tokenizer DIR")
        digests = [m for m in models.values() if m]
        what = (f"record only a digest of the weights ({', '.join(sorted(set(digests)))})" if digests
                else "record no model")
        raise KVStoreError(f"a text or chat prompt needs a tokenizer, and the store's namespaces {what}: "
                           f"pass --tokenizer DIR")


def _of_namespace(namespace: str) -> str:
    """The tokenizer source of the model recorded in ``namespace``.

    Raises:
        KVStoreError: the namespace records no model, or only a digest of its weights.
    """
    model = explainlib.namespace_model(namespace)
    if model is None:
        raise KVStoreError(f"namespace {namespace} records no model (not made by kvstore.keys.make_namespace): "
                           f"pass --tokenizer DIR")
    source = explainlib.tokenizer_source(model)
    if source is None:
        raise KVStoreError(f"namespace {namespace} records only a digest of the model's weights ({model}), "
                           f"which names no tokenizer: pass --tokenizer DIR")
    return source


def chat_template(args: argparse.Namespace) -> str | None:
    """The text of --chat-template, if given.

    Raises:
        KVStoreError: the file cannot be read.
    """
    if not args.chat_template:
        return None
    try:
        with open(args.chat_template, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise KVStoreError(f"--chat-template {args.chat_template}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise KVStoreError(f"--chat-template {args.chat_template}: not UTF-8 text (expected a Jinja template)") from None
