"""`deflect grow`: a finished set plus K new models, as a new run with its lineage.

The grown set is a new run, never a change to its parent: its folder holds copies of the parent's
model files (read through the sha-checked loader, written atomically, digests recorded) followed
by the new ones, so `load_set`, `deflect evaluate` and simulations treat it like any set. Lineage
lives in the run's config JSON (no schema change): `parent` (run id), `inherited` (indices that are
the parent's models, same order), `new` (indices trained here) and `grow` (sample size, epochs,
seed and seconds per new model). New models are trained one after another, each against every
model before it (the parent's and the new ones already grown), frozen.

Crash safety: the parent is only read. Each epoch's checkpoint digests are recorded before the
files change and the epoch row commits with the run's counters, as in `train`; an interrupted or
failed grow marks only its own run (a run killed outright is marked interrupted by the store).
A grow cannot be resumed: grow the parent again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Callable
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
from deflect.config import MAX_N, TrainConfig
from deflect.data import ImageTensorDataset, dataset_info
from deflect.errors import DeflectError
from deflect.inference import bf16_supported, inference_copy
from deflect.models import build_model
from deflect.pool import (
    POOL_OF,
    POOL_SEED_STREAM,
    current_pool,
    is_pool,
    pool_base,
    pool_config,
    pool_lock,
    refuse_pool,
)
from deflect.runtime import fast_cpu_math, training_layout
from deflect.sets import mismatch_error
from deflect.store import HELPER_ROLE_KEY, EpochMetric, Run, Store, is_helper_run
from deflect.train.disjoint import BatchEvent, clean_accuracy
from deflect.train.distill import Teacher, require_teacher
from deflect.train.grow import DEFAULT_SAMPLE, GrowEvent, grow_epoch, growth_validation_loss, sample_frozen
from deflect.train.runner import (
    CONFIG_JSON,
    _git_hash,
    _load_splits,
    _optimizer,
    new_run_id,
    register_run,
    resolve_device,
)


@dataclass
class NewModel:
    """One grown model: its index in the set, 1-based position among the K, time and clean accuracy."""

    index: int
    position: int
    seconds: float
    clean_acc: float
    best_epoch: int


@dataclass
class GrowCallbacks:
    """Hooks a front end uses to follow a grow: start, batches, epochs, each finished model."""

    on_start: Callable[[Run, Run], None] | None = None  # (new run, parent run)
    on_batch: Callable[[GrowEvent], None] | None = None
    on_epoch: Callable[[EpochMetric], None] | None = None
    on_model: Callable[[NewModel], None] | None = None


def lineage(store: Store, ref: str) -> list[Run]:
    """The run and its ancestors through `config["parent"]`, newest first."""
    chain = [store.get_run(ref)]
    while (parent := (chain[-1].config or {}).get("parent")) and len(chain) < 1000:
        chain.append(store.get_run(parent))
    return chain


def _load_parent(store: Store, parent: Run, device: torch.device
                 ) -> tuple[list[nn.Module], list[tuple[dict[str, torch.Tensor], dict[str, Any]]]]:
    """The parent's models, frozen, and each file's tensors and metadata (sha-checked first), read
    before the new run exists so that a damaged parent leaves nothing behind."""
    cfg = TrainConfig.from_dict(parent.config)
    info = dataset_info(cfg.dataset)
    digests = store.checkpoint_digest_sets(parent.id)
    models: list[nn.Module] = []
    files: list[tuple[dict[str, torch.Tensor], dict[str, Any]]] = []
    for i in range(parent.n):
        file = model_file(Path(parent.run_dir), i)
        if file.name not in digests:
            raise DeflectError(f"{file} has no recorded checkpoint; run {parent.id} cannot be grown")
        tensors, meta = load_tensors_meta(file, digests[file.name])
        model = build_model(cfg.arch, info, cfg.normalize, cfg.width)
        try:
            model.load_state_dict(tensors)
        except RuntimeError as exc:
            raise mismatch_error(file, cfg, exc) from exc
        models.append(inference_copy(model, device))  # frozen, eval mode, folded: cheaper to differentiate
        files.append((tensors, meta))
    return models, files


def _inherited_blobs(parent: Run, files: list[tuple[dict[str, torch.Tensor], dict[str, Any]]], run_id: str,
                     run_dir: Path) -> dict[str, bytes]:
    """The parent's model files re-encoded for the new run, their metadata naming where they came from."""
    blobs = {}
    for i, (tensors, meta) in enumerate(files):
        inherited = {**meta, "run": run_id, "index": i, "inherited_from": parent.id, "parent_index": i}
        blobs[model_file(run_dir, i).name] = encode_tensors(tensors, inherited)
    return blobs


