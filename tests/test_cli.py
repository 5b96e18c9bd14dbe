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

from deflect.cli import app
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
    listed = runner.invoke(app, ["runs", "--json"])
    rows = json.loads(listed.stdout)
    assert [r["id"] for r in rows] == [run_id] and rows[0]["status"] == "finished"
    assert (tmp_path / "runs" / run_id / "model_1.safetensors").exists()
    table = runner.invoke(app, ["runs"]).stdout  # not a terminal: whole rows, not 80 folded columns
    row = next(line for line in table.splitlines() if run_id in line)
    assert all(cell in row for cell in ("disjoint", "digits", "finished", "1/1")), table


def _one_line_error(args: list[str], needle: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert "Traceback" not in result.output


def test_bad_arguments_give_one_line_and_exit_2(tmp_path: Path) -> None:
    _one_line_error(["train", "--n", "1"], "--n must be at least 2")
    _one_line_error(["train", "--dataset", "imagenet"], "unknown dataset")
    _one_line_error(["train", "--resume", "no-such-run"], "no run 'no-such-run'")
    _one_line_error(["train", "--preset", "huge"], "unknown preset")
    (tmp_path / "junk.db").write_bytes(b"this is not sqlite" * 100)
    _one_line_error(["runs", "--db", str(tmp_path / "junk.db")], "not a deflect database")
    assert (tmp_path / "junk.db").read_bytes() == b"this is not sqlite" * 100


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stdout_is_tty", [False, True])
def test_results_reach_standard_output_behind_a_live_bar(monkeypatch: pytest.MonkeyPatch, stdout_is_tty: bool) -> None:
    """While a bar is live on a terminal Rich swaps sys.stdout for a proxy that writes to the bar's
    console (stderr): results must still reach the real standard output when it is a file or pipe."""
    monkeypatch.delenv("COLUMNS", raising=False)
    live_file, real = io.StringIO(), _Tty() if stdout_is_tty else io.StringIO()
    live = Console(file=live_file)
    monkeypatch.setattr(sys, "stdout", FileProxy(live, real))
    result_console(live).print("fgsm: black-box 88.8")
    assert ("fgsm: black-box 88.8" in live_file.getvalue()) is stdout_is_tty
    assert ("fgsm: black-box 88.8" in real.getvalue()) is not stdout_is_tty
