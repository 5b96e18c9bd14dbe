"""Mean cosine between the input gradients of a set's models, pair by pair, at clean images.

A step along one model's gradient changes another model's loss in proportion to this cosine, so
the figure says whether a set's models share (> 0), ignore (0) or oppose (< 0) each other's attack
directions. n unit vectors cannot average below -1/(n - 1), which is printed beside it. Run:
`python results/gradient-cosine.py RUN DB [RUN DB ...]` (500 seeded validation images; per run a line of
summary and a line with every pair, `i-j cosine`).
"""

import itertools
import sys

import torch

from deflect.attacks.base import ce_grad
from deflect.data import load_dataset
from deflect.evaluate import select_subset
from deflect.sets import load_set
from deflect.store import Store
from deflect.train.losses import angular_loss

torch.set_num_threads(1)


def pair_cosines(models: list[torch.nn.Module], x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Per pair of models, the mean over images of the cosine between their loss gradients.

    Eq. 2's one cosine per image: the angular loss with `mode="sample"`, minus its +1 (training
    normalises per channel instead, as the released code does).
    """
    grads = [ce_grad(model, x, y) for model in models]
    return [angular_loss([grads[i], grads[j]], mode="sample").item() - 1.0
            for i, j in itertools.combinations(range(len(grads)), 2)]


for run, db in zip(sys.argv[1::2], sys.argv[2::2], strict=True):
    store = Store(db)
    val = select_subset(load_dataset(store.get_run(run).dataset, "val"), 500)
    x, y = val.batch(torch.arange(len(val)))
    models = load_set(run, store)
    cos = pair_cosines(models, x, y)
    n = len(models)
    print(f"{run} n={n} mean {sum(cos) / len(cos):.3f} lowest pair {min(cos):.3f} "
          f"highest pair {max(cos):.3f} bound {-1 / (n - 1):.3f}", flush=True)
    pairs = itertools.combinations(range(n), 2)
    print("  pairs: " + "  ".join(f"{i}-{j} {c:.3f}" for (i, j), c in zip(pairs, cos, strict=True)), flush=True)