def _commit_files(store: Store, run_id: str, epoch: int, run_dir: Path, blobs: dict[str, bytes]) -> None:
    """Record digests, then write atomically, then the manifest (the order `train` uses)."""
    digests = {name: sha256_bytes(blob) for name, blob in blobs.items()}
    store.add_checkpoints(run_id, epoch, digests, run_dir)
    for name, blob in blobs.items():
        atomic_write(run_dir / name, blob)
    update_manifest(run_dir, digests)


def _check_options(add: int, sample: int | None, epochs: int | None, pair_scale: float | None, teacher: str | None,
                   distill_alpha: float | None, distill_temperature: float | None) -> None:
    if add < 1:
        raise DeflectError(f"--add must be at least 1, got {add}")
    if sample is not None and sample < 1:
        raise DeflectError(f"--sample must be at least 1, got {sample}")
    if epochs is not None and epochs < 1:
        raise DeflectError(f"--epochs must be at least 1, got {epochs}")
    if pair_scale is not None and not (math.isfinite(pair_scale) and pair_scale >= 0):
        raise DeflectError(f"--pair-scale must be a finite number >= 0, got {pair_scale}")
    require_teacher(teacher, distill_alpha, distill_temperature)


def _growable(store: Store, parent_ref: str, add: int, pool: bool) -> Run:
    """The run `parent_ref` names, refused unless it is a set of the user's that `add` disjoint models can join."""
    parent = store.get_run(parent_ref)
    if is_helper_run(parent) and not is_pool(parent):  # a grown child of it would be a set nobody trained
        raise DeflectError(f"run {parent.id} is deflect's own helper run ({parent.config[HELPER_ROLE_KEY]}), "
                           "not a set of yours; grow one of your sets")
    if parent.method != "disjoint":  # without pair terms a new model would be an independent one, silently
        raise DeflectError(f"run {parent.id} was trained with --method {parent.method}; deflect grow adds disjoint "
                           "models (pair terms against the frozen ones), so grow a disjoint set")
    if parent.n + add > MAX_N:
        raise DeflectError(f"--add {add} would make a set of {parent.n + add} models; a set holds at most {MAX_N}")
    if not pool and is_pool(parent):  # its models past the set's own are unreleased: never a plain set's
        refuse_pool(parent, "grow that set, or add to its pool with --pool")
    return parent


def _recipe(transfer_batch: int | None, transfer_steps: int | None, transfer_refine: float | None,
            teacher: str | None, distill_alpha: float | None, distill_temperature: float | None) -> dict[str, Any]:
    """The config fields the new models take from the caller; the rest are the parent's."""
    given = {"transfer_batch": transfer_batch, "transfer_steps": transfer_steps, "transfer_refine": transfer_refine}
    recipe = {name: value for name, value in given.items() if value is not None}
    unset = TrainConfig()  # distillation is the grow's own choice, never the parent's
    recipe.update(teacher=teacher, distill_alpha=unset.distill_alpha if distill_alpha is None else distill_alpha,
                  distill_temperature=unset.distill_temperature if distill_temperature is None else distill_temperature)
    return recipe


def _grown_config(parent: Run, add: int, epochs: int | None, device: str, recipe: dict[str, Any]) -> TrainConfig:
    """The grown set's config: the parent's recipe with `recipe`'s fields, checked."""
    if parent.status != "finished":
        raise DeflectError(f"run {parent.id} is {parent.status}; only a finished set can be grown")
    base_cfg = TrainConfig.from_dict(parent.config)
    cfg = dataclasses.replace(base_cfg, n=parent.n + add, epochs=epochs or base_cfg.epochs, device=device, **recipe)
    cfg.validate()
    return cfg


def check_grow(
    store: Store, parent_ref: str, add: int, *, pool: bool = False, sample: int | None = None,
    epochs: int | None = None, device: str = "auto", transfer_batch: int | None = None,
    transfer_steps: int | None = None, transfer_refine: float | None = None, pair_scale: float | None = None,
    teacher: str | None = None, distill_alpha: float | None = None, distill_temperature: float | None = None,
) -> None:
    """`grow`'s checks of its options, the parent and the recipe, the device and the teacher, without
    training: `deflect grow --refill` runs them before it starts its background process, so a bad
    option is an error there, not a line in a log. (The parent's files are read, and checked, by the grow.)"""
    _check_options(add, sample, epochs, pair_scale, teacher, distill_alpha, distill_temperature)
    parent = _growable(store, parent_ref, add, pool)
    if pool:
        base = pool_base(store, parent)
        parent = current_pool(store, base.id) or base
    recipe = _recipe(transfer_batch, transfer_steps, transfer_refine, teacher, distill_alpha, distill_temperature)
    cfg = _grown_config(parent, add, epochs, device, recipe)
    resolve_device(device)
    Teacher.for_config(store, cfg, torch.device("cpu"))


