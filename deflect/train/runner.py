"""A training run end to end: data, models, optimiser, epochs, checkpoints and database rows.

Crash safety: each epoch first records the sha256 of the files it is about to write, then
writes them atomically (the selected model files and the resume state), then commits the epoch row
and the run's counters in one transaction: that commit is the epoch's point of no return. The
resume state alternates between two files by epoch parity, so writing epoch e never touches the
state of epoch e-1, the last committed one. A run killed at any point (SIGKILL included) therefore
resumes from its last committed epoch with at most one epoch of work lost, every file it reads
verified by hash, and because every epoch's randomness is seeded by (seed, epoch), the resumed run
ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deflect.checkpoint import (
    atomic_write,
    encode_tensors,
    load_tensors_meta,
    model_file,
    sha256_bytes,
    update_manifest,
    write_json,
)
from deflect.config import TrainConfig
from deflect.data import ImageTensorDataset, dataset_info, load_dataset
from deflect.errors import DeflectError
from deflect.inference import require_bf16
from deflect.models import build_model
from deflect.runtime import fast_cpu_math, training_layout
from deflect.store import EpochMetric, Run, Store
from deflect.train.disjoint import BatchEvent, clean_accuracy, train_epoch, validation_loss
from deflect.train.distill import Teacher
from deflect.train.distributed import Shard, barrier, check_config, global_batchnorm

CONFIG_JSON = "config.json"


def state_file(epoch: int) -> str:
    """Resume state of `epoch`: two files by parity, so a new state never overwrites the last committed one."""
    return f"state.{epoch % 2}.safetensors"


@dataclass
class Callbacks:
    """Hooks a front end (Rich progress, Textual) uses to show a run as it trains."""

    on_start: Callable[[Run, int], None] | None = None  # (run, first epoch)
    on_batch: Callable[[BatchEvent], None] | None = None
    on_epoch: Callable[[EpochMetric], None] | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeflectError("--device cuda was asked for but no CUDA device is available")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise DeflectError(f"unknown device {name!r}; choose auto, cpu or cuda")
    return torch.device(name)


def build_set(cfg: TrainConfig) -> list[nn.Module]:
    """n freshly initialised models, model i seeded with (seed, i), global RNG left untouched."""
    info = dataset_info(cfg.dataset)
    models = []
    with torch.random.fork_rng(devices=[]):
        for i in range(cfg.n):
            torch.manual_seed(cfg.seed * 1000 + i)
            models.append(build_model(cfg.arch, info, cfg.normalize, cfg.width))
    return models


def _fast_at_check(models: list[nn.Module], train_set: Any, cfg: TrainConfig, device: torch.device,
                   at_state: dict[str, Any], last_good: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """After a fast-AT epoch: roll a model that overfit catastrophically back to its last good weights
    and freeze it; remember the good weights of the others."""
    from deflect.train.baselines import catastrophic, dataset_eps, robust_first_batch

    x, y = train_set.batch(torch.arange(min(cfg.batch_size, len(train_set))))
    robust = robust_first_batch(models, x.to(device), y.to(device), cfg.at_eps or dataset_eps(cfg.dataset), cfg.seed)
    previous = at_state["robust"]
    collapsed = [i for i in catastrophic(previous, robust) if i not in at_state["frozen"]]
    for i in collapsed:
        models[i].load_state_dict(last_good[i])
    at_state["frozen"] = sorted({*at_state["frozen"], *collapsed})
    frozen = set(at_state["frozen"])
    at_state["robust"] = [previous[i] if previous and i in frozen else r for i, r in enumerate(robust)]
    for i, m in enumerate(models):
        if i not in frozen:
            last_good[i] = copy.deepcopy(m.state_dict())
    return {"robust_first_batch": robust, "frozen": list(at_state["frozen"]), "rolled_back": collapsed}


def register_run(store: Store, record: Run) -> Run:
    """The run's folder with its config.json (the row's config), then its row; a row that cannot be
    written (a read-only or locked database) takes the folder with it, so no folder is left that no
    run names."""
    run_dir = Path(record.run_dir)
    run_dir.mkdir(parents=True, exist_ok=False)
    try:
        write_json(run_dir / CONFIG_JSON, record.config)
        return store.add_run(record)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise


def new_run_id(cfg: TrainConfig) -> str:
    return f"{cfg.dataset}-{cfg.method}-n{cfg.n}-{secrets.token_hex(3)}"


def _git_hash() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _load_splits(cfg: TrainConfig) -> tuple[ImageTensorDataset, ImageTensorDataset, ImageTensorDataset]:
    train = load_dataset(cfg.dataset, "train", cfg.data_dir, cfg.download)
    if cfg.train_limit is not None and cfg.train_limit < len(train):
        idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))
        train = train.subset(idx[: cfg.train_limit].sort().values)
    val = load_dataset(cfg.dataset, "val", cfg.data_dir, cfg.download)
    test = load_dataset(cfg.dataset, "test", cfg.data_dir, cfg.download)
    return train, val, test


def _optimizer(models: Sequence[nn.Module], cfg: TrainConfig, steps: int) -> tuple[Any, Any]:
    """One SGD over every model's parameters and a per-batch cyclic LR 0 → peak → 0."""
    params = [p for m in models for p in m.parameters()]
    opt = torch.optim.SGD(params, lr=cfg.lr_max, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    up = max(1, steps // 2)
    sched = torch.optim.lr_scheduler.CyclicLR(
        opt,
        base_lr=0.0,
        max_lr=cfg.lr_max,
        step_size_up=up,
        step_size_down=max(1, steps - up),
        cycle_momentum=cfg.cycle_momentum,
        base_momentum=cfg.base_momentum,
        max_momentum=cfg.momentum,
    )
    return opt, sched


def _state_tensors(models: Sequence[nn.Module], opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    tensors = {f"model.{i}.{k}": v for i, m in enumerate(models) for k, v in m.state_dict().items()}
    params = [p for g in opt.param_groups for p in g["params"]]
    for k, p in enumerate(params):
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            tensors[f"optim.{k}.momentum_buffer"] = buf
    return tensors


def _restore_state(
    models: Sequence[nn.Module], opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], device: torch.device
) -> None:
    for i, m in enumerate(models):
        prefix = f"model.{i}."
        m.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    params = [p for g in opt.param_groups for p in g["params"]]
    for k, p in enumerate(params):
        buf = tensors.get(f"optim.{k}.momentum_buffer")
        if buf is not None:
            opt.state[p]["momentum_buffer"] = buf.to(device)


def _broadcast(value: str | None) -> str:
    """Rank 0's `value` on every rank."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return str(box[0])


def _jsonable(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if _is_json(v)}


def _is_json(v: Any) -> bool:
    try:
        json.dumps(v)
    except (TypeError, ValueError):
        return False
    return True


@fast_cpu_math()
def train(
    cfg: TrainConfig | None = None,
    store: Store | None = None,
    callbacks: Callbacks | None = None,
    resume: str | None = None,
    shard: Shard | None = None,
) -> str:
    """Train a set (or resume run `resume`) and return its run id.

    With a `shard` (torchrun), every process trains the same set on its slice of each batch
    (`deflect.train.distributed`); rank 0 alone evaluates and writes the database and the files."""
    store = store or Store()
    callbacks = callbacks or Callbacks()
    if resume is not None:
        run = store.get_run(resume)
        if run.status == "finished":
            raise DeflectError(f"run {run.id} already finished; nothing to resume")
        if run.status == "running":
            raise DeflectError(f"run {run.id} is still running (pid {run.pid} on {run.host}); stop it first")
        if run.config.get("parent"):
            raise DeflectError(f"run {run.id} was grown from {run.config['parent']} by 'deflect grow' and cannot be "
                               f"resumed; grow the parent again")
        cfg = TrainConfig.from_dict(run.config)
        run_dir = store.writable_run_dir(run)
    elif cfg is None:
        raise DeflectError("train() needs a TrainConfig or a run to resume")
    cfg.validate()
    device = resolve_device(cfg.device)
    if cfg.bf16:  # refused before a run is created, not at its first batch
        require_bf16(device)
    leader = shard is None or shard.leader
    if shard is not None:
        check_config(cfg.method, cfg.step, cfg.transfer_batch)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
    where = str(device) if shard is None else f"{device.type} x{shard.world}"
    teacher, cfg = Teacher.for_config(store, cfg, device)
    train_set, val_set, test_set = _load_splits(cfg)

    # the models and optimiser exist before the run does: a Ctrl-C while they are built leaves no row,
    # and once a new run's row exists the loop's handler (and the front end's on_start) follow at once
    models = [m.to(device) for m in build_set(cfg)]
    if shard is not None:
        global_batchnorm(models)
    models = training_layout(models, device)
    batches = (len(train_set) // cfg.batch_size)
    opt, sched = _optimizer(models, cfg, cfg.epochs * batches)

    if resume is None and not leader:
        run = store.get_run(_broadcast(None))  # rank 0 created it
        run_dir = Path(run.run_dir)
    elif resume is None:
        run_id = new_run_id(cfg)
        run_dir = store.runs_root / run_id
        run = register_run(store, Run(
            id=run_id, method=cfg.method, dataset=cfg.dataset, arch=cfg.arch, preset=cfg.preset,
            n=cfg.n, config=json.loads(cfg.to_json()), device=where, git_hash=_git_hash(),
            run_dir=str(run_dir.resolve()), epochs_total=cfg.epochs,
        ))
        if shard is not None:
            _broadcast(run.id)  # after the row is committed: the other ranks read it
    elif leader:
        run = store.update_run(
            run.id, status="running", message=None, device=where, pid=os.getpid(),
            host=socket.gethostname(),
        )

    if shard is not None:
        barrier()  # every rank has the run before rank 0 records the first epoch
    first_epoch, best_val, best_epoch, seconds = 1, math.inf, None, 0.0
    if resume is not None and run.epochs_done:
        name = state_file(run.epochs_done)
        digest = store.checkpoint_digest(run.id, run.epochs_done, name)
        if digest is None:
            raise DeflectError(f"run {run.id} has no recorded state for epoch {run.epochs_done}; cannot resume")
        tensors, state = load_tensors_meta(run_dir / name, digest)
        if state.get("epoch") != run.epochs_done:
            raise DeflectError(f"{run_dir / name} holds epoch {state.get('epoch')}, not {run.epochs_done}")
        _restore_state(models, opt, tensors, device)
        sched.load_state_dict(state["scheduler"])
        for group, saved in zip(opt.param_groups, state["param_groups"], strict=True):
            group.update(saved)
        first_epoch = state["epoch"] + 1
        best_val, best_epoch, seconds = state["best_val"], state["best_epoch"], state["seconds"]

    # fast-AT's early stop: per-model first-batch PGD accuracy, models frozen after a collapse, and the
    # weights of the last good epoch (after a resume: the resumed ones, which are that epoch's)
    at_state: dict[str, Any] = {"robust": None, "frozen": []}
    if resume is not None and run.epochs_done:
        at_state.update(state.get("fast_at") or {})
    last_good = [copy.deepcopy(m.state_dict()) for m in models] if cfg.method == "fast-at" else []

    if callbacks.on_start and leader:
        callbacks.on_start(run, first_epoch)
    eval_bs = max(cfg.batch_size, 256)
    try:
        for epoch in range(first_epoch, cfg.epochs + 1):
            stats = train_epoch(models, opt, sched, train_set, cfg, epoch, device,
                                callbacks.on_batch if leader else None, at_state["frozen"], shard, teacher)
            if not leader:
                barrier()  # rank 0 evaluates and writes the epoch meanwhile
                continue
            extras: dict[str, Any] = {}
            if cfg.method == "fast-at":
                extras = _fast_at_check(models, train_set, cfg, device, at_state, last_good)
            t0 = time.perf_counter()
            accs = clean_accuracy(models, test_set, device, eval_bs)
            val = validation_loss(models, val_set, cfg, device, eval_bs)
            seconds += stats.seconds + (time.perf_counter() - t0)
            blobs: dict[str, bytes] = {}
            if cfg.select == "last" or val < best_val or best_epoch is None:
                best_val, best_epoch = val, epoch
                for i, model in enumerate(models):
                    meta = {"run": run.id, "epoch": epoch, "index": i}
                    blobs[model_file(run_dir, i).name] = encode_tensors(model.state_dict(), meta)
            state_meta = {
                "epoch": epoch,
                "scheduler": _jsonable(sched.state_dict()),
                "param_groups": [_jsonable({k: v for k, v in g.items() if k != "params"}) for g in opt.param_groups],
                "best_val": best_val,
                "best_epoch": best_epoch,
                "seconds": seconds,
                "fast_at": at_state if cfg.method == "fast-at" else None,
            }
            blobs[state_file(epoch)] = encode_tensors(_state_tensors(models, opt), state_meta)
            digests = {name: sha256_bytes(blob) for name, blob in blobs.items()}
            store.add_checkpoints(run.id, epoch, digests, run_dir)  # recorded before the files change
            for name, blob in blobs.items():
                atomic_write(run_dir / name, blob)
            update_manifest(run_dir, digests)
            metric = EpochMetric(
                run_id=run.id, epoch=epoch, loss_total=stats.losses["total"], loss_class=stats.losses["class"],
                loss_angle=stats.losses["angle"], loss_transfer1=stats.losses["transfer1"],
                loss_transfer2=stats.losses["transfer2"], val_loss=val, clean_acc=accs, lr=stats.lr,
                seconds=stats.seconds, terms={**stats.losses, **extras},
            )
            store.update_run(run.id, metric, epochs_done=epoch, seconds=seconds, best_epoch=best_epoch)
            if callbacks.on_epoch:
                callbacks.on_epoch(metric)
            if shard is not None:
                barrier()
            if cfg.method == "fast-at" and len(at_state["frozen"]) == len(models):
                store.update_run(run.id, message=f"fast-AT: every model stopped early by epoch {epoch}")
                break
    except KeyboardInterrupt:
        if leader:
            store.update_run(run.id, status="interrupted", message="stopped by the user (Ctrl-C)")
        raise
    except Exception as exc:
        message = str(exc).splitlines()[0][:500] if str(exc) else type(exc).__name__
        if leader:
            with contextlib.suppress(DeflectError):  # the database may be what failed: keep the first error
                store.update_run(run.id, status="failed", message=message)
        if isinstance(exc, DeflectError) and message.startswith("cannot write"):  # a lock, a full disk: passing
            raise DeflectError(f"{message}; 'deflect train --resume {run.id}' continues from the last saved epoch"
                               ) from exc
        raise
    if not leader:
        return run.id
    best = next((m for m in store.epochs(run.id) if m.epoch == best_epoch), None)
    store.update_run(
        run.id, status="finished", clean_acc=best.clean_acc if best else None, best_epoch=best_epoch, seconds=seconds
    )
    return run.id
