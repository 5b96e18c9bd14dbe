"""Clean accuracy of each model with its stored BatchNorm statistics and with statistics recomputed
on clean training images.

Training-mode forwards of the transfer terms' perturbed images update the running statistics (the
released code's behaviour), so a set is deployed with statistics partly of perturbed images. This
measures what that costs on clean images without training anything: the statistics are recomputed
(train mode, cumulative average, `torch.optim.swa_utils.update_bn`) on 10 000 seeded training images.
Run: `python results/recalibrated-bn.py SPLIT RUN DB [RUN DB ...]` (one line per run).
"""

import sys
from functools import cache

import torch
from torch.optim.swa_utils import update_bn

from deflect.data import load_dataset
from deflect.sets import load_set
from deflect.store import Store
from deflect.train.disjoint import clean_accuracy

torch.set_num_threads(1)
device = torch.device("cpu")

split = sys.argv[1]
dataset_split = cache(load_dataset)  # runs of one dataset share its splits: read them once

for run, db in zip(sys.argv[2::2], sys.argv[3::2], strict=True):
    store = Store(db)
    dataset = store.get_run(run).dataset
    data, train = dataset_split(dataset, split), dataset_split(dataset, "train")
    picked = torch.randperm(len(train), generator=torch.Generator().manual_seed(123))[:10_000]
    loader = [train.batch(picked[i : i + 500])[0] for i in range(0, len(picked), 500)]
    models = load_set(run, store)
    before = clean_accuracy(models, data, device, 1000)
    for model in models:
        update_bn(loader, model, device)
    after = clean_accuracy(models, data, device, 1000)

    def show(accs: list[float]) -> str:
        return " / ".join(f"{a:.2f}" for a in accs) + f"; mean {sum(accs) / len(accs):.2f}"

    print(f"{run} {split} ({len(data)} images): stored {show(before)} | recomputed {show(after)}")
