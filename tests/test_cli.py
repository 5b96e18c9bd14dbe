"""The command line: training end to end, listing runs, and one-line errors with exit code 2."""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import pytest
from rich.console import Console
from rich.file_proxy import FileProxy
from typer.testing import CliRunner

from deflect.attacks.registry import adaptive_attack_names, attack_names
from deflect.cli import ATTACK_HELP, app
from deflect.console import result_console

runner = CliRunner()
TINY = ["--epochs", "1", "--limit", "256"]


def test_train_prints_run_id_and_runs_lists_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    result = runner.invoke(app, ["train", "--n", "2", *TINY])
    assert result.exit_code == 0, result.output
    run_id = result.stdout.strip().splitlines()[-1]
    assert run_id.startswith("digits-disjoint-n2-")
    assert re.search(r"^epoch 1: loss [\d.]+ val [\d.]+ clean % [\d.]+ [\d.]+$", result.stderr, re.M), result.stderr
    # off a terminal the bar's last state is one whole line at full width, not squeezed into 80 columns
    assert re.search(r"^epoch 1/1 batch 4/4 " + "━" * 40 + " 4/4 .+ img/s .+ ETA ", result.stderr, re.M), result.stderr
    listed = runner.invoke(app, ["runs", "--json"])
    rows = json.loads(listed.stdout)
    assert [r["id"] for r in rows] == [run_id] and rows[0]["status"] == "finished"
    assert (tmp_path / "runs" / run_id / "model_1.safetensors").exists()
    table = runner.invoke(app, ["runs"]).stdout  # not a terminal: whole rows, not 80 folded columns
    row = next(line for line in table.splitlines() if run_id in line)
    assert all(cell in row for cell in ("disjoint", "digits", "finished", "1/1")), table
    narrow = runner.invoke(app, ["runs"], env={"COLUMNS": "80"}).stdout  # a narrow terminal: columns go, not lines
    lines = [line for line in narrow.splitlines() if line.startswith("│")]
    assert len(lines) == 1 and run_id in lines[0] and "finished" in lines[0], narrow
    assert all(len(line) <= 80 for line in narrow.splitlines()) and "created" not in narrow, narrow

    import shutil

    from deflect.sets import load_set
    from deflect.store import Store

    moved = tmp_path / "moved"  # the database and its runs/ folder moved together: the runs are found there
    moved.mkdir()
    for file in tmp_path.glob("deflect.db*"):
        shutil.copy(file, moved / file.name)
    (tmp_path / "runs").rename(moved / "runs")
    store = Store(moved / "deflect.db")
    assert Path(store.get_run(run_id).run_dir) == (moved / "runs" / run_id).resolve()
    assert len(load_set(run_id, store)) == 2


