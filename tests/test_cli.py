"""The command line: training end to end, listing runs, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from deflect.cli import app
from deflect.store import Store

runner = CliRunner()
TINY = ["--epochs", "1", "--limit", "256"]


def test_train_prints_run_id_and_runs_lists_it(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "--n", "2", *TINY])
    assert result.exit_code == 0, result.output
    run_id = result.stdout.strip().splitlines()[-1]
    assert run_id.startswith("digits-disjoint-n2-")
    listed = runner.invoke(app, ["runs", "--json"])
    rows = json.loads(listed.stdout)
    assert [r["id"] for r in rows] == [run_id] and rows[0]["status"] == "finished"
    assert (tmp_path / "runs" / run_id / "model_1.safetensors").exists()


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


def test_killed_run_is_marked_interrupted_and_resumes(tmp_path: Path) -> None:
    db = tmp_path / "deflect.db"
    env = {**os.environ, "DEFLECT_DB": str(db)}
    cmd = [sys.executable, "-m", "deflect", "train", "--n", "2", "--epochs", "6", "--limit", "640"]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            time.sleep(0.5)
            runs = Store(db).list_runs() if db.exists() else []
            if runs and runs[0].epochs_done >= 1:
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    run = Store(db).list_runs()[0]
    assert run.status == "interrupted" and 1 <= run.epochs_done < 6
    result = runner.invoke(app, ["train", "--resume", run.id[:24], "--db", str(db)])
    assert result.exit_code == 0, result.output
    done = Store(db).get_run(run.id)
    assert done.status == "finished" and done.epochs_done == 6
    assert [m.epoch for m in Store(db).epochs(run.id)] == list(range(1, 7))
