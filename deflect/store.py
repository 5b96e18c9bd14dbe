"""Runs, epochs, checkpoints and evaluations in SQLite through SQLModel.

The database runs in WAL mode with a busy timeout, and every write is a short transaction, so a
dashboard can read while `deflect train` writes each epoch. Queries used by both the CLI and the
dashboard live here.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Column, event, func
from sqlalchemy.exc import DatabaseError, OperationalError
from sqlmodel import JSON, Field, Session, SQLModel, create_engine, select

from deflect.errors import DeflectError

DEFAULT_DB = "deflect.db"
SCHEMA_VERSION = 2  # 2: EpochMetric.terms
STATUSES = ("running", "finished", "failed", "interrupted")
#: Run.config["role"] of runs deflect trains for its own use (the static adversary's model):
#: listed like any run, but never what 'latest' means.
HELPER_ROLE_KEY = "role"
K = TypeVar("K")


def utcnow() -> datetime:
    return datetime.now(UTC)


class Run(SQLModel, table=True):
    id: str = Field(primary_key=True)
    created: datetime = Field(default_factory=utcnow)
    updated: datetime = Field(default_factory=utcnow)
    method: str
    dataset: str
    arch: str
    preset: str
    n: int
    config: dict = Field(default_factory=dict, sa_column=Column(JSON))
    status: str = "running"
    device: str = "cpu"
    git_hash: str | None = None
    run_dir: str
    epochs_total: int = 0
    epochs_done: int = 0
    seconds: float = 0.0
    clean_acc: list | None = Field(default=None, sa_column=Column(JSON))
    best_epoch: int | None = None
    pid: int | None = None
    host: str | None = None
    message: str | None = None


class EpochMetric(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(foreign_key="run.id", index=True)
    epoch: int
    loss_total: float
    loss_class: float
    loss_angle: float
    loss_transfer1: float
    loss_transfer2: float
    val_loss: float
    clean_acc: list = Field(default_factory=list, sa_column=Column(JSON))
    lr: float
    seconds: float
    # every loss term of the run's method by name (baselines have their own), plus per-epoch extras
    terms: dict | None = Field(default=None, sa_column=Column(JSON))


class Checkpoint(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(foreign_key="run.id", index=True)
    epoch: int
    path: str
    sha256: str
    created: datetime = Field(default_factory=utcnow)


class Evaluation(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(foreign_key="run.id", index=True)
    created: datetime = Field(default_factory=utcnow)
    kind: str = "transfer"  # transfer | ensemble | eps-sweep | tsne
    attack: str
    params: dict = Field(default_factory=dict, sa_column=Column(JSON))
    matrix: list | None = Field(default=None, sa_column=Column(JSON))
    success: list | None = Field(default=None, sa_column=Column(JSON))
    clean_acc: list | None = Field(default=None, sa_column=Column(JSON))
    blackbox_mean: float | None = None
    blackbox_std: float | None = None
    whole_set_mean: float | None = None
    whitebox_mean: float | None = None
    success_rate: float | None = None
    n_examples: int = 0
    extra: dict = Field(default_factory=dict, sa_column=Column(JSON))
    seconds: float = 0.0


class Simulation(SQLModel, table=True):
    """One `deflect simulate`: the scenario played against a run, per-round and total outcomes."""

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(foreign_key="run.id", index=True)
    created: datetime = Field(default_factory=utcnow)
    adversary: str
    k: int = 0  # models of the set the attacker owns
    attack: str
    scenario: str | None = None
    params: dict = Field(default_factory=dict, sa_column=Column(JSON))
    rounds: list = Field(default_factory=list, sa_column=Column(JSON))
    sent: int = 0
    counted: int = 0  # sent to a victim whose model was right on the clean image
    succeeded: int = 0
    deflected: int = 0
    deflection_rate: float | None = None  # deflected / counted
    ci_low: float | None = None  # Wilson 95% interval of the deflection rate
    ci_high: float | None = None
    expected_rate: float | None = None  # from transfer matrices
    hits: list = Field(default_factory=list, sa_column=Column(JSON))  # successful attacks per model
    seconds: float = 0.0


BUSY_TIMEOUT_S = 30.0  # how long a write waits for another process's lock before it is reported


def _pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _unwritable_folder(path: Path) -> str | None:
    """Why SQLite cannot open `path` when its folder is read-only, else None."""
    if os.access(path.parent, os.W_OK | os.X_OK):
        return None
    return f"its folder {path.parent} is not writable (SQLite keeps its -wal and -shm files beside the database)"


def _refuse_foreign(path: Path) -> None:
    """Refuse an existing SQLite file that holds another application's tables, before deflect's first
    connection would switch it to WAL and add its own tables; read with a read-only connection."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    try:
        reader = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
        with contextlib.closing(reader) as conn:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            version = conn.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        if "locked" in str(exc):
            return  # a deflect writer holding it: the engine's busy timeout decides
        if "unable to open" in str(exc) and (why := _unwritable_folder(path)):
            raise DeflectError(f"cannot open database {path}: {why}") from None
        raise DeflectError(f"{path} is not a deflect database or is corrupt: {exc}") from None
    own = set(SQLModel.metadata.tables)
    if tables and not tables & own and version == 0:
        shown = ", ".join(sorted(tables)[:5])
        raise DeflectError(f"{path} is another application's database (tables: {shown}); "
                           "give deflect a file of its own with --db")