def _one_line_error(args: list[str], needle: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert "Traceback" not in result.output


def test_runs_shows_the_lowest_black_box_accuracy_over_attacks(tmp_path: Path) -> None:
    """The headline figure is the strongest attack's, each attack at its largest evaluation: a newer
    1-image check of the same attack (100 % by chance) neither raises nor replaces it."""
    from deflect.store import Evaluation, Store
    from tests.test_tui import add_run

    store = Store(tmp_path / "deflect.db")
    add_run(store, "digits-disjoint-n3-aaaaaa", tmp_path, status="finished", epochs=1, total=1)
    add_run(store, "digits-disjoint-n3-bbbbbb", tmp_path, status="finished", epochs=1, total=1)

    def transfer(run_id: str, attack: str, bb: float, images: int, eps: float = 0.15, split: str = "test") -> None:
        store.add_evaluation(Evaluation(run_id=run_id, kind="transfer", attack=attack, blackbox_mean=bb,
                                        n_examples=images, matrix=[[0.0]], params={"eps": eps, "split": split}))

    transfer("digits-disjoint-n3-aaaaaa", "pgd1", 84.5, 1000)
    transfer("digits-disjoint-n3-aaaaaa", "fgsm", 88.0, 1000)
    transfer("digits-disjoint-n3-aaaaaa", "pgd1", 100.0, 1, split="val")  # the same attack on another split
    transfer("digits-disjoint-n3-aaaaaa", "cw2", 0.0, 1)
    transfer("digits-disjoint-n3-aaaaaa", "cw2", 79.25, 500)  # newer and larger: it replaces the 1-image row
    transfer("digits-disjoint-n3-aaaaaa", "cw2", 95.0, 2000, split="val")  # larger, but not the test split
    transfer("digits-disjoint-n3-aaaaaa", "mifgsm1", 60.0, 1000, split="val")  # measured on validation images only
    rows = {r["id"]: r for r in json.loads(runner.invoke(app, ["runs", "--json"]).stdout)}
    first, second = rows["digits-disjoint-n3-aaaaaa"], rows["digits-disjoint-n3-bbbbbb"]
    worst = (first["worst_blackbox"], first["worst_blackbox_attack"], first["worst_blackbox_images"])
    assert worst == (79.25, "cw2", 500) and first["worst_blackbox_params"] == {"eps": 0.15}
    assert second["worst_blackbox"] is None and second["worst_blackbox_attack"] is None
    table = runner.invoke(app, ["runs"]).stdout
    assert "worst BB %" in table, table
    line = next(row for row in table.splitlines() if "aaaaaa" in row)
    assert "79.2" in line and "100.0" not in line and "88.0" not in line, table
    transfer("digits-disjoint-n3-aaaaaa", "pgd1", 50.0, 1, eps=0.3)  # another budget is another attack
    rows = {r["id"]: r for r in json.loads(runner.invoke(app, ["runs", "--json"]).stdout)}
    assert rows["digits-disjoint-n3-aaaaaa"]["worst_blackbox_params"] == {"eps": 0.3}


def test_bad_arguments_give_one_line_and_exit_2(tmp_path: Path) -> None:
    _one_line_error(["train", "--n", "1"], "--n must be at least 2")
    _one_line_error(["train", "--dataset", "imagenet"], "unknown dataset")
    _one_line_error(["train", "--resume", "no-such-run"], "no run 'no-such-run'")
    _one_line_error(["train", "--preset", "huge"], "unknown preset")
    _one_line_error(["train", "--angle-epochs", "-1"], "--angle-epochs must be at least 0")
    _one_line_error(["train", "--resume", "some-run", "--n", "5", "--dataset", "mnist"],
                    "--resume continues a run with its stored settings; drop --n, --dataset")
    _one_line_error(["evaluate", "latest", "--attack", ""], "--attack names no attack")
    _one_line_error(["evaluate", "latest", "--attack", " , "], "--attack names no attack")
    _one_line_error(["evaluate", "latest", "--adaptive", "--attackers", ""], "unknown adaptive attacker (none)")
    (tmp_path / "junk.db").write_bytes(b"this is not sqlite" * 100)
    _one_line_error(["runs", "--db", str(tmp_path / "junk.db")], "not a deflect database")
    assert (tmp_path / "junk.db").read_bytes() == b"this is not sqlite" * 100


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("stdout_is_tty", "stderr_is_tty"), [(False, True), (True, False), (True, True)])
def test_results_reach_standard_output_behind_a_live_bar(monkeypatch: pytest.MonkeyPatch, stdout_is_tty: bool,
                                                         stderr_is_tty: bool) -> None:
    """While a bar is live on a terminal Rich swaps sys.stdout for a proxy that writes to the bar's
    console (stderr): results must still reach the real standard output when it is a file or pipe,
    and stay on the terminal when the bar's stream is redirected (`2> log`)."""
    monkeypatch.delenv("COLUMNS", raising=False)
    live_file = _Tty() if stderr_is_tty else io.StringIO()
    real = _Tty() if stdout_is_tty else io.StringIO()
    live = Console(file=live_file)
    monkeypatch.setattr(sys, "stdout", FileProxy(live, real))
    result_console(live).print("fgsm: black-box 88.8", highlight=False)
    through_bar = stdout_is_tty and stderr_is_tty
    assert ("fgsm: black-box 88.8" in live_file.getvalue()) is through_bar
    assert ("fgsm: black-box 88.8" in real.getvalue()) is not through_bar


def test_attack_help_names_every_attack() -> None:
    for name in [*attack_names(), *adaptive_attack_names()]:
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", ATTACK_HELP), name


