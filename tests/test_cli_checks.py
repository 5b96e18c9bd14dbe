"""Options that cannot work together, values past their range, and what is checked before any work."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deflect.cli import app
from deflect.errors import DeflectError
from deflect.store import HELPER_ROLE_KEY, Store
from deflect.train import train
from tests.conftest import tiny_config
from tests.test_reliability import TINY, _one_line_error

runner = CliRunner()


@pytest.fixture
def finished(store: Store) -> str:
    """A tiny finished set in the test's own database (./deflect.db)."""
    return train(tiny_config(), store)


def test_run_references_are_literal_case_sensitive_prefixes(store: Store, finished: str) -> None:
    for ref in ("%", "_", finished.upper(), finished[:4] + "%"):
        _one_line_error(["evaluate", ref, "--attack", "fgsm"], f"no run {ref!r}")
    _one_line_error(["evaluate", "", "--attack", "fgsm"], "empty run reference")
    assert store.get_run(finished[:8]).id == finished
    assert store.evaluations() == []  # nothing was evaluated on a run the reference did not name


def test_read_only_commands_never_create_a_database(tmp_path: Path) -> None:
    typo = str(tmp_path / "typo.db")
    for args in (["evaluate", "latest"], ["compare", "x"], ["export", "latest"],
                 ["simulate", "--adversary", "oracle"], ["grow", "latest", "--add", "1"]):
        _one_line_error([*args, "--db", typo], "no database at", "typo.db")
    listed = runner.invoke(app, ["runs", "--db", typo])  # nothing to list: said, with the path, and no error
    assert listed.exit_code == 0 and f"no runs yet: no database at {typo}" in listed.stdout
    assert runner.invoke(app, ["runs", "--db", typo, "--json"]).stdout.strip() == "[]"
    assert not (tmp_path / "typo.db").exists()


def test_output_folders_are_checked_before_any_work(tmp_path: Path, store: Store) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    _one_line_error(["reproduce", "--preset", "digits", "--quick", "--out", str(afile)], "is a file, not a folder",
                    strict=True)
    assert store.list_runs() == []  # refused before training a single set
    _one_line_error(["export", "latest", "--out", str(afile)], "is a file, not a folder", strict=True)


@pytest.mark.parametrize(("args", "needles"), [
    (["--all", "--attack", "pgd1"], ["--all runs every attack", "drop --attack"]),
    (["--attack", "pgd1", "--k", "2"], ["--k only applies with --adaptive"]),
    (["--attack", "pgd1", "--queries", "5", "--restarts", "2"], ["--queries, --restarts only apply with --adaptive"]),
    (["--attack", "pgd1", "--max-subsets", "3"], ["--max-subsets only applies with --ensemble"]),
    (["--eps-sweep", "--ensemble", "2"], ["--ensemble crafts the attacks of --attack/--all"]),
    (["--attack", "pgd1", "--eps", "5"], ["--eps 5.0 is more than 1", "L∞ budget"]),
    (["--attack", "pgd2,,fgsm"], ["empty name between commas"]),
    (["--attack", "pgd1,fgsm,pgd1"], ["names pgd1 more than once"]),
    (["--adaptive", "--attackers", "transfer,,"], ["--attackers", "empty name between commas"]),
    (["--attack", "cw1", "--alpha", "0.5"], ["--alpha does not apply to attack cw1", "--steps"]),
])
def test_evaluate_refuses_options_that_would_be_ignored(store: Store, finished: str, args: list[str],
                                                        needles: list[str]) -> None:
    _one_line_error(["evaluate", finished, *args, "--limit", "10"], *needles)
    assert store.evaluations() == []


def test_an_l2_budget_may_exceed_one(store: Store, finished: str) -> None:
    result = runner.invoke(app, ["evaluate", finished, "--attack", "fgm", "--eps", "1.5", "--limit", "10"])
    assert result.exit_code == 0, result.output
    assert store.evaluations(finished)[0].params["eps"] == 1.5


