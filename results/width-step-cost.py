"""Seconds per reference disjoint step of the `fashion-mnist` preset at widths 16, 24 and 32.

n = 3, batch 128, one torch thread, synthetic images. The widths alternate inside one process, so
a load that comes and goes on the machine touches all three alike: compare the ratios. Run:
`python results/width-step-cost.py` (prints JSON: width -> best seconds per step).
"""

import json
import time

import torch

from deflect.config import make_config
from deflect.data import dataset_info
from deflect.models.factory import build_model
from deflect.train.disjoint import step_loss
from deflect.train.losses import ActiveTerms

torch.set_num_threads(1)
device = torch.device("cpu")
info = dataset_info("fashion-mnist")
gen = torch.Generator().manual_seed(0)
x = torch.rand(128, info.channels, info.size, info.size, generator=gen)
y = torch.randint(0, info.num_classes, (128,), generator=gen)
setups = {}
for width in (16, 24, 32):
    cfg = make_config(3, "fashion-mnist", "fashion-mnist", width=width)
    torch.manual_seed(0)
    models = [build_model(cfg.arch, info, cfg.normalize, width) for _ in range(3)]
    opt = torch.optim.SGD([p for m in models for p in m.parameters()], lr=0.01, momentum=0.9)
    setups[width] = (cfg, models, opt)


def step(width: int) -> None:
    cfg, models, opt = setups[width]
    loss = step_loss(models, x, y, cfg, ActiveTerms.all_enabled(cfg), [0, 1, 2], device).total
    opt.zero_grad()
    loss.backward()
    opt.step()


for width in setups:  # warm-up
    step(width)
best = {width: float("inf") for width in setups}
for _ in range(4):
    for width in setups:
        start = time.perf_counter()
        step(width)
        step(width)
        best[width] = min(best[width], (time.perf_counter() - start) / 2)
print(json.dumps({w: round(s, 3) for w, s in best.items()}))
