"""CW and EAD under both answers to "what does an attack return for a sample it never fools with its κ margin".

`unfooled="last"` (deflect's default since 2026-12-07, as the paper's released evaluation code) returns
the attack's last iterate; `unfooled="clean"` (torchattacks' and Carlini's convention, deflect's
behaviour before) returns the clean image. With Table 1's single constant c, CW κ = 40 and EAD κ = 55
rarely reach their margin, so under "clean" most of their examples are the clean images themselves.
Run: `python results/cw-unfooled.py SPLIT LIMIT ATTACKS RUN DB [RUN DB ...]` (ATTACKS: comma list,
e.g. cw2,ead2); prints one line per run, attack and convention.
"""

import sys

import numpy as np
import torch

from deflect import load_dataset, load_set, transfer_matrix
from deflect.attacks import make_attack
from deflect.store import Store

torch.set_num_threads(1)
split, limit, attacks = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")

for run, db in zip(sys.argv[4::2], sys.argv[5::2], strict=True):
    store = Store(db)
    dataset = store.get_run(run).dataset
    models, data = load_set(run, store), load_dataset(dataset, split)
    for name in attacks:
        for unfooled in ("clean", "last"):
            res = transfer_matrix(models, data, make_attack(name, dataset, unfooled=unfooled), limit=limit)
            m = np.asarray(res.matrix)
            off = m[~np.eye(len(m), dtype=bool)]
            print(f"{run} {name} unfooled={unfooled} ({res.n_examples} {split} images): clean "
                  f"{np.mean(res.clean):.1f}, white-box {np.mean(np.diag(m)):.1f}, black-box {off.mean():.1f} "
                  f"± {off.std():.1f} (lowest {off.min():.1f})", flush=True)
