"""White-box attacks of the paper's Table 1, and the adaptive attacks, with one calling convention.

``attack(model, x, y) -> x_adv`` where ``model`` is an ``nn.Module`` or a sequence of them
(attacked through the average of their logits, :class:`Ensemble`). Build the paper's settings
with :func:`make_attack`, e.g. ``make_attack("pgd1", dataset="digits")``; the adaptive ones
(:func:`adaptive_attack_names`: DI-TI-MI-FGSM, Square) the same way, e.g.
``make_attack("di-ti-mifgsm-cw", dataset="digits")``. :meth:`Square.run` also reports queries.
"""

from deflect.attacks.base import Attack, CallableAttack, Ensemble, as_model, eval_mode
from deflect.attacks.cw import CW
from deflect.attacks.diversity import gaussian_kernel, input_diversity, smooth_gradient
from deflect.attacks.ead import EAD
from deflect.attacks.fgsm import FGM, FGSM, RFGSM
from deflect.attacks.mifgsm import MIFGSM
from deflect.attacks.pgd import PGD
from deflect.attacks.registry import (
    CIFAR10_INPUT_DIMS,
    CIFAR10_LINF_EPS,
    DATASET_BUDGETS,
    TI_KERNELS,
    Budget,
    adaptive_attack_names,
    attack_names,
    budget_for,
    dataset_names,
    default_params,
    linf_params,
    make_attack,
    pgd_sweep_attack,
)
from deflect.attacks.square import Square, SquareResult
from deflect.attacks.transfer import DiTiMIFGSM

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
    "TI_KERNELS",
    "Attack",
    "Budget",
    "CallableAttack",
    "DiTiMIFGSM",
    "Ensemble",
    "Square",
    "SquareResult",
    "adaptive_attack_names",
    "as_model",
    "attack_names",
    "budget_for",
    "dataset_names",
    "default_params",
    "eval_mode",
    "gaussian_kernel",
    "input_diversity",
    "linf_params",
    "make_attack",
    "pgd_sweep_attack",
    "smooth_gradient",
]
