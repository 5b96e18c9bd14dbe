"""`deflect reproduce`: trains, evaluates, reports, and continues where it stopped (tiny digits plan)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deflect.cli import app
from deflect.reproduce import SetSpec, make_plan, reproduce
from deflect.store import Store
from deflect.train import Callbacks


def tiny_plan():
    return dataclasses.replace(
        make_plan("digits", quick=True),
        sets=(SetSpec("independent n=2", 2, "independent", {"width": 8}),
              SetSpec("disjoint n=3", 3, overrides={"width": 8}),
              SetSpec("adp n=2", 2, "adp", {"width": 8}),
              SetSpec("disjoint n=3, no angle", 3, overrides={"width": 8, "w_angle": 0.0}, ablation=True)),
        attacks=("fgsm",), limit=60, train_limit=320, epochs=2, sweep_steps=2, tsne_images=40,
    )


def test_reproduce_writes_the_report_and_resumes(tmp_path: Path) -> None:
    store = Store(tmp_path / "deflect.db")
    plan = tiny_plan()

    def stop_in_epoch_2(event) -> None:  # an interruption during the second set's second epoch
        if event.epoch == 2 and len(store.list_runs()) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        reproduce(store, "digits", out=tmp_path / "results", plan=plan, callbacks=Callbacks(on_batch=stop_in_epoch_2))
    interrupted = store.list_runs()[1]
    assert interrupted.status == "interrupted" and interrupted.epochs_done == 1

    said: list[str] = []
    path = reproduce(store, "digits", out=tmp_path / "results", plan=plan, say=said.append)
    runs = store.list_runs()
    assert len(runs) == 4  # the interrupted set was resumed, not trained again
    assert store.get_run(interrupted.id).status == "finished"
    assert any(f"resuming {interrupted.id}" in s for s in said)
    assert not any(s.startswith("independent n=2: training") for s in said)  # finished sets are reused
    text = path.read_text()
    assert path.name == "digits-quick.md"
    for heading in ("Sets and clean accuracy", "Black-box accuracy", "Whole-set accuracy", "Ensemble attack",
                    "Ablations (Table 6)", "ε sweep (Figure 5)", "Gradient t-SNE"):
        assert heading in text, heading
    ev = store.evaluations(runs[1].id, "transfer")[-1]
    assert f"{ev.blackbox_mean:.1f} ± {ev.blackbox_std:.1f}" in text  # the stored numbers, not others
    assert (tmp_path / "results" / "digits-quick-eps-sweep.png").stat().st_size > 0
    assert (tmp_path / "results" / "digits-quick-tsne-disjoint-n3.png").stat().st_size > 0

    before = len(store.evaluations())
    reproduce(store, "digits", out=tmp_path / "results", plan=plan, say=said.append)
    assert len(store.list_runs()) == 4 and len(store.evaluations()) == before  # nothing redone


def test_reproduce_cli_rejects_an_unknown_preset() -> None:
    result = CliRunner().invoke(app, ["reproduce", "--preset", "imagenet"])
    assert result.exit_code == 2 and "unknown preset 'imagenet'" in result.output
