"""What makes CW κ = 40's examples transfer across a set: their direction or their size?

For each source model of a set, on the first LIMIT validation images: CW κ = 40 (Table 1, last
iterate), then perturbations of the same per-image L2 length along other directions (one step of
the source's cross-entropy gradient, one of its logit-margin gradient, Gaussian noise), PGD-L2 at
CW's mean length and at a fixed ε = 2.0 (torchattacks, 20 steps of 2.5ε/20, no random start). One
line per source and kind: mean L2 and L∞ of the perturbation, the source's own accuracy, and each
other model's accuracy on the perturbed images (what a transfer attack leaves).
Run: `python results/l2-transfer.py RUN DB LIMIT [SOURCES [KINDS]]` (SOURCES e.g. 0,1,2; KINDS a
comma list of cw2, grad, margin, random, pgdl2, pgdl2fixed; default all).
"""

import sys

import numpy as np
import torch
import torch.nn.functional as F
import torchattacks

from deflect.attacks import make_attack
from deflect.data import load_dataset
from deflect.sets import load_set
from deflect.store import Store

torch.set_num_threads(1)
run, db, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = Store(db)
models = [m.eval() for m in load_set(run, store)]
sources = [int(v) for v in sys.argv[4].split(",")] if len(sys.argv) > 4 else range(len(models))
kinds = set(sys.argv[5].split(",")) if len(sys.argv) > 5 else {"cw2", "grad", "margin", "random", "pgdl2",
                                                                "pgdl2fixed"}
data = load_dataset(store.get_run(run).dataset, "val")
x, y = data.batch(torch.arange(limit))


def accuracy(model: torch.nn.Module, images: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(images).argmax(1) == y).float().mean() * 100)


def report(kind: str, src: int, images: torch.Tensor) -> None:
    d = (images - x).flatten(1)
    others = [accuracy(models[t], images) for t in range(len(models)) if t != src]
    print(f"{run} source {src} {kind:24s} L2 {d.norm(dim=1).mean():.2f} L∞ {d.abs().max(1).values.mean():.2f} "
          f"source {accuracy(models[src], images):5.1f} targets {' '.join(f'{a:5.1f}' for a in others)} "
          f"mean {np.mean(others):5.1f}", flush=True)


def along(direction: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """x moved by `length` (per image) along `direction`, clipped to the image range."""
    unit = direction / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return (x + unit * length.view(-1, 1, 1, 1)).clamp(0, 1)


def input_gradient(model: torch.nn.Module, loss: str) -> torch.Tensor:
    xs = x.clone().requires_grad_(True)
    z = model(xs)
    if loss == "ce":
        value = F.cross_entropy(z, y, reduction="sum")
    else:  # the logit margin CW pushes: best other logit minus the true one
        value = (z.masked_fill(F.one_hot(y, z.shape[1]).bool(), -1e9).max(1).values - z.gather(1, y[:, None])[:, 0])
        value = value.sum()
    (g,) = torch.autograd.grad(value, xs)
    return g


torch.manual_seed(0)
for src in sources:
    model = models[src]
    if kinds & {"cw2", "grad", "margin", "random", "pgdl2"}:  # the lengths of CW's examples are needed
        cw = make_attack("cw2", store.get_run(run).dataset)(model, x, y)
        length = (cw - x).flatten(1).norm(dim=1)
    if "cw2" in kinds:
        report("cw2 (last iterate)", src, cw)
    if "grad" in kinds:
        report("CE gradient step", src, along(input_gradient(model, "ce"), length))
    if "margin" in kinds:
        report("margin gradient step", src, along(input_gradient(model, "margin"), length))
    if "random" in kinds:
        report("Gaussian noise", src, along(torch.randn_like(x), length))
    for eps in ([float(length.mean())] if "pgdl2" in kinds else []) + ([2.0] if "pgdl2fixed" in kinds else []):
        attack = torchattacks.PGDL2(model, eps=eps, alpha=2.5 * eps / 20, steps=20, random_start=False)
        report(f"PGD-L2 ε {eps:.2f}", src, attack(x, y))
