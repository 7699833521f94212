"""Public names of a package given lazily (PEP 562), one implementation for every package.

A package's ``__init__`` lists ``{public name: module that holds it}`` and calls
:func:`install`; ``import package`` then loads nothing more, and a name loads its module on
first use (and is cached). A function named like its own module (``tracer.analyses.validate``,
``transcoders.training.run``) stays the function even after the submodule is imported (the import
system would otherwise set the package attribute to the module). Stdlib only.
"""

from __future__ import annotations

import importlib
import sys
import types


def install(package: str, exports: dict[str, str]) -> None:
    """Give ``package`` (its ``__name__``) the names of ``exports`` lazily; sets its
    ``__all__``, ``__getattr__`` and ``__dir__``."""
    module = sys.modules[package]

    def __getattr__(name: str):
        where = exports.get(name)
        if where is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where), name)
        setattr(module, name, value)  # cached: later lookups skip this hook
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(module)) | set(exports))

    module.__all__ = sorted(exports)
    module.__getattr__ = __getattr__
    module.__dir__ = __dir__
    module.__class__ = _package_class(exports)


def _package_class(exports: dict[str, str]) -> type:
    class LazyPackage(types.ModuleType):
        def __setattr__(self, name: str, value) -> None:
            # The import system sets package.<submodule> = module after importing it; a
            # public function of that name keeps its place.
            if isinstance(value, types.ModuleType) and exports.get(name) == value.__name__:
                return
            super().__setattr__(name, value)

    return LazyPackage
