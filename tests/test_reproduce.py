"""`deflect reproduce`: trains, evaluates, reports, and continues where it stopped (tiny digits plan)."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deflect.cli import app
from deflect.errors import DeflectError
from deflect.pipeline import RunEvaluator
from deflect.reproduce import SetSpec, make_plan, reproduce
from deflect.store import Store
from deflect.train import Callbacks
from tests.test_reliability import _one_line_error


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

    # a report of the reproduction under way: what is stored, the rest pending, nothing trained
    result = CliRunner().invoke(app, ["reproduce", "--preset", "digits", "--report-only", "--db", str(store.path),
                                      "--out", str(tmp_path / "partial")])
    assert result.exit_code == 2 and "no set of the digits reproduction is finished" in result.output  # its own plan
    partial = reproduce(store, "digits", out=tmp_path / "partial", plan=plan, report_only=True).read_text()
    assert len(store.list_runs()) == 2 and store.get_run(interrupted.id).status == "interrupted"
    assert "this report: `--report-only`, from the stored sets" in partial and "torch threads" not in partial
    assert "1 of 5 sets finished; pending: disjoint n=3, adp n=2, disjoint n=3, no angle, disjoint n=3 grown to 4" \
        in partial
    first = [e for e in store.evaluations(store.list_runs()[0].id, "transfer") if e.attack == "fgsm"][-1]
    assert f"{first.blackbox_mean:.1f} ± {first.blackbox_std:.1f}" in partial

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
                    "Ensemble size (Figure 6)", "Larger sets (Table 7)", "Beyond the budget", "## Recipe"):
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
    cfg = runs[1].config
    assert f"| transfer loss 2 (ε2·tanh ∇) | ε2 = {cfg['eps2']:g}, weight {cfg['w_transfer2']:g}," in text
    assert "[digits-preset.md](digits-preset.md)" in text  # where the preset's choices are recorded
    tsne = next(e for e in store.evaluations(runs[1].id, "tsne"))
    row = next(line for line in text.split("Gradient t-SNE")[1].splitlines() if line.startswith("| disjoint n=3"))
    assert 0.0 <= tsne.extra["neighbour_agreement"] <= 1.0 and tsne.extra["chance"] == pytest.approx(1 / 3)
    assert row.startswith(f"| disjoint n=3 | {tsne.extra['neighbour_agreement']:.2f} | 0.33 |")
    assert (tmp_path / "results" / "digits-quick-ensemble-size.png").stat().st_size > 0

    before = len(store.evaluations())
    reproduce(store, "digits", out=tmp_path / "results", plan=plan, say=said.append)
    assert len(store.list_runs()) == 5 and len(store.evaluations()) == before  # nothing redone

    # a user's own evaluations at other settings, newer than the plan's: the report keeps the plan's
    # numbers and ε columns, and an override at the plan's size does not pass for the plan's evaluation
    user = RunEvaluator(store, runs[1].id, limit=plan.limit)
    user.transfer("fgsm", {"eps": 0.01})
    user.transfer("fgm", {"eps": 0.05})
    user.sweep([0.05, 0.1, 0.2], 2)
    said.clear()
    again = reproduce(store, "digits", out=tmp_path / "again", plan=dataclasses.replace(plan, attacks=("fgsm", "fgm")),
                      say=said.append).read_text()
    # fgm at the plan's ε on every set but the ablations (they take the plan's ablation attack only)
    assert said == [f"{spec.label}: fgm transfer matrix" for spec in plan.sets if not spec.ablation]
    sweep_rows = again.split("ε sweep (Figure 5)")[1].split("##")[0]
    assert sweep_rows == text.split("ε sweep (Figure 5)")[1].split("##")[0]
    fgsm_row = next(line for line in text.split("Black-box accuracy")[1].splitlines() if line.startswith("| fgsm"))
    assert fgsm_row in again
    noted = reproduce(store, "digits", out=tmp_path / "noted", plan=dataclasses.replace(plan, attacks=("fgsm", "cw2")),
                      report_only=True).read_text()  # the report says what an unbounded attack sends
    assert "sent as their last iterate" in noted and "sent as their last iterate" not in again
    user.transfer("cw2", {"steps": 2})  # cw2 at other settings only, on the disjoint set: a '-' that says why
    noted = reproduce(store, "digits", out=tmp_path / "noted", plan=dataclasses.replace(plan, attacks=("fgsm", "cw2")),
                      report_only=True).read_text()
    assert "Stored only at other settings than the plan's" in noted and "cw2 (disjoint n=3)" in noted
    assert "cw2 (independent n=2)" not in noted and "Stored only at other settings" not in again
    plan_fgm = [e for e in store.evaluations(runs[1].id, "transfer") if e.attack == "fgm"][-1]
    assert plan_fgm.params["eps"] != 0.05 and f"{plan_fgm.blackbox_mean:.1f} ± {plan_fgm.blackbox_std:.1f}" in again

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
    _one_line_error(["reproduce", "--preset", "imagenet"], "unknown preset 'imagenet'", strict=True)


def test_full_fashion_mnist_plan_runs_its_ablations_at_the_quick_scale() -> None:
    plan = make_plan("fashion-mnist")
    main = [s for s in plan.sets if not s.ablation]
    ablations = [s for s in plan.sets if s.ablation]
    assert [s.label for s in main] == ["independent n=3", "disjoint n=3", "disjoint n=5", "disjoint n=8",
                                       "fast-at n=3", "adp n=3"]
    assert all(plan.scale(s) == (None, None) for s in main)  # the preset's 60k images and 8 epochs
    assert all(plan.scale(s) == (20000, 3) for s in ablations)
    labels = [s.label for s in ablations]
    assert labels[0] == "disjoint n=3, all terms" and "disjoint n=5, 3 sampled" in labels
    grown = next(s for s in ablations if s.grow_from)
    assert grown.grow_from == "disjoint n=3, all terms" and grown.n == 5  # grown at the ablations' scale
    assert plan.ablation_attack == "pgd2"
    for other in (make_plan("fashion-mnist", quick=True), make_plan("paper-cifar10"), make_plan("digits")):
        assert other.ablation_scale is None and all(other.scale(s) == (other.train_limit, other.epochs)
                                                    for s in other.sets)


def test_reproduce_with_two_jobs_trains_sets_side_by_side(tmp_path: Path) -> None:
    """Two worker processes: every set once, the grown one after its parent, ablations at their own scale."""
    store = Store(tmp_path / "deflect.db")
    plan = dataclasses.replace(
        make_plan("digits", quick=True),
        sets=(SetSpec("independent n=2", 2, "independent", {"width": 8}),
              SetSpec("disjoint n=3", 3, overrides={"width": 8}),
              SetSpec("disjoint n=3, all terms", 3, overrides={"width": 8}, ablation=True),
              SetSpec("disjoint n=3, no angle", 3, overrides={"width": 8, "w_angle": 0.0}, ablation=True),
              SetSpec("disjoint n=3 grown to 4", 4, grow_from="disjoint n=3, all terms", ablation=True)),
        attacks=("pgd2",), limit=60, train_limit=320, epochs=2, sweep_steps=2, tsne_images=40,
        ablation_scale=(160, 1),
    )
    bars: dict[str, int] = {}

    def callbacks_for(label: str) -> Callbacks:
        return Callbacks(on_batch=lambda event: bars.__setitem__(label, bars.get(label, 0) + 1))

    said: list[str] = []
    path = reproduce(store, "digits", out=tmp_path / "results", plan=plan, jobs=2, say=said.append,
                     callbacks_for=callbacks_for)
    runs = {r.config["reproduce"].split("/")[-1]: r for r in store.list_runs()}
    assert sorted(runs) == sorted(s.label for s in plan.sets) and all(r.status == "finished" for r in runs.values())
    assert runs["disjoint n=3 grown to 4"].config["parent"] == runs["disjoint n=3, all terms"].id
    for label in ("independent n=2", "disjoint n=3"):
        assert (runs[label].config["train_limit"], runs[label].epochs_done) == (320, 2)
    for label in ("disjoint n=3, all terms", "disjoint n=3, no angle"):
        assert (runs[label].config["train_limit"], runs[label].epochs_done) == (160, 1)
        assert bars[label] > 0  # each set's progress reached the parent's callbacks, under its own label
    assert any(s.startswith("disjoint n=3, no angle: pgd2 transfer matrix") for s in said)
    text = path.read_text()
    assert "--jobs 2" in text and "2 sets at a time" in text
    table6 = text.split("## Ablations (Table 6)")[1].split("\n## ")[0]
    assert "trained on 160 training images for 1 epoch (" in table6 and "disjoint n=3 (all terms)" not in table6
    base = [e for e in store.evaluations(runs["disjoint n=3, all terms"].id, "transfer") if e.attack == "pgd2"][-1]
    assert f"| disjoint n=3, all terms | {base.blackbox_mean:.1f} ± {base.blackbox_std:.1f}" in table6
    table7 = text.split("## Larger sets (Table 7)")[1].split("\n## ")[0]
    assert "| disjoint n=3, all terms |" in table7 and "| disjoint n=3 |" not in table7  # one scale per table

    before = len(store.evaluations())  # the same plan on one job finds everything stored
    reproduce(store, "digits", out=tmp_path / "results", plan=plan, say=said.append)
    assert len(store.list_runs()) == 5 and len(store.evaluations()) == before


def test_reproduce_rejects_zero_jobs(tmp_path: Path) -> None:
    _one_line_error(["reproduce", "--preset", "digits", "--jobs", "0", "--db", str(tmp_path / "d.db")],
                    "--jobs must be at least 1", strict=True)


def test_a_failing_set_stops_the_set_training_beside_it(tmp_path: Path) -> None:
    """One worker's error ends the reproduction at once: the other set is interrupted, not awaited."""
    store = Store(tmp_path / "deflect.db")
    plan = dataclasses.replace(  # "long" trains 200 epochs; "broken" fails after "short" (1 epoch) beside it
        make_plan("digits", quick=True),
        sets=(SetSpec("long", 3, overrides={"width": 8}),
              SetSpec("short", 2, "independent", {"width": 8}, ablation=True),
              SetSpec("broken", 2, overrides={"width": 0}, ablation=True)),
        attacks=("fgsm",), limit=60, train_limit=320, epochs=200, sweep_steps=2, tsne_images=40,
        ablation_scale=(320, 1),
    )
    with pytest.raises(DeflectError, match="--width must be at least 1"):
        reproduce(store, "digits", out=tmp_path / "results", plan=plan, jobs=2)
    runs = {r.config["reproduce"].split("/")[-1]: r for r in store.list_runs()}
    assert runs["short"].status == "finished"
    assert runs["long"].status == "interrupted" and runs["long"].epochs_done < 200  # stopped, resumable


