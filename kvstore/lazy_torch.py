"""torch, imported on first use, so that what only reads a store's metadata (``kvstore stats``,
``ls``, ``--help``) starts without it (importing torch takes over a second).

``torch`` here is the module itself, registered in ``sys.modules``; its code runs when one of its
attributes is first read. Modules of kvstore write ``from .lazy_torch import torch`` instead of
``import torch``: an ``import torch`` statement reads the module's ``__spec__`` and so loads it.
"""

from __future__ import annotations

import importlib.util
import sys


def _lazy(name: str):
    if name in sys.modules:  # already imported (an engine, a test): nothing to defer
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


torch = _lazy("torch")


def load() -> None:
    """Imports torch now. A store that will write calls it before starting its threads: the
    lazy loader of Python 3.11 is not safe when two threads read the first attribute at once."""
    getattr(torch, "Tensor")
