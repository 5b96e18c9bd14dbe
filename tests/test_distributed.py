"""Data-parallel training (torchrun, gloo on CPU) trains the same set as one process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import deflect
from deflect.config import make_config
from deflect.errors import DeflectError
from deflect.runtime import fast_cpu_math
from deflect.store import Store
from deflect.train import train
from deflect.train.distributed import Shard, all_reduce_grads, check_config, global_batchnorm, sharded
from deflect.train.losses import ActiveTerms, disjoint_loss
from deflect.train.runner import build_set

ACTIVE = ActiveTerms(angle=True, transfer1=True, transfer2=True)
SAMPLE = [0, 2]


@pytest.fixture(autouse=True)
def _as_training_runs() -> Iterator[None]:
    """Denormals flushed, as training does: flushing moves tiny input gradients."""
    with fast_cpu_math():
        yield


def _setup() -> tuple:
    """Three digits models fitted a little to one batch, so every transfer term is positive."""
    cfg = make_config(n=3, dataset="digits", eps1=3000.0, eps2=0.5)
    models = build_set(cfg)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(32, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (32,), generator=gen)
    opt = torch.optim.SGD([p for m in models for p in m.parameters()], lr=0.1)
    for _ in range(10):
        opt.zero_grad()
        sum(F.cross_entropy(m(x), y) for m in models).backward()
        opt.step()
    for m in models:
        m.zero_grad(set_to_none=True)
        m.train()
    return cfg, models, x, y


def _grads(models: list) -> np.ndarray:
    return torch.cat([p.grad.reshape(-1) for m in models for p in m.parameters()]).numpy().copy()


def _worker(rank: int, world: int, path: str, queue: mp.Queue) -> None:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # as training does (its own process: nothing to restore)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    cfg, models, x, y = _setup()
    global_batchnorm(models)
    shard = Shard(rank, world)
    with sharded(len(y)):
        parts = disjoint_loss(models, shard.split(x), shard.split(y), cfg, ACTIVE, SAMPLE)
    parts.total.backward()
    all_reduce_grads([p for m in models for p in m.parameters()])
    if rank == 0:
        queue.put((parts.as_floats(), _grads(models), [m.features[1].running_var.numpy().copy() for m in models]))
    dist.barrier()
    dist.destroy_process_group()


def test_sharded_step_equals_one_process_on_the_global_batch(tmp_path: Path) -> None:
    cfg, models, x, y = _setup()
    ref = disjoint_loss(models, x, y, cfg, ACTIVE, SAMPLE)
    ref.total.backward()
    expected = ref.as_floats()
    assert min(expected["transfer1"], expected["transfer2"], expected["angle"]) > 0  # every term is live
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, 2, str(tmp_path / "rendezvous"), queue)) for r in range(2)]
    for p in procs:
        p.start()
    values, grads, running_var = queue.get(timeout=300)
    for p in procs:
        p.join(timeout=60)
    for key, value in expected.items():
        assert values[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    np.testing.assert_allclose(grads, _grads(models), atol=1e-5)
    for got, m in zip(running_var, models, strict=True):
        np.testing.assert_allclose(got, m.features[1].running_var.numpy(), rtol=1e-5, atol=1e-6)


def test_torchrun_run_matches_a_single_process_run(tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    args = ["-n", "2", "--dataset", "digits", "--epochs", "3", "--limit", "384"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "deflect", "train", *args,
         "--db", str(tmp_path / "ddp.db"), "--json"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    ddp_store = Store(tmp_path / "ddp.db")
    runs = ddp_store.list_runs()
    assert len(runs) == 1 and runs[0].status == "finished" and runs[0].device == "cpu x2"
    # The single-process reference at one and at two threads: the clamped transfer terms are small and
    # amplify float summation order over epochs, so the reference's own spread across thread counts
    # is part of the tolerance (it moves loss_transfer2 by a few per cent with some torch builds).
    threads = torch.get_num_threads()
    refs: dict[int, tuple[Store, str]] = {}
    for count in (1, 2):
        torch.set_num_threads(count)
        try:
            ref_store = Store(tmp_path / f"one-{count}.db")
            refs[count] = ref_store, train(make_config(n=2, dataset="digits", epochs=3, train_limit=384), ref_store)
        finally:
            torch.set_num_threads(threads)
    (single_store, single), (two_store, two) = refs[1], refs[2]
    ours, theirs, other = ddp_store.epochs(runs[0].id), single_store.epochs(single), two_store.epochs(two)
    assert len(ours) == len(theirs) == len(other) == 3
    assert theirs[-1].loss_transfer2 > 0  # the transfer terms ran in the compared epochs
    for a, b, c in zip(ours, theirs, other, strict=True):
        for key in ("loss_total", "loss_class", "loss_angle", "loss_transfer1", "loss_transfer2", "val_loss"):
            spread = 2 * abs(getattr(b, key) - getattr(c, key))
            assert getattr(a, key) == pytest.approx(getattr(b, key), rel=2e-3, abs=max(1e-5, spread)), (a.epoch, key)
    for ma, mb in zip(deflect.load_set(runs[0].id, ddp_store), deflect.load_set(single, single_store), strict=True):
        for (name, pa), pb in zip(ma.state_dict().items(), mb.state_dict().values(), strict=True):
            if pa.is_floating_point():
                assert torch.allclose(pa, pb, atol=2e-2, rtol=2e-2), name


def test_data_parallel_training_refuses_what_it_does_not_support() -> None:
    check_config("disjoint", "reference", None)
    check_config("independent", "reference", None)
    with pytest.raises(DeflectError, match="disjoint or independent"):
        check_config("fast-at", "reference", None)
    with pytest.raises(DeflectError, match="reference step"):
        check_config("disjoint", "fast", None)
    with pytest.raises(DeflectError, match="reference step"):
        check_config("disjoint", "reference", 32)


def test_shard_split_covers_the_batch() -> None:
    x = torch.arange(7)
    parts = [Shard(r, 3).split(x) for r in range(3)]
    assert torch.equal(torch.cat(parts), x) and [len(p) for p in parts] == [3, 2, 2]
    assert sys.version_info >= (3, 10)


def test_train_help_gives_torchrun_an_unambiguous_n() -> None:
    """torchrun takes `--n` for a prefix of its own options and refuses it; the help's example must say `-n`."""
    from deflect.cli import train

    example = next(line for line in (train.__doc__ or "").splitlines() if "torchrun" in line)
    assert " -m deflect train -n " in example and " --n " not in example
