"""The paper's Table 1 attack settings, and their scaling to datasets other than CIFAR-10.

Table 1 gives budgets for CIFAR-10 (32×32×3, pixels in [0, 1]). Smaller or greyer images need
proportionally larger L∞ budgets for the attacks to mean anything, so every budget goes
through one table, :data:`DATASET_BUDGETS`, with these rules:

* every L∞ ``eps`` and step ``alpha`` (fgsm, rfgsm, pgd, mifgsm) is multiplied by
  ``linf_scale``;
* FGM's L2 ``eps`` becomes ``1.0 · linf_scale · sqrt(input_dims / 3072)``, which keeps the
  same per-pixel RMS perturbation relative to the L∞ budget as on CIFAR-10;
* CW/EAD's ``c``, ``kappa``, ``lr`` and ``beta`` are unchanged (they are budget-free).

Beside Table 1, :data:`_ADAPTIVE` holds the adaptive attacks (``adaptive_attack_names()``): DI-TI-MI-FGSM
with CE or CW loss at the preset ε and at twice it, and the Square query attack. They scale the same
way; their TI kernel follows the image size (:data:`TI_KERNELS`).

Keyword overrides passed to :func:`make_attack` are applied last and taken literally.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from deflect.attacks.base import Attack
from deflect.attacks.cw import CW
from deflect.attacks.ead import EAD
from deflect.attacks.fgsm import FGM, FGSM, RFGSM
from deflect.attacks.mifgsm import MIFGSM
from deflect.attacks.pgd import PGD
from deflect.attacks.square import Square
from deflect.attacks.transfer import DiTiMIFGSM
from deflect.errors import DeflectError

#: Table 1's L∞ budget on CIFAR-10; the reference for ``linf_scale``.
CIFAR10_LINF_EPS = 0.031
#: Input dimensionality of CIFAR-10 (3×32×32); the reference for FGM's L2 scaling.
CIFAR10_INPUT_DIMS = 3072


@dataclass(frozen=True)
class Budget:
    """How a dataset's attack budgets relate to the paper's CIFAR-10 ones."""

    linf_scale: float
    input_dims: int

    @property
    def l2_scale(self) -> float:
        """Factor for L2 budgets: same per-pixel RMS, relative to the L∞ budget, as CIFAR-10."""
        return self.linf_scale * math.sqrt(self.input_dims / CIFAR10_INPUT_DIMS)


#: Per-dataset budget scaling. MNIST/Fashion-MNIST use the customary ε∞ = 0.1; scikit-learn's
#: 8×8 digits (17 grey levels) use ε∞ = 0.15 ≈ 2.5 grey levels, a tunable choice.
DATASET_BUDGETS: dict[str, Budget] = {
    "cifar10": Budget(linf_scale=1.0, input_dims=3072),
    "mnist": Budget(linf_scale=0.1 / CIFAR10_LINF_EPS, input_dims=784),
    "fashion-mnist": Budget(linf_scale=0.1 / CIFAR10_LINF_EPS, input_dims=784),
    "digits": Budget(linf_scale=0.15 / CIFAR10_LINF_EPS, input_dims=64),
}


@dataclass(frozen=True)
class _Setting:
    cls: type[Attack]
    params: dict[str, Any]
    linf: tuple[str, ...] = ()  # parameters scaled by linf_scale
    l2: tuple[str, ...] = ()  # parameters scaled by Budget.l2_scale


_LINF = ("eps", "alpha")

#: Table 1, in the paper's order. R+FGSM's alpha is left to the class default, ε/2.
_TABLE1: dict[str, _Setting] = {
    "fgsm": _Setting(FGSM, {"eps": 0.031}, linf=_LINF),
    "fgm": _Setting(FGM, {"eps": 1.0}, l2=("eps",)),
    "rfgsm": _Setting(RFGSM, {"eps": 0.031}, linf=_LINF),
    "pgd1": _Setting(PGD, {"eps": 0.031, "alpha": 0.0078, "steps": 7}, linf=_LINF),
    "pgd2": _Setting(PGD, {"eps": 0.031, "alpha": 0.0078, "steps": 20}, linf=_LINF),
    "mifgsm1": _Setting(
        MIFGSM, {"eps": 0.031, "alpha": 0.0031, "decay": 1.0, "steps": 10}, linf=_LINF
    ),
    "mifgsm2": _Setting(
        MIFGSM, {"eps": 0.031, "alpha": 0.0031, "decay": 1.0, "steps": 20}, linf=_LINF
    ),
    "cw1": _Setting(CW, {"c": 1.0, "kappa": 0.0, "steps": 1000, "lr": 0.01}),
    "cw2": _Setting(CW, {"c": 1.0, "kappa": 40.0, "steps": 1000, "lr": 0.01}),
    "ead1": _Setting(EAD, {"c": 20.0, "kappa": 0.0, "beta": 0.01, "steps": 1000, "lr": 0.01}),
    "ead2": _Setting(EAD, {"c": 10.0, "kappa": 55.0, "beta": 0.01, "steps": 1000, "lr": 0.01}),
}


def _di_ti(eps: float, loss: str) -> _Setting:
    """Adaptive DI-TI-MI-FGSM: 50 steps of ε/20 (2ε of travel, so momentum can turn) and 3 restarts."""
    return _Setting(DiTiMIFGSM, {"eps": eps, "alpha": eps / 20, "steps": 50, "restarts": 3, "decay": 1.0,
                                 "loss": loss}, linf=_LINF)


#: Adaptive attacks against random deployment (not part of Table 1, so not in ``--all``).
_ADAPTIVE: dict[str, _Setting] = {
    "di-ti-mifgsm": _di_ti(0.031, "ce"),
    "di-ti-mifgsm-cw": _di_ti(0.031, "cw"),
    "di-ti-mifgsm-2eps": _di_ti(0.062, "ce"),
    "di-ti-mifgsm-cw-2eps": _di_ti(0.062, "cw"),
    "square": _Setting(Square, {"eps": 0.031, "max_queries": 5000, "p_init": 0.8}, linf=("eps",)),
}

#: TI's Gaussian (size, σ in pixels) per dataset: about a sixth of the image side, at least 3×3, so
#: the smoothing spans a stroke's width on 8×8 digits and on 28×28/32×32 images alike.
TI_KERNELS: dict[str, tuple[int, float]] = {
    "cifar10": (5, 1.0),
    "mnist": (5, 1.0),
    "fashion-mnist": (5, 1.0),
    "digits": (3, 0.75),
}


def attack_names() -> list[str]:
    """The eleven Table 1 keys, in the paper's order."""
    return list(_TABLE1)


