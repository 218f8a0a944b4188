"""The module paths of earlier releases, still importable.

pagedkv's modules live in subpackages by role (see the package docstring). A program written
against the flat layout of earlier releases keeps working: ``import pagedkv.stores`` and
``from pagedkv.layout import cdiv`` give the module at its new path (the same module object, so
``pagedkv.stores is pagedkv.offload.stores``). Nothing is imported until asked for: an old path to
a backend that needs numba-cuda costs nothing unless it is imported.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

#: old module name (under ``pagedkv.``) -> its module now
MOVED = {
    "layout": "geometry.layout", "formats": "geometry.formats", "config": "geometry.config",
    "device": "memory.device", "pool": "memory.pool", "conventions": "memory.conventions",
    "validate": "ops.validate", "plan": "ops.plan",
    "events": "blocks.events", "retention": "blocks.retention", "block_pool": "blocks.block_pool",
    "block_table": "blocks.block_table", "prefix_key": "blocks.prefix_key", "prefix_cache": "blocks.prefix_cache",
    "sequence": "blocks.sequence", "manager": "blocks.manager",
    "stored_block": "offload.stored_block", "stores": "offload.stores", "tiers": "offload.tiers",
    "model": "tools.model", "demo": "tools.demo", "bench": "tools.bench", "cli": "tools.cli",
    "backends.numba_cpu": "backends.numba",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``pagedkv.<old>`` and loads it as the module at its new path."""

    def find_spec(self, fullname, path=None, target=None):
        old = fullname.removeprefix(f"{__package__}.")
        if old == fullname or old not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def __init__(self) -> None:
        self._specs: dict[str, importlib.machinery.ModuleSpec | None] = {}

    def create_module(self, spec):
        module = importlib.import_module(f"{__package__}.{MOVED[spec.name.removeprefix(f'{__package__}.')]}")
        self._specs[module.__name__] = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # the import system stamped the old name's spec on the module: give it back its own
        module.__spec__ = self._specs[module.__name__]


def install() -> None:
    """Make the old paths importable (idempotent)."""
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())


def attribute(name: str) -> ModuleType:
    """``pagedkv.<name>`` for an old module name, imported on first access."""
    if name not in MOVED:
        raise AttributeError(f"module {__package__!r} has no attribute {name!r}")
    return importlib.import_module(f"{__package__}.{MOVED[name]}")
