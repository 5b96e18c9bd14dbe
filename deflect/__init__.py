"""deflect: adversarially-disjoint model sets, random deployment, deflected attacks.

The public names load on first use (PEP 562): importing the package costs nothing, so the
`deflect` command's entry point (`deflect.launch`) runs inside its own Ctrl-C handler before torch
loads, which takes seconds on a small machine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from deflect.errors import DeflectError

if TYPE_CHECKING:
    from deflect.config import TrainConfig, make_config
    from deflect.data import load_dataset
    from deflect.evaluate import ensemble_matrix, transfer_matrix
    from deflect.sets import load_set
    from deflect.store import Store
    from deflect.train import train

__all__ = ["DeflectError", "Store", "TrainConfig", "ensemble_matrix", "load_dataset", "load_set", "make_config",
           "train", "transfer_matrix"]

_HOMES = {"TrainConfig": "deflect.config", "make_config": "deflect.config", "load_dataset": "deflect.data",
          "load_set": "deflect.sets", "Store": "deflect.store", "train": "deflect.train",
          "transfer_matrix": "deflect.evaluate", "ensemble_matrix": "deflect.evaluate"}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'deflect' has no attribute {name!r}")
    module = importlib.import_module(home)
    value = module if home == f"{__name__}.{name}" else getattr(module, name)  # `train`: a callable package
    globals()[name] = value
    return value
