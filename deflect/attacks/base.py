"""Shared machinery for the attacks: the uniform call contract, ensembles and small helpers.

Every attack is a frozen dataclass of hyperparameters whose ``__call__(model, x, y)`` returns
adversarial inputs. The contract lives here once so that each attack file only holds its maths:
the model is put in eval mode (and each module's own mode restored afterwards), gradients are
taken with ``torch.autograd.grad`` w.r.t. the input only (so model ``.grad`` stays untouched),
and the result is detached and clamped to the [0, 1] pixel range.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deflect.errors import DeflectError

ModelLike = nn.Module | Sequence[nn.Module]


class Ensemble(nn.Module):
    """Average of the members' logits (paper §5.5): the attacker's surrogate for a model set."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        members = list(models)
        if not members:
            raise DeflectError("an ensemble needs at least one model, got an empty sequence")
        for m in members:
            if not isinstance(m, nn.Module):
                raise DeflectError(
                    f"ensemble members must be torch.nn.Module, got {type(m).__name__}"
                )
        self.members = nn.ModuleList(members)
        # An attack library (torchattacks) reads the wrapper's own flag and, when done, calls
        # `.train()` on it if it was set, which reaches every member: the flag says whether all
        # members train (eval-mode members, the usual case, stay in eval mode). Members keep their modes.
        self.training = all(m.training for m in members)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([m(x) for m in self.members]).mean(dim=0)


