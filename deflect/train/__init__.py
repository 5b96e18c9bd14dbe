"""Training of disjoint and baseline sets.

This package is also the training function: calling it, ``deflect.train(config, store)``, runs
:func:`deflect.train.runner.train`. One object serves as both so that every import form a notebook
uses works: ``deflect.train(cfg, store)``, ``from deflect import train``, ``import
deflect.train.losses as L``, and ``deflect.train.losses`` after ``import deflect.train.losses``. A
function bound over the package, as before, broke the last two.
"""

import importlib
import inspect
import sys
import types
from typing import Any

from deflect.train.losses import (
    ActiveTerms,
    LossParts,
    angular_loss,
    disjoint_loss,
    input_gradients,
)
from deflect.train.runner import Callbacks, build_set, resolve_device, train

__all__ = [
    "ActiveTerms", "Callbacks", "LossParts", "angular_loss", "build_set", "disjoint_loss",
    "input_gradients", "resolve_device", "train",
]

__signature__ = inspect.signature(train)  # what inspect.signature(deflect.train) reports


class _CallablePackage(types.ModuleType):
    """Calls go to the package's ``train``, looked up per call, so a patched one is what runs."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.train(*args, **kwargs)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        """Pickled by name, as the function was, so `deflect.train` can go to a process pool."""
        return importlib.import_module, (self.__name__,)


sys.modules[__name__].__class__ = _CallablePackage