@pytest.mark.parametrize(("args", "needles"), [
    (["--method", "independent", "--w-angle", "3"], ["--w-angle only applies to --method disjoint", "independent"]),
    (["--method", "adp", "--transfer-steps", "5", "--sample", "2"], ["--sample, --transfer-steps", "not adp"]),
    (["--at-eps", "0.1"], ["--at-eps only applies to --method fast-at"]),
    (["--no-angle", "--w-angle", "2"], ["--no-angle sets --w-angle to 0; drop one of them"]),
    (["--no-transfer", "--w-transfer2", "1"], ["--no-transfer sets --w-transfer2 to 0; drop one of them"]),
    (["--sample", "5"], ["--sample 5 is more than the set's 2 models"]),
    (["--transfer-batch", "1000", "--batch-size", "64"], ["--transfer-batch 1000 is more than the batch size 64"]),
    (["--data-dir", "/nonexistent/fm"], ["--data-dir /nonexistent/fm is not a folder"]),
    (["--lr", "-1"], ["--lr (lr_max) must be a finite non-negative number"]),
])
def test_train_refuses_options_that_would_be_ignored_or_do_nothing(store: Store, args: list[str],
                                                                   needles: list[str]) -> None:
    _one_line_error(["train", *TINY, *args], *needles, strict=True)
    assert store.list_runs() == [] and not (store.path.parent / "runs").exists()


def test_bench_refuses_time_to_quality_options_without_it_and_bars_never_met() -> None:
    _one_line_error(["bench", "--quick", "--epochs", "3", "--clean-bar", "10"],
                    "--epochs, --clean-bar only apply with --time-to-quality", strict=True)
    _one_line_error(["bench", "--time-to-quality", "--clean-bar", "200"], "--clean-bar must be an accuracy in [0, 100]",
                    strict=True)
    _one_line_error(["bench", "--time-to-quality", "--blackbox-bar", "nan"], "--blackbox-bar", strict=True)


def test_grow_names_its_own_option_and_refuses_helper_runs(store: Store, finished: str) -> None:
    _one_line_error(["grow", finished, "--add", "1000"], "--add 1000 would make a set of 1002 models", strict=True)
    run = store.get_run(finished)
    store.update_run(finished, config={**run.config, HELPER_ROLE_KEY: "static-adversary"})
    _one_line_error(["grow", finished, "--add", "1"], "deflect's own helper run (static-adversary)", strict=True)
    assert [r.id for r in store.list_runs()] == [finished]


def test_a_misspelt_scenario_name_lists_the_shipped_ones() -> None:
    _one_line_error(["simulate", "--scenario", "zero-dya"], "does not exist", "shipped scenarios:", "zero-day",
                    strict=True)