def grow(
    store: Store,
    parent_ref: str,
    add: int,
    *,
    sample: int | None = None,
    epochs: int | None = None,
    seed: int | None = None,
    device: str = "auto",
    pool: bool = False,
    transfer_batch: int | None = None,
    pair_scale: float | None = None,
    callbacks: GrowCallbacks | None = None,
    transfer_steps: int | None = None,
    transfer_refine: float | None = None,
    teacher: str | None = None,
    distill_alpha: float | None = None,
    distill_temperature: float | None = None,
) -> str:
    """Train `add` new models against the frozen models of `parent_ref`; return the new run's id.

    The new models distil from a stored set only when `teacher` names one (`deflect.train.distill`,
    α and T default to 0.5 and 4 whatever the parent used): not even a parent's own teacher is
    inherited, because on the validation split it left a grown model 5.3 points less disjoint from
    its parents for 1.3 points of clean accuracy (results/fashion-mnist-grow-recipe.md).

    `pair_scale` multiplies the set's angular and transfer weights in the new models' loss (1: the
    weights as they are). The run's config keeps the set's weights and the grow records the scale,
    so growing a grown set (a pool refill) never compounds it.

    With `pool`, the new models become the pool of the set (see `deflect.pool`): the run grown is
    the set's newest pool run (or the set itself), and the new run is marked as its pool.
    """
    _check_options(add, sample, epochs, pair_scale, teacher, distill_alpha, distill_temperature)
    parent = _growable(store, parent_ref, add, pool)
    lock: contextlib.AbstractContextManager = contextlib.nullcontext()
    extra: dict[str, Any] = {}
    if pool:
        base = pool_base(store, parent)
        lock, extra = pool_lock(store, base.id), pool_config(base.id)
    with lock:
        if pool:
            parent = current_pool(store, base.id) or base
        recipe = _recipe(transfer_batch, transfer_steps, transfer_refine, teacher, distill_alpha, distill_temperature)
        return _grow(store, parent, add, sample, epochs, seed, device, extra, callbacks or GrowCallbacks(),
                     recipe, 1.0 if pair_scale is None else pair_scale)


@fast_cpu_math()
def _grow(store: Store, parent: Run, add: int, sample: int | None, epochs: int | None, seed: int | None,
          device_name: str, extra: dict[str, Any], cb: GrowCallbacks, recipe: dict[str, Any],
          pair_scale: float = 1.0) -> str:
    """`recipe`: the config fields the new models take from the caller instead of the parent."""
    cfg = _grown_config(parent, add, epochs, device_name, recipe)
    n = parent.n
    seed = cfg.seed if seed is None else seed
    sample = DEFAULT_SAMPLE if sample is None else sample
    device = resolve_device(device_name)
    if cfg.bf16 and not bf16_supported(device):  # a set trained with --bf16 on a GPU, grown on a plain CPU:
        cfg = dataclasses.replace(cfg, bf16=False)  # emulated bf16 is slower than float32; the config says so
    train_set, val_set, test_set = _load_splits(cfg)
    frozen, files = _load_parent(store, parent, device)
    teacher, cfg = Teacher.for_config(store, cfg, device)

    run_id = new_run_id(cfg)
    run_dir = store.runs_root / run_id
    stream = POOL_SEED_STREAM if extra.get(POOL_OF) else 0  # a pool's models are never a plain grow's
    grow_info: dict[str, Any] = {"parent_n": n, "sample": sample, "epochs": cfg.epochs, "seed": seed,
                                 "seed_stream": stream,
                                 "transfer_batch": cfg.transfer_batch, "transfer_steps": cfg.transfer_steps,
                                 "transfer_refine": cfg.transfer_refine,
                                 "pair_scale": pair_scale, "seconds": []}
    config = {**json.loads(cfg.to_json()), "parent": parent.id, "inherited": list(range(n)),
              "new": list(range(n, n + add)), "grow": grow_info, **extra}
    run = register_run(store, Run(
        id=run_id, method=cfg.method, dataset=cfg.dataset, arch=cfg.arch, preset=cfg.preset, n=cfg.n,
        config=config, device=str(device), git_hash=_git_hash(), run_dir=str(run_dir.resolve()),
        epochs_total=add * cfg.epochs, message=f"grown from {parent.id} by {add} model(s)",
    ))
    ctx = _Context(store, run_id, run_dir, parent.id, cfg, sample, device, train_set, val_set, test_set, add, cb,
                   pair_scale, teacher)
    try:
        if cb.on_start:
            cb.on_start(run, parent)
        _commit_files(store, run_id, 0, run_dir, _inherited_blobs(parent, files, run_id, run_dir))
        clean = list(parent.clean_acc or [])
        if len(clean) != n:
            clean = clean_accuracy(frozen, test_set, device, ctx.eval_bs)
        for k in range(add):
            done = _train_new_model(ctx, frozen, n + k, k + 1, stream + seed * 1000 + n + k)
            clean.append(done.clean_acc)
            grow_info["seconds"].append(done.seconds)
            config = {**config, "grow": grow_info}
            store.update_run(run_id, config=config)
            if cb.on_model:
                cb.on_model(done)
        write_json(run_dir / CONFIG_JSON, config)
    except KeyboardInterrupt:
        store.update_run(run_id, status="interrupted", message="grow stopped by the user (Ctrl-C)")
        raise
    except Exception as exc:
        message = str(exc).splitlines()[0][:500] if str(exc) else type(exc).__name__
        store.update_run(run_id, status="failed", message=message)
        raise
    store.update_run(run_id, status="finished", clean_acc=clean, seconds=ctx.seconds)
    return run_id


