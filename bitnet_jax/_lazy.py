"""PEP 562 lazy exports for a package's __init__: each name imports its module on first use.

`bitnet_jax` (so that `bitnet-jax --version` and Ctrl-C work before JAX loads) and
`bitnet_jax.train` (so that perplexity and the corpus builder do not need optax) use it.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable, Callable]:
    """The module-level (__getattr__, __dir__) of `package`.

    Args:
      package: the package's __name__ (its module object must already be in sys.modules,
        as it is while its __init__ runs).
      exports: public name -> the module that defines it.
    """
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