def as_model(model: ModelLike) -> nn.Module:
    """Return ``model`` itself, or an :class:`Ensemble` when given a sequence of models.

    An ``nn.ModuleList`` is a container rather than a callable model, so it is treated as a
    sequence too; ``nn.Sequential`` is a composed model and is used as is.
    """
    if isinstance(model, nn.ModuleList):
        return Ensemble(list(model))
    if isinstance(model, nn.Module):
        return model
    if isinstance(model, Sequence) and not isinstance(model, str | bytes):
        return Ensemble(model)
    raise DeflectError(
        f"model must be a torch.nn.Module or a sequence of them, got {type(model).__name__}"
    )


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode, then restore each one's own previous mode.

    Restoring per module (not ``model.train(flag)``) keeps mixed states intact, e.g. a model
    whose BatchNorm layers were deliberately frozen while the rest trains.
    """
    states = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, was_training in states:
            m.training = was_training


def check(condition: bool, message: str) -> None:
    """Raise :class:`DeflectError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise DeflectError(message)


def ce_grad(model: Callable[[Tensor], Tensor], x_adv: Tensor, y: Tensor) -> Tensor:
    """Gradient of the batch-mean cross-entropy w.r.t. the input only (`model`: any logits function).

    The mean (not sum) reduction matches torchattacks, so sign-based attacks agree bit-for-bit.
    """
    x_adv = x_adv.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x_adv), y)
    (grad,) = torch.autograd.grad(loss, x_adv)
    return grad


def project_linf(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """Project onto the L∞ ball of radius ``eps`` around ``x`` and the [0, 1] box."""
    delta = torch.clamp(x_adv - x, min=-eps, max=eps)
    return torch.clamp(x + delta, min=0.0, max=1.0).detach()


def per_sample(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample vector ``(N,)`` so it broadcasts against ``like`` ``(N, ...)``."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def fooled(logits: Tensor, y: Tensor, kappa: float) -> Tensor:
    """True where the prediction is wrong even after giving the true class a ``kappa`` head start.

    This is Carlini–Wagner's success test: misclassified with a logit margin of at least kappa.
    """
    z = logits.detach().clone()
    z[torch.arange(len(y), device=z.device), y] += kappa
    return z.argmax(dim=1) != y


#: What CW and EAD return for a sample they never fool with the κ margin.
UNFOOLED = ("last", "clean")


def check_unfooled(attack: str, value: str) -> None:
    """``unfooled`` must name one of :data:`UNFOOLED`."""
    check(value in UNFOOLED, f"{attack}: unfooled must be one of {', '.join(UNFOOLED)}, got {value!r}")


def margin_loss(logits: Tensor, y: Tensor, kappa: float) -> Tensor:
    """Per-sample ``max(Z_y - max_{i≠y} Z_i, -kappa)``: CW's f6 / EAD's untargeted loss."""
    true_mask = F.one_hot(y, num_classes=logits.shape[1]).bool()
    real = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(true_mask, -math.inf).amax(dim=1)
    return torch.clamp(real - other, min=-kappa)


def checked_inputs(model: ModelLike, x: Tensor, y: Tensor) -> tuple[nn.Module, Tensor, Tensor]:
    """The attack contract's input checks, shared by every entry point (``__call__``, ``Square.run``):
    a model (or ensemble), a batched float ``x`` in [0, 1] (detached) and one long label per sample."""
    net = as_model(model)
    check(isinstance(x, Tensor) and x.is_floating_point(), "x must be a float tensor")
    check(x.dim() >= 2, f"x must be batched (N×...), got shape {tuple(x.shape)}")
    y = torch.as_tensor(y).to(device=x.device, dtype=torch.long).reshape(-1)
    check(y.shape[0] == x.shape[0], f"x has {x.shape[0]} samples but y has {y.shape[0]} labels")
    x = x.detach()
    if x.numel():
        lo, hi = torch.aminmax(x)
        check(  # one host synchronisation, not two: this runs once per attack call
            bool((lo >= 0) & (hi <= 1)),
            "x must hold images in [0, 1] (the models normalise internally)",
        )
    return net, x, y


def _jsonable(value: Any) -> Any:
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Tensor) and value.numel() == 1:
        return value.item()
    try:
        return float(value)  # numpy scalars and the like
    except (TypeError, ValueError):
        return repr(value)


class Attack(ABC):
    """Base of all attacks; subclasses are frozen dataclasses of hyperparameters.

    Subclasses declare a keyword-only ``name`` field (registry key when built by
    ``make_attack``, family name otherwise) and implement :meth:`perturb`. Fields carrying
    ``metadata={"param": False}`` (e.g. an RNG generator) are left out of :meth:`params`.
    """

    name: str
    # True for attacks that draw no random numbers (or seed their own): their results cannot
    # depend on the order in which (batch, source) tasks run, so they may run on parallel workers.
    deterministic = False

    def seeded(self, seed: int, device: torch.device | str) -> Attack | None:
        """This attack with its randomness drawn from a generator seeded with ``seed``.

        Lets an evaluation give every (batch, source) task its own stream, so the result does not
        depend on how many workers craft or in which order. None when that is impossible: the
        attack draws from the global RNG without a ``generator`` field, or the caller already
        gave it a generator (which must then be consumed in order).
        """
        if self.deterministic:
            return self
        names = {f.name for f in dataclasses.fields(self)} if dataclasses.is_dataclass(self) else set()
        if "generator" not in names or self.generator is not None:  # type: ignore[attr-defined]
            return None
        return dataclasses.replace(self, generator=torch.Generator(device=device).manual_seed(seed))

    def params(self) -> dict[str, Any]:
        """JSON-serialisable hyperparameters, for storing alongside results."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.name == "name" or not f.metadata.get("param", True):
                continue
            out[f.name] = _jsonable(getattr(self, f.name))
        return out

    def __call__(self, model: ModelLike, x: Tensor, y: Tensor) -> Tensor:
        """Attack ``model`` (or the logit-average of a sequence of models) at inputs ``x``.

        ``x`` is an ``N×C×H×W`` float batch in [0, 1], ``y`` the true labels; neither is
        modified. Runs with gradients enabled even inside a caller's ``torch.no_grad()``.
        """
        net, x, y = checked_inputs(model, x, y)
        if not x.numel():
            return x.clone()
        with eval_mode(net), torch.enable_grad():
            x_adv = self.perturb(net, x, y)
        return torch.clamp(x_adv.detach(), 0.0, 1.0)

    @abstractmethod
    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Compute adversarial inputs; ``model`` is already in eval mode, ``x`` detached."""


@dataclasses.dataclass(frozen=True)
class CallableAttack(Attack):
    """Any ``fn(model, x, y) -> x_adv`` (a torchattacks attack built per call, say) under the contract.

    Evaluations accept a plain callable and wrap it here, so it gets the checks, eval mode and [0, 1]
    clamp of deflect's own attacks, and an ensemble as one averaged-logits model. It has no seedable
    generator, so its tasks run in order on the global RNG seeded with the evaluation's seed.
    """

    fn: Callable[[nn.Module, Tensor, Tensor], Tensor] = dataclasses.field(metadata={"param": False})
    name: str = "custom"

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        out = self.fn(model, x, y)
        check(isinstance(out, Tensor) and out.shape == x.shape,
              f"attack {self.name!r} must return a tensor shaped like x {tuple(x.shape)}")
        return out
