"""deflect: adversarially-disjoint model sets, random deployment, deflected attacks.

The public names load on first use (PEP 562): importing the package costs nothing, so the
`deflect` command's entry point (`deflect.launch`) runs inside its own Ctrl-C handler before torch
loads, which takes seconds on a small machine.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from deflect.errors import DeflectError

if TYPE_CHECKING:
    from deflect.config import TrainConfig, make_config
    from deflect.data import load_dataset
    from deflect.sets import load_set
    from deflect.store import Store
    from deflect.train import train

__all__ = ["DeflectError", "Store", "TrainConfig", "load_dataset", "load_set", "make_config", "train"]

_HOMES = {"TrainConfig": "deflect.config", "make_config": "deflect.config", "load_dataset": "deflect.data",
          "load_set": "deflect.sets", "Store": "deflect.store", "train": "deflect.train"}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'deflect' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """`deflect.train` is the training function, as it was when this package imported it eagerly. The
    import system binds each subpackage on its parent when it first loads; for `deflect.train` that
    would hide the function behind the subpackage, so the function is bound instead."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "train" and isinstance(value, types.ModuleType):
            value = value.train
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