def default_db_path() -> Path:
    return Path(os.environ.get("DEFLECT_DB") or DEFAULT_DB)


@dataclass(frozen=True)
class BlackboxFigure:
    """A run's lowest black-box mean accuracy (%) over attacks, the attack that gave it (name and
    settings such as ε) and on how many images (`Store.worst_blackbox`)."""

    accuracy: float
    attack: str
    params: dict[str, Any]
    n_examples: int


class Store:
    """A deflect database: open (creating tables on first use) and query it."""

    def __init__(self, path: str | os.PathLike | None = None, *, create: bool = True) -> None:
        """Open (and, with `create`, make) the database; readers pass create=False so that a
        mistyped path is an error rather than a new empty database left behind."""
        self.path = Path(path) if path is not None else default_db_path()
        if self.path.exists() and self.path.is_dir():
            raise DeflectError(f"database path {self.path} is a directory")
        if not self.path.parent.exists():
            raise DeflectError(f"database folder {self.path.parent} does not exist")
        if not create and not self.path.exists():
            raise DeflectError(f"no database at {self.path}; 'deflect train' creates it")
        _refuse_foreign(self.path)
        self.engine = create_engine(
            f"sqlite:///{self.path}", connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT_S}
        )
        event.listen(self.engine, "connect", _pragmas)
        try:
            for attempt in range(8):
                started = time.monotonic()
                try:
                    self._prepare_schema()
                    break
                except OperationalError as exc:
                    # two processes opening a new (or old) database at once (torchrun's ranks): the other
                    # one created the table or added the column between our check and our statement, or
                    # both read the schema and then wanted to write it, and SQLite refuses one at once
                    # rather than wait (a deadlock, not a lock held); look again. A lock held past the
                    # busy timeout is a real one and is reported.
                    message = str(exc.orig)
                    racing = "already exists" in message or "duplicate column" in message or (
                        "locked" in message and time.monotonic() - started < 1.0)
                    if not racing or attempt == 7:
                        raise
                    time.sleep(0.05 * (attempt + 1))
        except OperationalError as exc:
            why = _unwritable_folder(self.path) or exc.orig
            raise DeflectError(f"cannot open database {self.path}: {why}") from exc
        except DatabaseError as exc:
            raise DeflectError(f"{self.path} is not a deflect database or is corrupt: {exc.orig}") from exc

    def _prepare_schema(self) -> None:
        SQLModel.metadata.create_all(self.engine)
        with self.engine.connect() as conn:
            version = conn.exec_driver_sql("PRAGMA user_version").scalar() or 0
            if version == 0:
                conn.exec_driver_sql(f"PRAGMA user_version={SCHEMA_VERSION}")
                conn.commit()
            elif version < SCHEMA_VERSION:
                _migrate(conn, version)
            elif version > SCHEMA_VERSION:
                raise DeflectError(f"database {self.path} was written by a newer deflect (schema {version})")

    @property
    def runs_root(self) -> Path:
        """Run directories live beside the database unless DEFLECT_RUNS says otherwise."""
        env = os.environ.get("DEFLECT_RUNS")
        return Path(env) if env else self.path.resolve().parent / "runs"

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    def _write(self, *rows: SQLModel) -> None:
        try:
            with self.session() as s:
                for row in rows:
                    s.add(row)
                s.commit()
        except OperationalError as exc:
            raise DeflectError(f"cannot write to database {self.path}: {exc.orig}") from exc

    def check_writable(self) -> None:
        """Fail now, not after the work whose results would be stored: a write lock held past the busy
        timeout refuses a write transaction, and a file SQLite could open only read-only (an immutable
        or read-only file) refuses a write in it, here one that stores what is there and is rolled back."""
        raw = self.engine.raw_connection()
        try:
            cursor = raw.cursor()
            cursor.execute("BEGIN IMMEDIATE")
            version = cursor.execute("PRAGMA user_version").fetchone()[0]
            try:
                cursor.execute(f"PRAGMA user_version = {int(version)}")
            finally:
                with contextlib.suppress(sqlite3.OperationalError):  # a failed write may have ended it already
                    cursor.execute("ROLLBACK")
        except sqlite3.OperationalError as exc:
            raise DeflectError(f"cannot write to database {self.path}: {exc}") from exc
        finally:
            raw.close()

    # runs -----------------------------------------------------------------------------------
    def add_run(self, run: Run) -> Run:
        run.pid, run.host = os.getpid(), socket.gethostname()
        self._write(run)
        return run

    def update_run(self, run_id: str, *extra: SQLModel, **values: Any) -> Run:
        """Change a run's fields, adding `extra` rows in the same transaction (an epoch and its run
        counters commit together, so a killed process never leaves one without the other)."""
        try:
            with self.session() as s:
                run = s.get(Run, run_id)
                if run is None:
                    raise DeflectError(f"no run {run_id!r} in {self.path}")
                for key, value in values.items():
                    setattr(run, key, value)
                run.updated = utcnow()
                s.add(run)
                for row in extra:
                    s.add(row)
                s.commit()
                return run
        except OperationalError as exc:
            raise DeflectError(f"cannot write to database {self.path}: {exc.orig}") from exc

    def _located(self, run: Run) -> Run:
        """`run` with its folder found beside this database whenever one is there: a database copied
        with its runs/ folder works on its own copies, not on the original's files (which may still
        exist). Otherwise the recorded folder (one written under another DEFLECT_RUNS, say)."""
        beside = self.runs_root / run.id
        if run.run_dir and beside.is_dir() and Path(run.run_dir).resolve() != beside.resolve():
            run.run_dir = str(beside.resolve())
        return run

    def writable_run_dir(self, run: Run) -> Path:
        """`run`'s folder, to write into (a resumed epoch, a figure): only one in this database's runs folder.

        A database copied without a run's folder finds the original's folder by its recorded path
        (`_located`); reading it is harmless, but writing would change files another database's
        digests vouch for, and that run would then fail its checks there."""
        folder, root = Path(run.run_dir).resolve(), self.runs_root.resolve()
        if (self.runs_root / run.id).resolve() != folder and not folder.is_relative_to(root):  # a link is its own
            raise DeflectError(f"run {run.id}'s folder {folder} is outside this database's runs folder {root}, and "
                               f"deflect writes only there; if the folder is this database's, set "
                               f"DEFLECT_RUNS={folder.parent}")
        return folder

    def get_run(self, ref: str) -> Run:
        """A run by id, unique id prefix, or 'latest' (the newest finished one, helper runs left out)."""
        return self._located(self._find_run(ref))

    def _find_run(self, ref: str) -> Run:
        if ref == "latest":  # the newest finished set: a failed or stopped run is named, not implied
            run = self.latest_run()
            if run is not None:
                return run
            newest = self.latest_run(status=None)
            if newest is not None:
                raise DeflectError(f"no finished run in {self.path} yet ('latest' names the newest finished one); "
                                   f"the newest is {newest.id} ({newest.status}): name it")
            raise DeflectError(f"no runs in {self.path} yet; create one with 'deflect train'")
        self.mark_stale_runs()
        with self.session() as s:
            if not ref.strip():
                raise DeflectError("empty run reference; give a run id, a unique prefix of one, or 'latest'")
            run = s.get(Run, ref)
            if run is not None:
                return run
            # a literal, case-sensitive prefix (SQL LIKE would read % and _ as wildcards and ignore case)
            matches = s.exec(select(Run).where(func.substr(Run.id, 1, len(ref)) == ref)).all()
        if len(matches) > 1:  # deflect's own helper runs never make a user's prefix ambiguous
            matches = [r for r in matches if not is_helper_run(r)] or matches
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            more = f" and {len(matches) - 5} more" if len(matches) > 5 else ""
            raise DeflectError(f"run {ref!r} is ambiguous: matches {', '.join(r.id for r in matches[:5])}{more}")
        raise DeflectError(f"no run {ref!r} in {self.path} ('deflect runs' lists them)")

    def latest_run(self, method: str | None = None, status: str | None = "finished",
                   dataset: str | None = None) -> Run | None:
        """The newest run with this method/status/dataset, deflect's own helper runs left out."""
        for run in reversed(self.list_runs()):
            if is_helper_run(run) or (method and run.method != method) or (status and run.status != status):
                continue
            if dataset and run.dataset != dataset:
                continue
            return run
        return None

    def list_runs(self) -> list[Run]:
        self.mark_stale_runs()
        with self.session() as s:
            runs = list(s.exec(select(Run).order_by(Run.created)).all())  # type: ignore[arg-type]
        return [self._located(run) for run in runs]

    def mark_stale_runs(self) -> int:
        """Runs left 'running' by a process on this host that no longer exists were interrupted."""
        host = socket.gethostname()
        changed = 0
        try:
            with self.session() as s:
                for run in s.exec(select(Run).where(Run.status == "running")).all():
                    if run.host == host and run.pid is not None and not _pid_alive(run.pid):
                        run.status, run.message = "interrupted", "process ended without finishing"
                        s.add(run)
                        changed += 1
                if changed:
                    s.commit()
        except OperationalError:
            return 0  # a busy database must not stop a read; the next call tries again
        return changed

    # epochs and checkpoints -------------------------------------------------------------------
    def epochs(self, run_id: str) -> list[EpochMetric]:
        with self.session() as s:
            q = select(EpochMetric).where(EpochMetric.run_id == run_id).order_by(EpochMetric.epoch)
            return list(s.exec(q).all())

    def add_checkpoints(self, run_id: str, epoch: int, digests: dict[str, str], run_dir: Path) -> None:
        self._write(
            *(Checkpoint(run_id=run_id, epoch=epoch, path=str(run_dir / name), sha256=d) for name, d in digests.items())
        )

    def checkpoint_digests(self, run_id: str) -> dict[str, str]:
        """Latest recorded sha256 of each file name of a run."""
        with self.session() as s:
            rows = s.exec(select(Checkpoint).where(Checkpoint.run_id == run_id).order_by(Checkpoint.id)).all()  # type: ignore[arg-type]
        return {Path(r.path).name: r.sha256 for r in rows}

    def checkpoint_digest_sets(self, run_id: str) -> dict[str, set[str]]:
        """Every sha256 recorded for each file name of a run.

        The trainer records a file's digest before the file replaces its predecessor, so after a
        crash the file on disk is the previous or the new version: both are deflect's own output.
        """
        with self.session() as s:
            rows = s.exec(select(Checkpoint).where(Checkpoint.run_id == run_id)).all()
        digests: dict[str, set[str]] = {}
        for r in rows:
            digests.setdefault(Path(r.path).name, set()).add(r.sha256)
        return digests

    def checkpoint_digest(self, run_id: str, epoch: int, name: str) -> str | None:
        """The sha256 recorded for file `name` of a run at `epoch`, if any."""
        with self.session() as s:
            rows = s.exec(select(Checkpoint).where(Checkpoint.run_id == run_id, Checkpoint.epoch == epoch)).all()
        return next((r.sha256 for r in reversed(rows) if Path(r.path).name == name), None)

    # evaluations ------------------------------------------------------------------------------
    def add_evaluation(self, evaluation: Evaluation) -> Evaluation:
        self._write(evaluation)
        return evaluation

    def evaluations(self, run_id: str | None = None, kind: str | None = None) -> list[Evaluation]:
        with self.session() as s:
            q = select(Evaluation)
            if run_id is not None:
                q = q.where(Evaluation.run_id == run_id)
            if kind is not None:
                q = q.where(Evaluation.kind == kind)
            return list(s.exec(q.order_by(Evaluation.id)).all())  # type: ignore[arg-type]

    # read-only views (the dashboard polls these; they never write) -----------------------------
    def runs_readonly(self) -> list[Run]:
        """Every run, oldest first, without `mark_stale_runs`'s write: a run left 'running' by a dead
        process on this host is shown as 'interrupted' in the returned (detached) rows only."""
        host = socket.gethostname()
        with self.session() as s:
            rows = list(s.exec(select(Run).order_by(Run.created)).all())  # type: ignore[arg-type]
        for run in rows:
            if run.status == "running" and run.host == host and run.pid is not None and not _pid_alive(run.pid):
                run.status = "interrupted"
        return rows

    def run_readonly(self, run_id: str) -> Run | None:
        """One run by exact id, as `runs_readonly` shows it (no write), or None."""
        return next((run for run in self.runs_readonly() if run.id == run_id), None)

    def latest_epochs(self, run_ids: list[str] | None = None) -> dict[str, EpochMetric]:
        """The newest epoch row of each run (of `run_ids`, or of every run)."""
        with self.session() as s:
            q = select(EpochMetric)
            if run_ids is not None:
                q = q.where(EpochMetric.run_id.in_(run_ids))  # type: ignore[attr-defined]
            rows = s.exec(q.order_by(EpochMetric.epoch, EpochMetric.id)).all()  # type: ignore[arg-type]
        return {row.run_id: row for row in rows}

    def worst_blackbox(self) -> dict[str, BlackboxFigure]:
        """Each run's headline black-box accuracy: the lowest over the attacks it was evaluated with.

        A defence is as strong as the strongest attack against it (RobustBench reports the minimum
        over attacks too), so the highest figure would flatter a set. Only test-split evaluations
        count: the validation split is where recipes are chosen, not where a set is reported. An
        attack is its name and settings (ε, steps, ...), and counts at its largest stored evaluation,
        the newest of equals: a 1-image check (`simulate --limit 1`) does not stand in for the same
        attack measured on 1000 images.
        """
        chosen = largest_by((ev for ev in self.evaluations(kind="transfer")
                             if ev.blackbox_mean is not None and (ev.params or {}).get("split", "test") == "test"),
                            lambda ev: (ev.run_id, ev.attack, settings_key(ev)))
        worst: dict[str, BlackboxFigure] = {}
        for (run_id, attack, settings), ev in chosen.items():
            assert ev.blackbox_mean is not None
            if run_id not in worst or ev.blackbox_mean < worst[run_id].accuracy:
                worst[run_id] = BlackboxFigure(ev.blackbox_mean, attack, json.loads(settings), ev.n_examples)
        return worst

    def newest_transfer(self, run_id: str) -> dict[str, Evaluation]:
        """Attack name -> the transfer evaluation to show for it: of the settings (ε, steps, ...; not
        the split) it was measured with most recently, the largest evaluation, the newest of equals
        (as `worst_blackbox` counts), so a 1-image check never replaces a 1000-image matrix of the
        same attack. Attacks in the order first evaluated."""
        return per_attack(self.evaluations(run_id, kind="transfer"))


    # simulations ------------------------------------------------------------------------------
    def add_simulation(self, simulation: Simulation) -> Simulation:
        self._write(simulation)
        return simulation

    def simulations(self, run_id: str | None = None) -> list[Simulation]:
        with self.session() as s:
            q = select(Simulation)
            if run_id is not None:
                q = q.where(Simulation.run_id == run_id)
            return list(s.exec(q.order_by(Simulation.id)).all())  # type: ignore[arg-type]


