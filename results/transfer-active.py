"""Share of images on which a transfer term is still active, per term, at the end of training.

A transfer term max(ℓ_i(x + δ_j) − ℓ_i(x), 0), clamped per image, has a gradient only on the images
where model j's perturbation still raises model i's loss; with the released code's live clean loss
that gradient also pushes ℓ_i(x) up there. The count uses the trained models in eval mode, the
batch-mean gradients of batches of 128 validation images and the run's ε1 and ε2 (training takes
the gradients in train mode on the pair-term rows, so this is the terms' reach, not their exact
value). Run: `python results/transfer-active.py RUN DB [RUN DB ...]` (1024 validation images, one
line per run: the share for each term over every ordered pair, and the mean clamped increase).
"""

import itertools
import sys

import torch
import torch.nn.functional as F

from deflect.attacks.base import ce_grad
from deflect.data import load_dataset
from deflect.sets import load_set
from deflect.store import Store

torch.set_num_threads(1)


def active_shares(models: list[torch.nn.Module], x: torch.Tensor, y: torch.Tensor, eps1: float, eps2: float,
                  tanh_scale: float, batch: int = 128) -> dict[str, tuple[float, float]]:
    """Per term, the share of (image, ordered pair) cases with a positive loss increase and the mean
    clamped increase."""
    counts = {"transfer1": [0.0, 0.0], "transfer2": [0.0, 0.0]}
    cases = 0
    for start in range(0, len(x), batch):
        xb, yb = x[start:start + batch], y[start:start + batch]
        grads = [ce_grad(model, xb, yb) for model in models]
        with torch.no_grad():
            clean = [F.cross_entropy(model(xb), yb, reduction="none") for model in models]
            for i, j in itertools.permutations(range(len(models)), 2):
                deltas = {"transfer1": eps1 * grads[j], "transfer2": eps2 * torch.tanh(tanh_scale * grads[j])}
                for term, delta in deltas.items():
                    rise = F.cross_entropy(models[i](xb + delta), yb, reduction="none") - clean[i]
                    counts[term][0] += float((rise > 0).sum())
                    counts[term][1] += float(rise.clamp(min=0).sum())
                cases += len(yb)
    return {term: (active / cases, total / cases) for term, (active, total) in counts.items()}


for run_id, db in zip(sys.argv[1::2], sys.argv[2::2], strict=True):
    store = Store(db)
    run = store.get_run(run_id)
    val = load_dataset(run.dataset, "val")
    x, y = val.batch(torch.arange(min(1024, len(val))))
    c = run.config
    shares = active_shares(load_set(run.id, store), x, y, c["eps1"], c["eps2"], c.get("tanh_scale", 2e4))
    print(run.id, "  ".join(f"{term}: active {share:.1%}, mean increase {inc:.4f}"
                            for term, (share, inc) in shares.items()))
