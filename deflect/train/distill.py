"""Distillation from a stored set: part of the classification term learnt from a teacher's soft targets.

Why it is here: a disjoint set pays for its pair terms in clean accuracy (a width-32 Fashion-MNIST
set of 3 ends about a point below independent models of the same schedule,
results/fashion-mnist-transfer-steps.md), and a teacher's soft targets are the usual way to buy
a small model clean accuracy without more data, epochs or width. The teacher is any finished set of
the same dataset (typically an independent set, which costs a fifth of a disjoint one); its
averaged, temperature-softened probabilities replace a share α of each model's classification
target (Hinton et al. 2015):

    classification_i = (1 − α)·CE(z_i, y) + α·T²·KL(p_teacher^T ‖ softmax(z_i / T))

The T² keeps the soft part's gradient at the hard part's scale. The pair terms are untouched: they
keep comparing plain cross-entropies, as Eqs. 3/4 define them. The soft part takes its own forward
of each model on the clean batch (under `running_stats_kept`, so BatchNorm's running statistics are
what they would be without it); in training mode that forward normalises with the same batch
statistics as the classification forward, so its logits are the same. Validation (checkpoint
selection) keeps the method's own objective.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from deflect.config import TrainConfig
from deflect.errors import DeflectError
from deflect.inference import inference_copy
from deflect.store import Store
from deflect.train.distributed import batch_mean
from deflect.train.losses import LossParts, running_stats_kept


@dataclass
class Teacher:
    """A stored set's models as frozen evaluation copies, averaged into soft targets."""

    run_id: str
    models: list[nn.Module]

    @classmethod
    def load(cls, store: Store, ref: str, cfg: TrainConfig, device: torch.device) -> Teacher:
        """The set `ref` (id, prefix or 'latest') as the teacher of a run configured by `cfg`: it must
        be of the same dataset and have saved models. Read before the student's run exists."""
        from deflect.sets import load_set

        run = store.get_run(ref)
        if run.dataset != cfg.dataset:
            raise DeflectError(f"--teacher {run.id} was trained on {run.dataset}, not {cfg.dataset}")
        if run.status != "finished":
            raise DeflectError(f"--teacher {run.id} is {run.status}; a teacher must be a finished run")
        models = [inference_copy(m, device) for m in load_set(run.id, store)]
        return cls(run.id, models)

    @classmethod
    def for_config(cls, store: Store, cfg: TrainConfig, device: torch.device) -> tuple[Teacher | None, TrainConfig]:
        """The teacher `cfg` names (None without one) and `cfg` naming it by run id, so that 'latest'
        or a prefix stored in the run's config still names this set on resume, whatever comes later."""
        if cfg.teacher is None:
            return None, cfg
        teacher = cls.load(store, cfg.teacher, cfg, device)
        return teacher, replace(cfg, teacher=teacher.run_id)

    @torch.no_grad()
    def soft_targets(self, x: torch.Tensor, temperature: float) -> torch.Tensor:
        """The teacher models' mean of softmax(z / T) on `x`."""
        probs = [F.softmax(m(x).float() / temperature, dim=1) for m in self.models]
        return torch.stack(probs).mean(0)


def require_teacher(teacher: str | None, alpha: float | None, temperature: float | None) -> None:
    """α and T mean nothing without a teacher: refuse them alone rather than ignore them."""
    if teacher is None and (alpha is not None or temperature is not None):
        raise DeflectError("--distill and --distill-temperature need --teacher")


def soft_loss(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """T²·KL(targets ‖ softmax(logits / T)), the batch mean over images."""
    log_p = F.log_softmax(logits.float() / temperature, dim=1)
    per_image = F.kl_div(log_p, targets, reduction="none").sum(1)
    return temperature**2 * batch_mean(per_image)


def distill_term(models: Sequence[nn.Module], x: torch.Tensor, targets: torch.Tensor, cfg: TrainConfig
                 ) -> torch.Tensor:
    """Every model's soft loss, reduced over models as the classification term is (`class_reduction`)."""
    losses = []
    for model in models:
        with running_stats_kept(model):
            losses.append(soft_loss(model(x), targets, cfg.distill_temperature))
    stacked = torch.stack(losses)
    return stacked.sum() if cfg.class_reduction == "sum" else stacked.mean()


def distilled(parts: LossParts, models: Sequence[nn.Module], x: torch.Tensor, teacher: Teacher | None,
              cfg: TrainConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """A step's total and its terms by name, with a share α of the classification term replaced by
    the soft loss when there is a teacher (its value stored as the epoch term `distill`)."""
    values = parts.as_floats()
    if teacher is None:
        return parts.total, values
    soft = distill_term(models, x, teacher.soft_targets(x, cfg.distill_temperature), cfg)
    total = parts.total + cfg.w_class * cfg.distill_alpha * (soft - parts.classification)
    return total, {**values, "total": float(total.detach()), "distill": float(soft.detach())}