def test_progress_rate_counts_from_the_first_report(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first report comes when a unit is already done: the rate must not divide it by ~0 s."""
    from deflect import cli

    class Bar:
        def __init__(self) -> None:
            self.rates: list[str] = []

        def add_task(self, description: str, total: int, rate: str) -> int:
            return 0

        def update(self, task: int, completed: int, total: int, rate: str) -> None:
            self.rates.append(rate)

    clock = iter([100.0, 100.5, 102.0])
    monkeypatch.setattr(cli.time, "perf_counter", lambda: next(clock))
    bar = Bar()
    report = cli._progress_callback(bar, "fgsm", "batches")
    for done in (1, 2, 4):
        report(done, 4)
    assert bar.rates == ["", "2.00 batches/s", "1.50 batches/s"]


@pytest.mark.parametrize(("args", "needle"), [
    (["train", "--n", "abc"], "Invalid value for '--n'"),
    (["evaluate", "--bogus"], "No such option: --bogus"),
    (["compare"], "Missing argument 'runs'"),
    (["nosuch"], "No such command 'nosuch'"),
])
def test_command_line_mistakes_are_one_line(args: list[str], needle: str, tmp_path: Path) -> None:
    """The console script (not CliRunner, which skips `main`) prints Typer's usage errors as one line."""
    import subprocess

    done = subprocess.run([sys.executable, "-m", "deflect", *args], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert done.returncode == 2 and done.stdout == "", done
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("deflect: error: ") and needle in lines[0], done.stderr
    assert "--help" in lines[0]


def test_the_package_and_the_command_load_torch_only_when_used(tmp_path: Path) -> None:
    """`import deflect`, `deflect --help` and `deflect runs` stay light (so the command's own Ctrl-C
    handler is in place before torch loads, and listing runs takes a second, not five); the public
    names still resolve, and `deflect.train` is both the training function (callable, with its
    signature) and the package (`import deflect.train.losses as losses` works)."""
    import subprocess
    from importlib.metadata import entry_points

    probe = """
import sys
import deflect
assert "torch" not in sys.modules, "import deflect loaded torch"
import deflect.cli
assert "torch" not in sys.modules, "import deflect.cli loaded torch"
from typer.testing import CliRunner
listed = CliRunner().invoke(deflect.cli.app, ["runs", "--db", "runs.db"])
assert listed.exit_code == 0 and "no runs yet" in listed.stdout, listed.output
assert "torch" not in sys.modules, "deflect runs loaded torch"
import inspect
import deflect.train.losses as losses
import deflect.train.grow
from deflect.train import runner
from deflect import DeflectError, Store, TrainConfig, load_dataset, load_set, make_config, train
assert train is deflect.train and callable(train) and deflect.train.losses is losses
assert deflect.train.grow.growth_loss and deflect.train.train is runner.train
assert inspect.signature(train) == inspect.signature(runner.train)
import pickle
assert pickle.loads(pickle.dumps(train)) is train  # by name, for process pools
try:
    train(TrainConfig(n=1), Store("runs.db"))
except DeflectError as exc:  # the call reached the training function's own check
    assert "--n must be at least 2" in str(exc), exc
else:
    raise AssertionError("train(n=1) did not refuse")
assert Store.__name__ == "Store" and TrainConfig.__name__ == "TrainConfig"
try:
    deflect.no_such_name
except AttributeError as exc:
    assert "no_such_name" in str(exc)
else:
    raise AssertionError("an unknown name resolved")
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "deflect"]
    assert script.value == "deflect.launch:main"  # the entry point that owns the Ctrl-C handler


def test_command_help_paragraphs_flow_at_any_width() -> None:
    """A docstring's source line breaks must not survive into the help: at 200 columns a paragraph
    that spans several source lines is one line, at 80 it wraps without ragged short lines."""
    from deflect.cli import app

    wide = CliRunner().invoke(app, ["grow", "--help"], terminal_width=200, env={"COLUMNS": "200"})
    assert wide.exit_code == 0
    assert any("The grown set is a new run that records its parent." in line for line in wide.output.splitlines())
    narrow = CliRunner().invoke(app, ["evaluate", "--help"], terminal_width=80, env={"COLUMNS": "80"})
    lines = [line.strip() for line in narrow.output.splitlines()]
    start = next(i for i, line in enumerate(lines) if line.startswith("Example:"))
    assert len(lines[start]) > 60, lines[start: start + 3]  # filled to the width, not cut at a source break


def test_train_warns_when_the_schedule_never_reaches_the_pair_terms(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The presets start the transfer terms at epoch 2: a 1-epoch disjoint run would pass for a disjoint set."""
    from deflect.config import make_config
    from deflect.train.losses import idle_terms

    assert idle_terms(make_config(n=3, dataset="digits", epochs=1)) == [("transfer loss 1", 2), ("transfer loss 2", 2)]
    assert idle_terms(make_config(n=3, dataset="digits", epochs=2)) == []
    assert idle_terms(make_config(n=3, dataset="digits", epochs=1, method="independent")) == []
    assert idle_terms(make_config(n=3, dataset="digits", epochs=1, w_transfer1=0.0, w_transfer2=0.0)) == []
    db = str(tmp_path / "w.db")
    short = runner.invoke(app, ["train", "--n", "2", "--epochs", "1", "--limit", "128", "--db", db])
    assert short.exit_code == 0, short.output
    assert ("deflect: warning: transfer loss 1 (from epoch 2) and transfer loss 2 (from epoch 2) never switch on "
            "in 1 epoch; use --epochs 2 or more for a disjoint set") in short.stderr
    full = runner.invoke(app, ["train", "--n", "2", "--epochs", "2", "--limit", "128", "--db", db])
    assert full.exit_code == 0 and "warning" not in full.stderr

    import deflect.adaptive

    def stop(*args: object, **kwargs: object) -> None:  # the warning comes before any work
        raise DeflectError("stopped here")

    from deflect.errors import DeflectError

    monkeypatch.setattr(deflect.adaptive, "evaluate_adaptive", stop)
    aware = runner.invoke(app, ["evaluate", full.stdout.strip(), "--adaptive", "--attackers", "method-aware",
                                "--aware-epochs", "1", "--db", db])
    assert aware.exit_code == 2
    assert ("deflect: warning: transfer loss 1 (from epoch 2) and transfer loss 2 (from epoch 2) never switch on in "
            "1 epoch; use --aware-epochs 2 or more for the method-aware attacker's set") in aware.stderr
    other = runner.invoke(app, ["evaluate", full.stdout.strip(), "--adaptive", "--attackers", "transfer",
                                "--aware-epochs", "1", "--db", db])
    assert other.exit_code == 2 and "warning" not in other.stderr  # no method-aware set is trained


@pytest.mark.parametrize("width", [70, 80, 100, 120])
def test_runs_table_never_cuts_a_run_id(width: int) -> None:
    """Long ids (fashion-mnist) beside long method labels (a helper run's role): when the rows do not
    fit, the rules go and the method is cut or dropped, so every id stays whole on one line."""
    from types import SimpleNamespace

    from rich.console import Console

    from deflect.console import runs_table

    def run(run_id: str, method: str, role: str | None, status: str) -> SimpleNamespace:
        return SimpleNamespace(id=run_id, method=method, config={"role": role} if role else {}, dataset="fashion-mnist",
                               arch="cnn", n=3, status=status, epochs_done=8, epochs_total=8, clean_acc=[88.0, 89.0],
                               created=__import__("datetime").datetime(2026, 12, 7, 22, 0))

    runs = [run("fashion-mnist-disjoint-n3-d0d194", "disjoint", None, "interrupted"),
            run("fashion-mnist-independent-n2-ced628", "independent", "static-adversary", "finished")]
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(runs_table(runs, {"fashion-mnist-disjoint-n3-d0d194": 81.25}, width=width))
    text = console.export_text()
    assert all(len(line) <= width for line in text.splitlines()), text
    for r in runs:
        line = next(line for line in text.splitlines() if r.id in line)  # whole, on one line
        assert r.status in line and ("88.5" in line or width < 80), text
    assert "81.2" in text and ("independent (static-adversary)" in text) == (width >= 120), text
    assert ("method" in text) == (width >= 80), text  # the method goes first, cut before it is dropped


def test_heatmap_of_a_long_row_label_lays_out_without_warning(tmp_path: Path) -> None:
    """A static adversary's row ('static:RUN') made matplotlib warn twice on `export`."""
    import warnings

    from deflect.report import heatmap_png

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        heatmap_png([[40.0, 60.0]], tmp_path / "h.png", "t", row_labels=["static:fashion-mnist-independent-n2-ced628"])
    assert (tmp_path / "h.png").stat().st_size > 1000


def test_each_sweep_keeps_its_own_figure(tmp_path: Path) -> None:
    """A second ε sweep of a run wrote over the first one's PNG (other figures carry their evaluation's id)."""
    from deflect.pipeline import RunEvaluator
    from deflect.store import Store

    db = str(tmp_path / "deflect.db")
    run_id = runner.invoke(app, ["train", "--n", "2", "--epochs", "2", "--limit", "128", "--db", db]).stdout.strip()
    ev = RunEvaluator(Store(tmp_path / "deflect.db"), run_id, limit=20)
    first = ev.sweep([0.05, 0.1], 1)[1]
    second = ev.sweep([0.1, 0.2], 1)[1]
    figures = tmp_path / "runs" / run_id / "figures"
    assert sorted(p.name for p in figures.glob("eps-sweep*.png")) == sorted(
        f"eps-sweep-{e.id}.png" for e in (first, second))


def test_bench_says_what_it_times_on_a_cpu_and_logs_its_phases(monkeypatch: pytest.MonkeyPatch) -> None:
    """`bench --preset paper-cifar10 --quick` on a CPU kept the batch of 128 and printed nothing to a log
    for many minutes: its batch drops to 16 there, a warning says a ResNet takes minutes, and each
    phase is a line when stderr is not a terminal."""
    import deflect.bench as bench

    seen: dict[str, object] = {}

    def fake_run(settings, progress):  # the figures themselves are test_fast's
        seen["settings"] = settings
        for phase in ("training steps, n=3", "growing one model against frozen ones"):
            progress(phase)
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "run_bench", fake_run)
    result = runner.invoke(app, ["bench", "--preset", "paper-cifar10", "--quick", "--device", "cpu"])
    assert result.exit_code == 130
    assert seen["settings"].batch_size == 16 and seen["settings"].matrix_images == 32
    assert "deflect: warning: --preset paper-cifar10 times a preact-resnet18 on the CPU" in result.stderr
    assert "bench: training steps, n=3\nbench: growing one model against frozen ones" in result.stderr
    runner.invoke(app, ["bench", "--preset", "fashion-mnist", "--quick", "--device", "cpu"])
    assert seen["settings"].batch_size == 128  # a small CNN's preset keeps its batch


def test_limit_below_the_batch_names_the_batch_size(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "--limit", "10", "--db", str(tmp_path / "x.db")])
    assert result.exit_code == 2
    assert result.stderr.strip() == "deflect: error: --limit must be at least the batch size (64; --batch-size), got 10"
    from deflect.store import Store

    assert not (tmp_path / "x.db").exists() or not Store(tmp_path / "x.db").list_runs()


def test_cw_rows_stored_before_unfooled_key_as_the_clean_convention() -> None:
    """An old CW/EAD row returned clean images for samples never fooled by κ: it must not pass for
    today's default (the last iterate) in settings, nor an attack without a κ be given one."""
    from deflect.attacks import default_params
    from deflect.console import runs_table
    from deflect.store import Evaluation, settings_key

    old = {k: v for k, v in default_params("cw2", "digits").items() if k != "unfooled"}
    now = default_params("cw2", "digits")
    stored = Evaluation(run_id="r", kind="transfer", attack="cw2", params={**old, "split": "val"})
    assert json.loads(settings_key(stored)) == {**old, "unfooled": "clean"}
    assert settings_key(Evaluation(run_id="r", kind="transfer", attack="cw2", params=now)) == json.dumps(
        now, sort_keys=True)
    pgd = default_params("pgd1", "digits")
    assert json.loads(settings_key(Evaluation(run_id="r", kind="transfer", attack="pgd1", params=pgd))) == pgd
    assert runs_table([], {}, width=80).row_count == 0  # no rows, no crash
