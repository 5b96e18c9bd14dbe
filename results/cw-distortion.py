"""How far CW's and EAD's examples move the images, under both `unfooled` conventions (see cw-unfooled.py).

An unbounded attack's black-box figure depends on how large its perturbations are, so the report
gives their size beside it. Crafted on model 0 of a set, on the first LIMIT images of SPLIT.
Run: `python results/cw-distortion.py SPLIT LIMIT ATTACKS RUN DB`; one line per attack and convention.
"""

import sys

import torch

from deflect import load_dataset, load_set
from deflect.attacks import make_attack
from deflect.store import Store

torch.set_num_threads(1)
split, limit, attacks, run, db = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(","), sys.argv[4], sys.argv[5]
store = Store(db)
dataset = store.get_run(run).dataset
model, data = load_set(run, store)[0].eval(), load_dataset(dataset, split)
x, y = data[:limit]
for name in attacks:
    for unfooled in ("clean", "last"):
        x_adv = make_attack(name, dataset, unfooled=unfooled)(model, x, y)
        delta = (x_adv - x).flatten(1)
        with torch.no_grad():
            acc = (model(x_adv).argmax(1) == y).float().mean().item()
        moved = delta.abs().amax(1) > 0
        print(f"{run} model 0 {name} unfooled={unfooled} ({limit} {split} images): accuracy {100 * acc:.1f} %, "
              f"{100 * moved.float().mean():.1f} % of images moved, L2 {delta.norm(dim=1).mean():.2f} "
              f"(median {delta.norm(dim=1).median():.2f}), L∞ {delta.abs().amax(1).mean():.2f}", flush=True)
