"""White-box attacks of the paper's Table 1, with one calling convention.

``attack(model, x, y) -> x_adv`` where ``model`` is an ``nn.Module`` or a sequence of them
(attacked through the average of their logits, :class:`Ensemble`). Build the paper's settings
with :func:`make_attack`, e.g. ``make_attack("pgd1", dataset="digits")``.
"""

from deflect.attacks.base import Attack, Ensemble, as_model, eval_mode
from deflect.attacks.cw import CW
from deflect.attacks.ead import EAD
from deflect.attacks.fgsm import FGM, FGSM, RFGSM
from deflect.attacks.mifgsm import MIFGSM
from deflect.attacks.pgd import PGD
from deflect.attacks.registry import (
    CIFAR10_INPUT_DIMS,
    CIFAR10_LINF_EPS,
    DATASET_BUDGETS,
    Budget,
    attack_names,
    budget_for,
    dataset_names,
    default_params,
    make_attack,
    pgd_sweep_attack,
)

__all__ = [
    "CIFAR10_INPUT_DIMS",
    "CIFAR10_LINF_EPS",
    "CW",
    "DATASET_BUDGETS",
    "EAD",
    "FGM",
    "FGSM",
    "MIFGSM",
    "PGD",
    "RFGSM",
    "Attack",
    "Budget",
    "Ensemble",
    "as_model",
    "attack_names",
    "budget_for",
    "dataset_names",
    "default_params",
    "eval_mode",
    "make_attack",
    "pgd_sweep_attack",
]
