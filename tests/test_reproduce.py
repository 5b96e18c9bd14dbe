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
              SetSpec("disjoint n=3, no angle", 3, overrides={"width": 8, "w_angle": 0.0}, ablation=True),
              SetSpec("disjoint n=3 grown to 4", 4, grow_from="disjoint n=3", ablation=True)),
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
    assert len(runs) == 5  # the interrupted set was resumed, not trained again
    assert store.get_run(interrupted.id).status == "finished"
    assert any(f"resuming {interrupted.id}" in s for s in said)
    assert not any(s.startswith("independent n=2: training") for s in said)  # finished sets are reused
    text = path.read_text()
    assert path.name == "digits-quick.md"
    for heading in ("Sets and clean accuracy", "Black-box accuracy", "Whole-set accuracy", "Ensemble attack",
                    "Ablations (Table 6)", "ε sweep (Figure 5)", "Gradient t-SNE", "Targets",
                    "Ensemble size (Figure 6)", "Larger sets (Table 7)", "Beyond the budget"):
        assert heading in text, heading
    grown = next(r for r in runs if r.config.get("reproduce", "").endswith("grown to 4"))
    assert grown.n == 4 and grown.config["parent"] == runs[1].id  # grown from the plan's disjoint n=3 set
    assert "3 frozen + 1 grown one at a time" in text
    ensemble = [e for e in store.evaluations(runs[1].id, "ensemble") if e.attack == "pgd2"][-1]
    assert f"{ensemble.whole_set_mean:.1f}" in text.split("Ensemble size (Figure 6)")[1].split("##")[0]
    target = next(line for line in text.splitlines() if line.startswith("| disjoint n=3: every m < n"))
    worst = min([ensemble.extra["mean_unowned"], *[e.blackbox_mean for e in store.evaluations(runs[1].id, "transfer")
                                                  if e.attack == "pgd2"]])
    assert f"lowest {worst:.1f}" in target and ("| met |" in target) == (worst >= 85.0)
    ev = store.evaluations(runs[1].id, "transfer")[-1]
    assert f"{ev.blackbox_mean:.1f} ± {ev.blackbox_std:.1f}" in text  # the stored numbers, not others
    assert (tmp_path / "results" / "digits-quick-eps-sweep.png").stat().st_size > 0
    assert (tmp_path / "results" / "digits-quick-tsne-disjoint-n3.png").stat().st_size > 0
    assert (tmp_path / "results" / "digits-quick-ensemble-size.png").stat().st_size > 0

    before = len(store.evaluations())
    reproduce(store, "digits", out=tmp_path / "results", plan=plan, say=said.append)
    assert len(store.list_runs()) == 5 and len(store.evaluations()) == before  # nothing redone

    # a recipe changed since (a preset update, say): that set is trained again and the set grown
    # from it grown again; the others are reused
    changed = dataclasses.replace(plan, sets=tuple(
        dataclasses.replace(spec, overrides={**spec.overrides, "w_transfer2": 0.25}) if spec.label == "disjoint n=3"
        else spec for spec in plan.sets))
    said.clear()
    reproduce(store, "digits", out=tmp_path / "results", plan=changed, say=said.append)
    runs = store.list_runs()
    assert len(runs) == 7 and runs[5].config["w_transfer2"] == 0.25 and runs[6].config["parent"] == runs[5].id
    assert any(s.startswith("disjoint n=3: training") for s in said)
    assert not any(s.startswith(("independent n=2: training", "adp n=2: training")) for s in said)


def test_reproduce_cli_rejects_an_unknown_preset() -> None:
    result = CliRunner().invoke(app, ["reproduce", "--preset", "imagenet"])
    assert result.exit_code == 2 and "unknown preset 'imagenet'" in result.output