@dataclass
class _Context:
    """What every new model of one grow shares, and the run's running epoch count and seconds."""

    store: Store
    run_id: str
    run_dir: Path
    parent_id: str
    cfg: TrainConfig
    sample: int
    device: torch.device
    train_set: ImageTensorDataset
    val_set: ImageTensorDataset
    test_set: ImageTensorDataset
    add: int
    cb: GrowCallbacks
    pair_scale: float = 1.0
    teacher: Teacher | None = None  # the set named by `deflect grow --teacher`
    done: int = 0  # epochs over all new models: the run's epoch rows are numbered 1..K·E
    seconds: float = 0.0

    @property
    def eval_bs(self) -> int:
        return max(self.cfg.batch_size, 256)


def _train_new_model(ctx: _Context, frozen: list[nn.Module], index: int, position: int, seed: int) -> NewModel:
    """Train model `index` against `frozen`, keep its best epoch (files and rows as `train` writes them),
    and append it, frozen, to `frozen` for the models after it."""
    cfg, device = ctx.cfg, ctx.device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new = build_model(cfg.arch, dataset_info(cfg.dataset), cfg.normalize, cfg.width).to(device)
    (new,) = training_layout([new], device)
    opt, sched = _optimizer([new], cfg, cfg.epochs * (len(ctx.train_set) // cfg.batch_size))
    pick = sample_frozen(len(frozen), ctx.sample, torch.Generator().manual_seed(seed))
    val_frozen = [frozen[i] for i in pick]  # fixed per model: its epochs compare on the same pairs
    best_val, best_epoch, best_acc, best_state = math.inf, 0, 0.0, None
    start = time.perf_counter()

    def on_batch(event: BatchEvent) -> None:
        if ctx.cb.on_batch:
            ctx.cb.on_batch(GrowEvent(**dataclasses.asdict(event), model=position, models=ctx.add))

    for epoch in range(1, cfg.epochs + 1):
        stats = grow_epoch(new, frozen, opt, sched, ctx.train_set, cfg, epoch, seed, ctx.sample, device, on_batch,
                           ctx.pair_scale, ctx.teacher)
        t0 = time.perf_counter()
        acc = clean_accuracy([new], ctx.test_set, device, ctx.eval_bs)[0]
        val = growth_validation_loss(new, val_frozen, ctx.val_set, cfg, device, ctx.eval_bs, ctx.pair_scale)
        ctx.seconds += stats.seconds + time.perf_counter() - t0
        ctx.done += 1
        if cfg.select == "last" or val < best_val or best_state is None:
            best_val, best_epoch, best_acc = val, epoch, acc
            best_state = {key: v.detach().clone() for key, v in new.state_dict().items()}
            meta = {"run": ctx.run_id, "epoch": epoch, "index": index, "grown_from": ctx.parent_id}
            _commit_files(ctx.store, ctx.run_id, ctx.done, ctx.run_dir,
                          {model_file(ctx.run_dir, index).name: encode_tensors(best_state, meta)})
        metric = EpochMetric(
            run_id=ctx.run_id, epoch=ctx.done, loss_total=stats.losses["total"], loss_class=stats.losses["class"],
            loss_angle=stats.losses["angle"], loss_transfer1=stats.losses["transfer1"],
            loss_transfer2=stats.losses["transfer2"], val_loss=val, clean_acc=[acc], lr=stats.lr,
            seconds=stats.seconds, terms=dict(stats.losses),
        )
        ctx.store.update_run(ctx.run_id, metric, epochs_done=ctx.done, seconds=ctx.seconds)
        if ctx.cb.on_epoch:
            ctx.cb.on_epoch(metric)
    assert best_state is not None
    new.load_state_dict(best_state)
    frozen.append(inference_copy(new, device))
    return NewModel(index, position, time.perf_counter() - start, best_acc, best_epoch)