def adaptive_attack_names() -> list[str]:
    """The adaptive attacks' keys (DI-TI-MI-FGSM variants and Square), beside Table 1's."""
    return list(_ADAPTIVE)


def dataset_names() -> list[str]:
    """Datasets with a budget entry in :data:`DATASET_BUDGETS`."""
    return list(DATASET_BUDGETS)


def budget_for(dataset: str | None) -> Budget:
    """The budget scaling for ``dataset`` (``None`` means CIFAR-10, i.e. no scaling).

    Names are matched case-insensitively, with ``_`` accepted for ``-``.
    """
    return DATASET_BUDGETS[_dataset_key(dataset)]


def _dataset_key(dataset: str | None) -> str:
    if dataset is None:
        return "cifar10"
    key = dataset.strip().lower().replace("_", "-")
    if key not in DATASET_BUDGETS:
        raise DeflectError(
            f"unknown dataset {dataset!r} for attack budgets; "
            f"choose one of: {', '.join(DATASET_BUDGETS)}"
        )
    return key


def linf_params(name: str) -> tuple[str, ...]:
    """The parameters of attack `name` that are L∞ budgets or steps (in [0, 1] pixel units); an L2
    budget such as FGM's ε is not one of them and may exceed 1."""
    key = name.strip().lower()
    setting = {**_TABLE1, **_ADAPTIVE}.get(key)
    return setting.linf if setting is not None else ()


def make_attack(name: str, dataset: str | None = None, **overrides: Any) -> Attack:
    """Build the Table 1 (or adaptive) attack ``name``, budgets scaled to ``dataset``, then ``overrides``.

    Example: ``make_attack("pgd1", dataset="digits", steps=50)``. Unknown names, datasets or
    override keys, and invalid values (negative ε, ``steps < 1``…) raise ``DeflectError``.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    settings = {**_TABLE1, **_ADAPTIVE}
    if key not in settings:
        raise DeflectError(f"unknown attack {name!r}; choose one of: {', '.join(settings)}")
    setting = settings[key]
    budget = budget_for(dataset)
    params = dict(setting.params)
    if setting.cls is DiTiMIFGSM:
        params["ti_size"], params["ti_sigma"] = TI_KERNELS[_dataset_key(dataset)]
    for p in setting.linf:
        if p in params:
            params[p] = params[p] * budget.linf_scale
    for p in setting.l2:
        params[p] = params[p] * budget.l2_scale

    allowed = [f.name for f in fields(setting.cls) if f.name != "name"]  # type: ignore[arg-type]
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise DeflectError(
            f"unknown option(s) {', '.join(unknown)} for attack {key!r}; "
            f"allowed: {', '.join(allowed)}"
        )
    params.update(overrides)
    return setting.cls(**params, name=key)


def default_params(name: str, dataset: str | None = None) -> dict[str, Any]:
    """The hyperparameters ``make_attack(name, dataset)`` would use, as a JSON-able dict."""
    return make_attack(name, dataset).params()


def pgd_sweep_attack(eps: float, steps: int = 100, dataset: str | None = None) -> Attack:
    """PGD for the ε-sweep: ``steps`` steps of ``α = 2.5·ε/steps`` (Madry et al.'s rule).

    ``eps`` is absolute (not scaled by ``dataset``, which only fills the other defaults).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise DeflectError(f"the sweep's steps must be a whole number of at least 1, got {steps!r}")
    return make_attack("pgd1", dataset, eps=eps, alpha=2.5 * eps / steps, steps=steps)