def test_a_run_that_cannot_be_recorded_leaves_no_folder(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    def locked(record: object) -> None:
        raise DeflectError(f"cannot write to database {store.path}: database is locked")

    monkeypatch.setattr(Store, "add_run", lambda self, record: locked(record))
    with pytest.raises(DeflectError, match="locked"):
        train(tiny_config(), store)
    runs = store.path.parent / "runs"
    assert not runs.exists() or not any(runs.iterdir())


def test_unfinished_sets_are_evaluated_with_a_warning(store: Store, finished: str) -> None:
    store.update_run(finished, status="interrupted")
    result = runner.invoke(app, ["evaluate", finished, "--attack", "fgsm", "--limit", "10"])
    assert result.exit_code == 0, result.output
    assert (f"deflect: warning: run {finished} is interrupted after 2 of 2 epochs; its last saved checkpoint is used"
            in result.stderr)
    assert len(store.evaluations(finished)) == 1


def test_a_copied_database_works_on_its_own_copy_of_the_runs(tmp_path: Path, store: Store, finished: str) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for part in store.path.parent.glob("deflect.db*"):  # with its -wal and -shm, as `cp -a` copies them
        shutil.copy(part, copy / part.name)
    shutil.copytree(store.path.parent / "runs", copy / "runs")
    moved = Store(copy / "deflect.db")
    assert Path(moved.get_run(finished).run_dir) == (copy / "runs" / finished).resolve()
    assert Path(store.get_run(finished).run_dir) == (store.path.parent / "runs" / finished).resolve()


def test_a_copy_without_its_run_folder_never_writes_to_the_original(tmp_path: Path, store: Store,
                                                                     finished: str) -> None:
    """The copy reads the original's folder by its recorded path; a resumed epoch or a figure written
    there would change files the original database's digests vouch for."""
    store.update_run(finished, status="interrupted", epochs_done=1)
    copy = tmp_path / "copy"
    copy.mkdir()
    for part in store.path.parent.glob("deflect.db*"):
        shutil.copy(part, copy / part.name)
    original = Path(store.get_run(finished).run_dir)
    before = {p.name: p.read_bytes() for p in original.iterdir() if p.is_file()}
    db = ["--db", str(copy / "deflect.db")]
    for args in (["train", "--resume", finished], ["evaluate", finished, "--attack", "fgsm", "--limit", "10"]):
        _one_line_error([*args, *db], f"{original} is outside this database's runs folder", "DEFLECT_RUNS=",
                        strict=True)
    assert {p.name: p.read_bytes() for p in original.iterdir() if p.is_file()} == before
    assert not (original / "figures").exists() and Store(copy / "deflect.db").evaluations() == []
    assert store.get_run(finished).epochs_done == 1  # the original resumes as before


def test_an_immutable_database_is_refused_before_any_crafting(store: Store, finished: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite opens a file it cannot write read-only and still grants an empty write transaction; the
    up-front check writes (and rolls back) so that hours of crafting are not lost at the final store."""
    import subprocess

    with sqlite3.connect(store.path) as conn:  # everything in the file itself, as a copied database would be
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    if subprocess.run(["chattr", "+i", str(store.path)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i needs root and a file system that supports it")
    crafted: list[int] = []
    monkeypatch.setattr("deflect.pipeline.transfer_matrix", lambda *a, **k: crafted.append(1))
    try:
        _one_line_error(["evaluate", finished, "--attack", "fgsm", "--limit", "10"], "cannot write to database",
                        "readonly", strict=True)
    finally:
        subprocess.run(["chattr", "-i", str(store.path)], check=True)
    assert crafted == [] and store.evaluations() == []


def test_a_run_folder_moved_away_and_linked_back_stays_writable(tmp_path: Path, store: Store, finished: str) -> None:
    elsewhere = tmp_path / "other-disk"
    elsewhere.mkdir()
    beside = store.runs_root / finished
    shutil.move(str(beside), elsewhere / finished)
    beside.symlink_to(elsewhere / finished)
    assert store.writable_run_dir(store.get_run(finished)) == (elsewhere / finished).resolve()
    result = runner.invoke(app, ["evaluate", finished, "--attack", "fgsm", "--limit", "10"])
    assert result.exit_code == 0, result.output
    assert list((elsewhere / finished / "figures").glob("transfer-fgsm-*.png"))


def test_a_locked_database_is_refused_before_any_crafting(store: Store, finished: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlite3

    import deflect.store

    monkeypatch.setattr(deflect.store, "BUSY_TIMEOUT_S", 0.2)  # the lock is held throughout: no need to wait
    crafted: list[int] = []
    monkeypatch.setattr("deflect.pipeline.transfer_matrix", lambda *a, **k: crafted.append(1))
    locker = sqlite3.connect(store.path)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        _one_line_error(["evaluate", finished, "--attack", "fgsm", "--limit", "10"], "cannot write to database",
                        "locked", strict=True)
        _one_line_error(["simulate", "--adversary", "oracle", "--run", finished], "cannot write to database",
                        strict=True)
    finally:
        locker.rollback()
        locker.close()
    assert crafted == [] and store.evaluations() == []


def test_reproduce_refuses_bad_options_before_creating_anything(tmp_path: Path) -> None:
    for args, needle in ((["--device", "tpu"], "unknown device 'tpu'"), (["--preset", "nope"], "unknown preset"),
                         (["--data-dir", "/etc/passwd"], "--data-dir /etc/passwd is not a folder"),
                         (["--jobs", "0"], "--jobs must be at least 1")):
        _one_line_error(["reproduce", "--preset", "digits", *args], needle, strict=True)
    assert not (tmp_path / "results").exists() and not (tmp_path / "deflect.db").exists()
    Store(tmp_path / "deflect.db")  # a report alone neither trains nor reads data: device and folder are not its
    _one_line_error(["reproduce", "--preset", "digits", "--report-only", "--device", "cuda", "--data-dir", "/nowhere"],
                    "no set of the digits reproduction is finished", strict=True)