KILLED_PARENT = """
import dataclasses, sys
from deflect.reproduce import SetSpec, make_plan, reproduce
from deflect.store import Store
if __name__ == "__main__":
    plan = dataclasses.replace(make_plan("digits", quick=True),
        sets=(SetSpec("a", 3, overrides={"width": 8}), SetSpec("b", 3, overrides={"width": 8, "seed": 1})),
        attacks=("fgsm",), limit=60, train_limit=320, epochs=500, sweep_steps=2, tsne_images=40)
    reproduce(Store(sys.argv[1]), "digits", out=sys.argv[2], plan=plan, jobs=2)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_workers_stop_when_the_reproduction_is_killed(tmp_path: Path) -> None:
    """SIGKILL leaves the parent no cleanup: the workers notice at their next batch and stop."""
    script, db = tmp_path / "repro.py", tmp_path / "deflect.db"
    script.write_text(KILLED_PARENT)
    parent = subprocess.Popen([sys.executable, str(script), str(db), str(tmp_path / "results")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # both sets training, one epoch stored each
            runs = Store(db).list_runs() if db.exists() else []
            if len(runs) == 2 and all(r.epochs_done >= 1 for r in runs):
                break
            time.sleep(0.5)
        else:
            pytest.fail("the two sets never started training")
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(_alive(r.pid) for r in Store(db).list_runs()):
        time.sleep(0.5)
    runs = Store(db).list_runs()
    assert not any(_alive(r.pid) for r in runs)  # no orphan kept training
    assert all(r.status == "interrupted" and 1 <= r.epochs_done < 500 for r in runs)


def test_reproduce_at_another_width_names_its_report_after_it(tmp_path: Path) -> None:
    """`--width` trains every set's small CNN at that width; the report sits beside the preset's own."""
    store = Store(tmp_path / "deflect.db")
    plan = dataclasses.replace(
        make_plan("digits", quick=True, width=6),
        sets=(SetSpec("independent n=2", 2, "independent"), SetSpec("disjoint n=2", 2)),
        attacks=("fgsm",), limit=40, train_limit=200, epochs=1, sweep_steps=2, tsne_images=20)
    path = reproduce(store, "digits", out=tmp_path, plan=plan)
    assert path.name == "digits-quick-w6.md"
    assert {run.config["width"] for run in store.list_runs()} == {6}
    text = path.read_text()
    assert text.startswith("# digits: a measured reproduction (quick, width 6)")
    assert "Command: `deflect reproduce --preset digits --quick --width 6`" in text
    assert "| architecture | cnn, width 6 (`--width`) |" in text
    assert make_plan("digits", quick=True).name == "digits-quick"  # the preset's own report keeps its name

    for args, message in ((["--preset", "paper-cifar10", "--width", "8"], "the paper-cifar10 preset trains"),
                          (["--preset", "digits", "--width", "0"], "--width must be at least 1")):
        result = CliRunner().invoke(app, ["reproduce", *args, "--db", str(tmp_path / "other.db")])
        assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "other.db").exists() or not Store(tmp_path / "other.db").list_runs()
