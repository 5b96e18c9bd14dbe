"""Mean squared norm of each image's own input gradient, per model of a set, at clean images.

The smoothness term of `deflect train --w-smooth` (TRS's) lowers this figure during training; this
script reads it off stored sets in eval mode, so sets trained with and without the term compare on
the same images. Run: `python results/gradient-norm.py RUN DB [RUN DB ...]` (the first 1000
validation images; per run a line with the mean over models and each model's figure).
"""

import sys

import torch
import torch.nn.functional as F

from deflect.data import load_dataset
from deflect.sets import load_set
from deflect.store import Store

torch.set_num_threads(1)


def squared_norms(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over images of ‖∇x CE(model(x_i), y_i)‖² (the summed loss's gradient is each image's own)."""
    model.eval()
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
    return float(g.flatten(1).pow(2).sum(1).mean())


def main(args: list[str]) -> None:
    if not args or len(args) % 2:
        sys.exit("usage: python results/gradient-norm.py RUN DB [RUN DB ...]")
    for run, db in zip(args[::2], args[1::2], strict=True):
        store = Store(db)
        dataset = store.get_run(run).dataset
        val = load_dataset(dataset, "val")
        x, y = val.batch(torch.arange(min(1000, len(val))))
        values = [squared_norms(m, x, y) for m in load_set(run, store)]
        print(f"{run} mean {sum(values) / len(values):.2f} models " + " ".join(f"{v:.2f}" for v in values))


if __name__ == "__main__":
    main(sys.argv[1:])
