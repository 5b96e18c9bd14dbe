"""A run's pool of trained-but-unreleased ("zero-day") models, and its background refill.

A pool is stored as an ordinary grown run: `deflect grow RUN --add K --pool` writes a new run that
holds RUN's n models followed by the K pool models, with `config["pool_of"] = RUN` and
`config["role"] = "pool"` (a helper role, so a pool is never what 'latest' means). Growing the
pool again grows that pool run, so the newest finished pool run of RUN always holds the whole
pool, every file sha-checked and loadable by `load_set`. Pool models are the indices n, n+1, ...
of that run; a staged-release simulation of RUN deploys them, in that order, once RUN's own
unreleased models are used up. Pool models draw their seeds from a stream of their own
(`POOL_SEED_STREAM`): a plain `deflect grow RUN` with the same seed would otherwise train the very
models the pool holds, and a replacement that was already released would not be a fresh one.

deflect keeps no record of real releases, so "keeping the pool at N" means topping it up:
`deflect grow RUN --refill N` grows the missing N − size models in a detached background process
(a second `deflect grow --pool`) and returns at once; run it again whenever models were taken.
Only one process grows a given pool at a time (an advisory lock beside the run folders). A refill
takes the lock before it starts the background process and hands it over (the child inherits the
locked descriptor), so a second refill started at once is refused instead of racing the first to it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from deflect.errors import DeflectError
from deflect.store import HELPER_ROLE_KEY, Run, Store

POOL_ROLE = "pool"
POOL_OF = "pool_of"
LOCK_FD_ENV = "DEFLECT_POOL_LOCK_FD"  # a refill's child: the descriptor of the pool lock it inherited
# added to a pool model's seed, so that no plain grow's model is a pool model: 2^31, because torch's CPU
# generator keeps only a seed's low 32 bits, which still differ by 2^31 (as the epoch generators' seeds
# do, 100003 being odd) for the same --seed
POOL_SEED_STREAM = 1 << 31


def is_pool(run: Run) -> bool:
    return bool((run.config or {}).get(POOL_OF))


def refuse_pool(run: Run, instead: str) -> None:
    """A pool run's models past its set's own are unreleased: refused wherever a set is used as released.
    `instead` says what to do, `{base}` standing for the set's id."""
    if is_pool(run):
        base = run.config[POOL_OF]
        raise DeflectError(f"run {run.id} is the pool of run {base}: its models past the set's own are unreleased; "
                           f"{instead.format(base=base)}")


def pool_base(store: Store, run: Run) -> Run:
    """The set a pool belongs to (a pool run names it), or the run itself."""
    return store.get_run(run.config[POOL_OF]) if is_pool(run) else run


def current_pool(store: Store, base_id: str) -> Run | None:
    """The newest finished pool run of `base_id`: it holds the base's models and the whole pool."""
    runs = [r for r in store.list_runs() if r.status == "finished" and (r.config or {}).get(POOL_OF) == base_id]
    return runs[-1] if runs else None


def pool_size(store: Store, base: Run) -> int:
    pool = current_pool(store, base.id)
    return pool.n - base.n if pool is not None else 0


def pool_config(base_id: str) -> dict[str, str]:
    """The config keys that make a grown run the pool of `base_id`."""
    return {POOL_OF: base_id, HELPER_ROLE_KEY: POOL_ROLE}


def _lock_path(store: Store, base_id: str) -> Path:
    store.runs_root.mkdir(parents=True, exist_ok=True)
    return store.runs_root / f".pool-{base_id}.lock"


def _take(fh: IO[str], base_id: str) -> None:
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise DeflectError(f"the pool of run {base_id} is being grown by another process") from None


def _inherited_lock(path: Path) -> int | None:
    """The descriptor of `path`'s lock handed over by `spawn_refill`, if this process holds one."""
    raw = os.environ.get(LOCK_FD_ENV)
    if not raw or not raw.isdigit():
        return None
    try:
        held, here = os.fstat(int(raw)), os.stat(path)
    except OSError:
        return None
    return int(raw) if (held.st_dev, held.st_ino) == (here.st_dev, here.st_ino) else None


@contextlib.contextmanager
def pool_lock(store: Store, base_id: str) -> Iterator[None]:
    """Hold the pool of `base_id` for growing; a second grower fails at once instead of racing."""
    path = _lock_path(store, base_id)
    fd = _inherited_lock(path)
    with open(fd, "a", closefd=True) if fd is not None else open(path, "a") as fh:
        if fd is None:
            _take(fh, base_id)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@dataclass
class Refill:
    """What `spawn_refill` did: the pool size found, models being added, and the background process."""

    base: str
    size: int
    target: int
    add: int
    pid: int | None = None
    log: Path | None = None


def spawn_refill(store: Store, base: Run, target: int, extra_args: list[str] | None = None,
                 check: Callable[[int], None] | None = None) -> Refill:
    """Grow the pool of `base` to `target` models in a detached `deflect grow --pool` process.

    `check(add)` runs first with the number of models to add and raises for a grow that would fail
    (`deflect.train.grow_run.check_grow`): the background process could only log the error."""
    if target < 1:
        raise DeflectError(f"--refill must be at least 1, got {target}")
    size = pool_size(store, base)
    need = target - size
    if need <= 0:
        return Refill(base.id, size, target, 0)
    if check is not None:
        check(need)
    log = store.runs_root / f"{base.id}.refill.log"
    cmd = [sys.executable, "-m", "deflect", "grow", base.id, "--pool", "--add", str(need),
           "--db", str(store.path.resolve()), *(extra_args or [])]
    root = str(Path(__file__).resolve().parent.parent)  # this deflect, installed or not
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    with open(_lock_path(store, base.id), "a") as lock:  # held from here on by the child alone
        try:
            _take(lock, base.id)
        except DeflectError:
            raise DeflectError(f"the pool of run {base.id} is already being grown; see {log}") from None
        env[LOCK_FD_ENV] = str(lock.fileno())
        with open(log, "ab") as fh:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fh, stderr=fh, start_new_session=True,
                                    env=env, pass_fds=(lock.fileno(),))
    return Refill(base.id, size, target, need, proc.pid, log)
