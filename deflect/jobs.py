"""A reproduction's sets trained and evaluated side by side in worker processes (`reproduce --jobs N`).

Why processes: the small CNN's training step gains little from a second thread (`deflect bench`
on the 2-core CPU, two runs of the same code: the disjoint reference step ran 1.25 steps/s on 2
threads and 0.91 on one), so two sets trained at once, one thread each, get through about 1.45x the
work of one set on both threads. Each worker opens the
database itself (WAL mode, busy timeout, short write transactions, see `deflect.store`) and sends
its progress over a queue, so the parent process draws every bar and prints every message. A set
grown from another (`SetSpec.grow_from`) waits until that one is finished. A failing set, a Ctrl-C
or the parent's death stops every set under way at its next batch, stored as interrupted.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import signal
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, wait
from typing import TYPE_CHECKING, Any

import torch

from deflect.errors import DeflectError
from deflect.store import Run, Store
from deflect.train import Callbacks

if TYPE_CHECKING:
    from deflect.reproduce import Plan, SetSpec

_events: Any = None  # the worker's end of the parent's queue (set by _init)
_parent_pid = 0  # the reproduction that started this worker


def worker_threads(jobs: int) -> int:
    """Torch threads per worker: this process's threads shared out, at least one each."""
    return max(1, torch.get_num_threads() // jobs)


def _init(threads: int, events: Any) -> None:
    global _events, _parent_pid
    torch.set_num_threads(threads)
    _events, _parent_pid = events, os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # an idle worker outlives Ctrl-C; a busy one stops (_one_set)


def _one_set(db: str, plan: Plan, spec: SetSpec, device: str, data_dir: str | None, parent_id: str | None) -> str:
    """Worker: train (or resume, or reuse) one set and run its evaluations; returns its run id."""
    from deflect.reproduce import evaluate_set, train_set

    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C: the run is stored as interrupted
    try:
        store = Store(db)
        parent = store.get_run(parent_id) if parent_id else None

        def send(*event: Any) -> None:
            if os.getppid() != _parent_pid:  # the reproduction was killed: stop at the next batch or step
                raise KeyboardInterrupt("the reproduction that started this worker has ended")
            _events.put(event)

        def say(text: str) -> None:
            send("say", spec.label, text)

        callbacks = Callbacks(on_start=lambda run, first: send("start", spec.label, run.id, first),
                              on_batch=lambda event: send("batch", spec.label, event))
        run = train_set(store, plan, spec, device, data_dir, callbacks, say, parent)
        evaluate_set(store, plan, spec, run, device, say)
        return run.id
    except KeyboardInterrupt:
        if os.getppid() != _parent_pid:  # the run is stored as interrupted; nobody is left to report to,
            os._exit(130)  # and the pool's queues died with the parent, so waiting on them would hang
        raise
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _drain(events: Any, store: Store, callbacks_for: Callable[[str], Callbacks],
           say: Callable[[str], None] | None, wait: float) -> None:
    """Hand the workers' queued events to the front end's callbacks (waiting up to `wait` s for the first)."""
    while True:
        try:
            kind, label, *rest = events.get(timeout=wait)
        except queue.Empty:
            return
        wait = 0.0
        cbs = callbacks_for(label)
        if kind == "say" and say is not None:
            say(rest[0])
        elif kind == "start" and cbs.on_start is not None:
            cbs.on_start(store.get_run(rest[0]), rest[1])
        elif kind == "batch" and cbs.on_batch is not None:
            cbs.on_batch(rest[0])


def _interrupt(pool: ProcessPoolExecutor) -> None:
    """Stop the sets still running after a failure or a Ctrl-C: each worker gets a Ctrl-C, so its run
    is stored as interrupted (and resumes next time) instead of being waited for, possibly for hours.
    Idle workers ignore it (`_init`)."""
    for process in list((pool._processes or {}).values()):  # noqa: SLF001 - no public handle on the workers
        if process.is_alive() and process.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGINT)


def check_jobs(jobs: int) -> None:
    if jobs < 1:
        raise DeflectError(f"--jobs must be at least 1, got {jobs}")


def run_sets(store: Store, plan: Plan, device: str, data_dir: str | None, jobs: int,
             callbacks_for: Callable[[str], Callbacks], say: Callable[[str], None] | None = None) -> dict[str, Run]:
    """Every set of `plan`, finished and evaluated, using `jobs` worker processes; keyed by label."""
    check_jobs(jobs)
    ctx = mp.get_context("spawn")  # fork would copy the parent's torch threads and open database handles
    events = ctx.Queue()
    runs: dict[str, Run] = {}
    pending = list(plan.sets)
    running: dict[Future[str], SetSpec] = {}
    pool = ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init, initargs=(worker_threads(jobs), events))
    try:
        while pending or running:
            for spec in [s for s in pending if s.grow_from is None or s.grow_from in runs]:
                if len(running) >= jobs:
                    break
                parent = runs.get(spec.grow_from) if spec.grow_from else None
                future = pool.submit(_one_set, str(store.path), plan, spec, device, data_dir,
                                     parent.id if parent else None)
                running[future] = spec
                pending.remove(spec)
            if pending and not running:
                spec = pending[0]
                raise DeflectError(f"{spec.label}: the plan has no set {spec.grow_from!r} before it to grow")
            _drain(events, store, callbacks_for, say, wait=0.2)
            for future in [f for f in running if f.done()]:
                spec = running.pop(future)
                runs[spec.label] = store.get_run(future.result())
        _drain(events, store, callbacks_for, say, wait=0.0)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):  # a terminal's Ctrl-C reaches busy workers too: let them stop
            wait(running, timeout=2.0)
        _interrupt(pool)
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return {spec.label: runs[spec.label] for spec in plan.sets}