def _migrate(conn: Any, version: int) -> None:
    """Bring a database written by an older deflect up to SCHEMA_VERSION, keeping every row."""
    if version < 2:
        columns = {row[1] for row in conn.exec_driver_sql("PRAGMA table_info(epochmetric)")}
        if "terms" not in columns:
            conn.exec_driver_sql("ALTER TABLE epochmetric ADD COLUMN terms JSON")
    conn.exec_driver_sql(f"PRAGMA user_version={SCHEMA_VERSION}")
    conn.commit()


def per_attack(evaluations: Sequence[Evaluation],
               prefer: Callable[[str], str | None] | None = None) -> dict[str, Evaluation]:
    """Attack name -> one evaluation to show for it (`evaluations` oldest first): of the settings
    `prefer(attack)` names where any was stored, else of those it was measured with most recently,
    the largest evaluation, the newest of equals. Attacks in the order first evaluated."""
    largest = largest_by(evaluations, lambda ev: (ev.attack, settings_key(ev)))
    latest = {ev.attack: settings_key(ev) for ev in evaluations}  # first-evaluated order, newest settings
    if prefer is not None:
        for attack in latest:
            wanted = prefer(attack)
            if wanted is not None and (attack, wanted) in largest:
                latest[attack] = wanted
    return {attack: largest[(attack, settings)] for attack, settings in latest.items()}


