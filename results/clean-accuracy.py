"""Clean accuracy of each model of a set on a whole split, the set's mean and its standard error.

The n = 3 clean bar compares set means that differ by about a point; on the 1000 validation images
an evaluation attacks, one model's accuracy has a binomial standard error near 0.9 points, so the
bar is read on the whole split here (Fashion-MNIST: 5000 validation images, 10 000 test images).
Run: `python results/clean-accuracy.py SPLIT RUN DB [RUN DB ...]` (one line per run).
"""

import math
import sys
from functools import cache

import torch

from deflect.data import load_dataset
from deflect.sets import load_set
from deflect.store import Store
from deflect.train.disjoint import clean_accuracy

torch.set_num_threads(1)

split = sys.argv[1]
dataset_split = cache(load_dataset)  # runs of one dataset share its split: read it once

for run, db in zip(sys.argv[2::2], sys.argv[3::2], strict=True):
    store = Store(db)
    data = dataset_split(store.get_run(run).dataset, split)
    with torch.no_grad():
        accs = clean_accuracy(load_set(run, store), data, torch.device("cpu"), 1000)
    mean = sum(accs) / len(accs)
    # the mean of n models on the same images: at most as noisy as one model's binomial error
    se = 100.0 * math.sqrt((mean / 100.0) * (1 - mean / 100.0) / len(data))
    each = " / ".join(f"{a:.2f}" for a in accs)
    print(f"{run} {split} ({len(data)} images): {each}; mean {mean:.2f} (se ≤ {se:.2f})")
