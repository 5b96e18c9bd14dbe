"""Random deployment of a model set to clients, and the staged ("zero-day") release policy.

Each client id is mapped to one released model by HMAC-SHA256 under a secret deployment key:
the defender can reproduce every assignment, an attacker without the key cannot predict which
model a victim holds (paper §3). The key lives in a file only its owner can read, created on first
use; it is never logged or stored in the database.

Assignment is by *slot*: ``slot = HMAC(key, client_id) mod m`` for the m released models, and
each slot holds one model. Retiring a model puts a fresh, never-released one in its slot, so
exactly the retired model's clients move and every other client keeps its model.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

from deflect.errors import DeflectError

KEY_FILE = "deflect.key"
KEY_BYTES = 32


def client_ids(count: int) -> list[str]:
    """The simulated clients: client-0000, client-0001, ..."""
    return [f"client-{i:04d}" for i in range(count)]


def default_key_path(db_path: str | os.PathLike) -> Path:
    """The key file sits beside the database it deploys runs from."""
    return Path(db_path).resolve().parent / KEY_FILE


def load_or_create_key(path: str | os.PathLike) -> bytes:
    """Read the deployment key, creating it (mode 0600) on first use.

    A key file that group or others can read or write is refused: anyone who can read it can
    predict every client's model, which is the whole defence.
    """
    path = Path(path)
    if not path.exists():
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # created by a concurrent call: read theirs
        except OSError as exc:
            raise DeflectError(f"cannot create key file {path}: {exc.strerror}") from exc
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(KEY_BYTES) + "\n")
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise DeflectError(f"cannot read key file {path}: {exc.strerror}") from exc
    if not stat.S_ISREG(mode):
        raise DeflectError(f"key file {path} is not a regular file")
    if mode & 0o077:
        raise DeflectError(
            f"key file {path} is accessible by group or others (mode {stat.S_IMODE(mode):04o}); "
            f"run 'chmod 600 {path}'"
        )
    try:
        key = bytes.fromhex(path.read_text().strip())
    except ValueError:
        key = b""
    if len(key) < 16:
        raise DeflectError(f"key file {path} does not hold a deflect key (at least 32 hex characters)")
    return key


def slot_of(key: bytes, client_id: str, slots: int) -> int:
    """Keyed, uniform choice of one of `slots` for a client (HMAC-SHA256, 256-bit mod: no visible bias)."""
    if slots < 1:
        raise DeflectError(f"need at least one released model, got {slots}")
    digest = hmac.new(key, client_id.encode(), hashlib.sha256).digest()
    return int.from_bytes(digest, "big") % slots


@dataclass(frozen=True)
class ReleasePolicy:
    """Staged release: `initial` of the n models deployed at first (None: all); a deployed model
    whose observed successful attacks since its release reach `threshold` is retired and replaced
    by a fresh one (None: never) when the defender next reviews (`Deployment.rotate`; the simulation
    reviews after each round)."""

    initial: int | None = None
    threshold: int | None = None
    pool: bool = True  # once the set's own fresh models are used up, release its pool (`deflect grow --pool`)


@dataclass(frozen=True)
class Rotation:
    """One retirement: `retired` left slot `slot` after `hits` observed successes; `released` took it."""

    slot: int
    retired: int
    released: int
    hits: int


@dataclass
class Deployment:
    """Which model each client holds now, and the release/rotation state behind it."""

    key: bytes = field(repr=False)
    n_models: int
    policy: ReleasePolicy = field(default_factory=ReleasePolicy)
    pool: int = 0  # the last `pool` models are a pool: released in index order after the set's own
    released: list[int] = field(init=False)  # slot -> model
    unreleased: list[int] = field(init=False)  # fresh models, next first
    retired: list[int] = field(init=False, default_factory=list)
    hits: list[int] = field(init=False)  # observed successful attacks per model, all time
    since_release: list[int] = field(init=False)  # ... since the model was (last) released
    _slots: dict[str, int] = field(init=False, default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        own = self.n_models - self.pool
        if not 0 <= self.pool < self.n_models:
            raise DeflectError(f"a pool of {self.pool} models leaves no set of its own among {self.n_models}")
        m = own if self.policy.initial is None else self.policy.initial
        if not 1 <= m <= own:
            raise DeflectError(f"release.initial must be between 1 and the set size {own}, got {m}")
        if self.policy.threshold is not None and self.policy.threshold < 1:
            raise DeflectError(f"release.threshold must be at least 1, got {self.policy.threshold}")
        order = self.release_order()
        self.released, self.unreleased = order[:m], order[m:]
        self.hits = [0] * self.n_models
        self.since_release = [0] * self.n_models

    def release_order(self) -> list[int]:
        """The keyed order in which models are released: which models are held back is secret too.

        Pool models come last, oldest first: they exist to replace models once the set's own run out.
        """
        own = self.n_models - self.pool
        pool = list(range(own, self.n_models))
        if self.policy.initial is None or self.policy.initial >= own:
            return list(range(own)) + pool
        tag = [hmac.new(self.key, f"release:{i}".encode(), hashlib.sha256).digest() for i in range(own)]
        return sorted(range(own), key=lambda i: tag[i]) + pool

    def slot(self, client_id: str) -> int:
        if client_id not in self._slots:
            self._slots[client_id] = slot_of(self.key, client_id, len(self.released))
        return self._slots[client_id]

    def model_for(self, client_id: str) -> int:
        """The model index the client is served by right now."""
        return self.released[self.slot(client_id)]

    def shares(self, clients: list[str]) -> list[float]:
        """Fraction of `clients` served by each of the n models (0 for models not deployed)."""
        counts = [0] * self.n_models
        for c in clients:
            counts[self.model_for(c)] += 1
        return [c / max(len(clients), 1) for c in counts]

    def record_hits(self, model: int, count: int = 1) -> None:
        """The defender observed `count` successful attacks on clients holding `model`."""
        self.hits[model] += count
        self.since_release[model] += count

    def rotate(self) -> list[Rotation]:
        """Apply the policy: retire every deployed model at or over the threshold while fresh ones remain."""
        events: list[Rotation] = []
        if self.policy.threshold is None:
            return events
        for slot, model in enumerate(self.released):
            if self.since_release[model] >= self.policy.threshold and self.unreleased:
                fresh = self.unreleased.pop(0)
                self.released[slot] = fresh
                self.retired.append(model)
                events.append(Rotation(slot, model, fresh, self.since_release[model]))
        return events
