"""Names a package exports but loads on first use (PEP 562), shared by the package `__init__` files.

    __getattr__, __dir__ = lazy_exports(__name__, {"MemoryAgent": ".runner", "score": "memagent_jax.x"}, __all__)

so importing a package (or one light submodule of it) does not import the heavy modules behind its names.
"""

from __future__ import annotations

import importlib
import sys


def lazy_exports(package: str, exports: dict[str, str], listed=()):
    """The module-level (`__getattr__`, `__dir__`) pair for `package`.

    exports: name -> the module that defines it, absolute or relative to `package` (a leading '.').
    listed: the names `dir()` shows besides those already loaded (the package's `__all__`).
    A name is imported on first access and then kept in the package's namespace (later lookups skip this).
    """

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__():
        return sorted(set(vars(sys.modules[package])) | set(listed))

    return __getattr__, __dir__
