"""Weight averages over a finished run's last epoch: EMAs of several per-step decays and the uniform
mean (SWA), each stored as a run of its own, without changing the trainer.

Every epoch's randomness is seeded by (seed, epoch), so a copy of the run resumed from its resume
state of epoch E retrains the run's own epochs E+1.. bit for bit (the script checks that its models
equal the run's). While it does, every model's parameters and BatchNorm buffers are averaged after
each optimizer step (the EMAs start from the epoch-E weights, SWA is the plain mean of the weights
after each step); each average then becomes a finished run
(models replaced, `--select last`) that `deflect evaluate` and `clean-accuracy.py` read as any set.
Run: `python results/last-epoch-average.py RUN DB EPOCH` (prints the copy's and the averages' ids).
"""

import importlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from deflect.checkpoint import (
    encode_tensors,
    load_tensors,
    model_file,
    sha256_bytes,
    sha256_file,
    update_manifest,
    write_json,
)
from deflect.config import TrainConfig
from deflect.store import EpochMetric, Run, Store
from deflect.train.runner import CONFIG_JSON, new_run_id, state_file, train

runner = importlib.import_module("deflect.train.runner")  # the module; `deflect.train.train` is the function
torch.set_num_threads(1)
DECAYS = {"ema95": 0.95, "ema98": 0.98, "ema99": 0.99, "ema995": 0.995}  # per optimizer step

ref, db, epoch = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = Store(db)
src = store.get_run(ref)
cfg = TrainConfig.from_dict(src.config)
cfg.select = "last"


def new_run(note: str) -> tuple[str, Path]:
    rid = new_run_id(cfg)
    run_dir = store.runs_root / rid
    run_dir.mkdir(parents=True)
    write_json(run_dir / CONFIG_JSON, json.loads(cfg.to_json()))
    store.add_run(Run(id=rid, method=cfg.method, dataset=cfg.dataset, arch=cfg.arch, preset=cfg.preset, n=cfg.n,
                      config=json.loads(cfg.to_json()), device=src.device, git_hash=src.git_hash,
                      run_dir=str(run_dir.resolve()), epochs_total=cfg.epochs, message=note))
    return rid, run_dir


# the copy: the source's epoch-E resume state and epoch rows, left as an interrupted run to resume
copy_id, copy_dir = new_run(f"copy of {src.id} at epoch {epoch}")
name = state_file(epoch)
shutil.copy2(Path(src.run_dir) / name, copy_dir / name)
digest = sha256_file(copy_dir / name)
if digest != store.checkpoint_digest(src.id, epoch, name):
    sys.exit(f"{src.id}'s {name} does not hold epoch {epoch}")
rows = [EpochMetric(**{k: v for k, v in m.model_dump().items() if k not in ("id", "run_id")}, run_id=copy_id)
        for m in store.epochs(src.id) if m.epoch <= epoch]
store.add_checkpoints(copy_id, epoch, {name: digest}, copy_dir)
update_manifest(copy_dir, {name: digest})
store.update_run(copy_id, *rows, status="interrupted", epochs_done=epoch, seconds=sum(m.seconds for m in rows))

averages: dict[str, list[dict[str, torch.Tensor]]] = {}
steps = 0
plain_train_epoch = runner.train_epoch


def averaging_train_epoch(models: list[torch.nn.Module], *args: Any, **kwargs: Any) -> Any:
    """The trainer's epoch, with every average updated after each optimizer step (its batch event)."""
    if not averages:
        for key in [*DECAYS, "swa"]:
            averages[key] = [{k: v.detach().float().clone() if v.is_floating_point() else v.clone()
                              for k, v in m.state_dict().items()} for m in models]
    args_list = list(args)  # runner.train passes (opt, sched, data, cfg, epoch, device, on_batch, frozen, shard)
    on_batch = args_list[6]

    def step(event: Any) -> None:
        global steps
        steps += 1
        with torch.no_grad():
            for key, states in averages.items():
                weight = 1.0 / steps if key == "swa" else 1.0 - DECAYS[key]  # swa: the mean of the steps' weights
                for model, state in zip(models, states, strict=True):
                    for k, v in model.state_dict().items():
                        state[k].lerp_(v.float(), weight) if v.is_floating_point() else state[k].copy_(v)
        if on_batch is not None:
            on_batch(event)

    args_list[6] = step
    return plain_train_epoch(models, *args_list, **kwargs)


runner.train_epoch = averaging_train_epoch
train(resume=copy_id, store=store)


def same(i: int) -> bool:
    a, b = load_tensors(model_file(Path(src.run_dir), i)), load_tensors(model_file(copy_dir, i))
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


print(f"copy {copy_id}: models equal to {src.id}'s: {all(same(i) for i in range(cfg.n))}", flush=True)
for key, states in averages.items():
    avg_id, avg_dir = new_run(f"{key} over epochs {epoch + 1}-{cfg.epochs} of {src.id}")
    blobs = {model_file(avg_dir, i).name: encode_tensors({k: v.contiguous() for k, v in state.items()},
                                                         {"run": avg_id, "epoch": cfg.epochs, "index": i})
             for i, state in enumerate(states)}
    for file, blob in blobs.items():
        (avg_dir / file).write_bytes(blob)
    digests = {file: sha256_bytes(blob) for file, blob in blobs.items()}
    store.add_checkpoints(avg_id, cfg.epochs, digests, avg_dir)
    update_manifest(avg_dir, digests)
    store.update_run(avg_id, status="finished", epochs_done=cfg.epochs, best_epoch=cfg.epochs)
    print(f"{key} {avg_id}", flush=True)