def largest_by(evaluations: Iterable[Evaluation], key: Callable[[Evaluation], K]) -> dict[K, Evaluation]:
    """Per key, the evaluation on the most images, the newest of equals (`evaluations` oldest first,
    as `Store.evaluations` gives them): a 1-image check never stands in for the same attack measured
    on 1000 images."""
    chosen: dict[K, Evaluation] = {}
    for ev in evaluations:
        k = key(ev)
        if k not in chosen or ev.n_examples >= chosen[k].n_examples:
            chosen[k] = ev
    return chosen


EVAL_SEED = "eval_seed"  # the params key of an evaluation's seed other than 0 (`seed` is an attack's own: Square's)


def settings_key(ev: Evaluation) -> str:
    """An evaluation's attack settings (ε, steps, precision, ...) as a comparable key; the split and
    the evaluation's seed say where it was measured (which images), not what. A CW or EAD row stored
    before their `unfooled` setting existed returned clean images for samples never fooled by κ:
    it keys as `unfooled: "clean"`, never as today's default."""
    params = {k: v for k, v in (ev.params or {}).items() if k not in ("split", EVAL_SEED)}
    if ev.attack.startswith(("cw", "ead")) and "c" in params and "kappa" in params:
        params.setdefault("unfooled", "clean")
    return json.dumps(params, sort_keys=True)


def is_helper_run(run: Run) -> bool:
    """A run deflect trained for itself (e.g. the static adversary's own model)."""
    return bool((run.config or {}).get(HELPER_ROLE_KEY))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_to_dict(run: Run) -> dict[str, Any]:
    data = json.loads(run.model_dump_json())
    return data
