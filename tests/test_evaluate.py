"""Transfer matrices, ensembles, sweeps and t-SNE: values checked against direct computations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import deflect
from deflect.attacks import make_attack
from deflect.attacks.base import Ensemble
from deflect.cli import app
from deflect.data import ImageTensorDataset
from deflect.evaluate import (
    ensemble_matrix,
    eps_sweep,
    gradient_signs,
    gradient_tsne,
    model_subsets,
    neighbour_agreement,
    select_subset,
    sweep_eps_values,
    task_seed,
    transfer_matrix,
)
from deflect.inference import inference_copy
from deflect.runtime import fast_cpu_math
from deflect.store import Evaluation, Store
from deflect.train import train
from tests.conftest import tiny_config

runner = CliRunner()


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A tiny trained 3-model digits run: (database, run id)."""
    db = tmp_path_factory.mktemp("small") / "deflect.db"
    return db, train(tiny_config(n=3, epochs=3, train_limit=640), Store(db))


@pytest.fixture(scope="module")
def small_set(small_run: tuple[Path, str]) -> tuple[list[torch.nn.Module], ImageTensorDataset]:
    db, run_id = small_run
    test = select_subset(deflect.load_dataset("digits", "test"), 96)
    return deflect.load_set(run_id, Store(db)), test


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return 100.0 * (model(x).argmax(1) == y).float().mean().item()


def test_matrix_shape_diagonal_and_summaries(small_set) -> None:
    models, test = small_set
    attack = make_attack("fgsm", "digits")
    res = transfer_matrix(models, test, attack, batch_size=40)
    m = np.array(res.matrix)
    assert m.shape == (3, 3) and res.n_examples == 96
    x, y = test.batch(torch.arange(len(test)))
    for i, model in enumerate(models):
        assert res.clean[i] == pytest.approx(_accuracy(model, x, y), abs=1e-4)
        x_adv = attack(model, x, y)  # a separate white-box run on the same images
        assert m[i, i] == pytest.approx(_accuracy(model, x_adv, y), abs=1e-4)
        assert m[i, (i + 1) % 3] == pytest.approx(_accuracy(models[(i + 1) % 3], x_adv, y), abs=1e-4)
    off = m[~np.eye(3, dtype=bool)]
    assert res.blackbox_mean == pytest.approx(off.mean()) and res.blackbox_std == pytest.approx(off.std())
    assert res.whole_set_mean == pytest.approx(m.mean()) and res.whitebox_mean == pytest.approx(np.diag(m).mean())
    # Success rate: share of correctly classified clean images that the attack flips.
    with torch.no_grad():
        clean_ok = models[1](x).argmax(1) == y
        adv_ok = models[1](attack(models[0], x, y)).argmax(1) == y
    expected = 100.0 * (clean_ok & ~adv_ok).sum().item() / clean_ok.sum().item()
    assert res.success[0][1] == pytest.approx(expected)


def test_pgd_whitebox_breaks_every_model(small_set) -> None:
    models, test = small_set
    res = transfer_matrix(models, test, "pgd1", dataset="digits")
    assert max(np.diag(res.matrix)) <= 20.0
    again = transfer_matrix(models, test, "pgd1", dataset="digits")
    assert again.matrix == res.matrix  # seeded: the same numbers twice


def test_ensemble_of_one_equals_single_model_attack(small_set) -> None:
    models, test = small_set
    single = transfer_matrix(models, test, "mifgsm1", dataset="digits")
    ens = ensemble_matrix(models, test, "mifgsm1", 1, dataset="digits")
    assert ens.subsets == [(0,), (1,), (2,)]
    assert ens.matrix == single.matrix
    pairs = ensemble_matrix(models, test, "pgd1", 2, dataset="digits")
    assert len(pairs.matrix) == 3 and all(len(r) == 3 for r in pairs.matrix)
    # The attacked ensemble's own members fall much lower than the model left out.
    assert pairs.mean_owned < pairs.mean_unowned
    assert model_subsets(8, 4, max_subsets=5, seed=1) == model_subsets(8, 4, max_subsets=5, seed=1)
    assert len(model_subsets(8, 4, max_subsets=5)) == 5


def test_ensemble_rows_are_attacks_on_the_averaged_logits_of_the_subset(small_set) -> None:
    """Row (0,1) of the m=2 matrix: every model's accuracy on the attack crafted against the logit
    average of models 0 and 1, with the task's own seed (batch 0, source row 0), not against model 0 alone."""
    models, test = small_set
    attack = make_attack("pgd1", "digits")
    res = ensemble_matrix(models, test, attack, 2, batch_size=len(test), seed=0)
    assert res.subsets == [(0, 1), (0, 2), (1, 2)] and res.n_examples == len(test)
    x, y = test.batch(torch.arange(len(test)))
    copies = [inference_copy(m, "cpu") for m in models]  # what the evaluation crafts on
    with fast_cpu_math():
        x_adv = attack.seeded(task_seed(0, 0, 0), "cpu")(Ensemble(copies[:2]), x, y)
        alone = attack.seeded(task_seed(0, 0, 0), "cpu")(copies[0], x, y)
    expected = [_accuracy(m, x_adv, y) for m in models]
    assert res.matrix[0] == pytest.approx(expected, abs=1e-4)
    # the pair's own member 1 falls far lower than when model 0 alone is attacked: the rows can tell
    assert _accuracy(models[1], alone, y) - expected[1] >= 10.0, (expected, _accuracy(models[1], alone, y))


def test_gradient_signs_are_each_models_own_cross_entropy_gradient(small_set) -> None:
    """The t-SNE's input: per model, sign(∇x CE(model_i(x), y)) of the chosen images, in order."""
    models, test = small_set
    signs = gradient_signs(models, test, n_images=40, seed=0)
    sub = select_subset(test, 40, 0)
    x, y = sub.batch(torch.arange(len(sub)))
    assert signs.shape == (3, 40, int(np.prod(x.shape[1:])))
    for i, model in enumerate(models):
        xv = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(model(xv), y, reduction="sum"), xv)
        expected = g.sign().flatten(1).numpy()
        assert (signs[i] == expected).mean() >= 0.999, i  # float rounding may flip a near-zero gradient
    assert (signs[0] != signs[1]).mean() > 0.1  # different models, different gradients


def test_eps_sweep_and_tsne(small_set) -> None:
    models, test = small_set
    sweep = eps_sweep(models, test, [0.02, 0.3], steps=10)
    assert [r.params["eps"] for r in sweep] == [0.02, 0.3]
    assert sweep[0].whole_set_mean > sweep[1].whole_set_mean
    assert sweep[1].params["alpha"] == pytest.approx(2.5 * 0.3 / 10)
    points, owners = gradient_tsne(models, test, n_images=40)
    assert points.shape == (120, 2) and list(np.bincount(owners)) == [40, 40, 40]


def test_each_tsne_evaluation_keeps_its_own_figure(digits_runs) -> None:
    """A t-SNE of another split or size writes its own PNG: the path an earlier evaluation stored still
    shows that evaluation's embedding."""
    from deflect.pipeline import RunEvaluator

    store, ids = digits_runs
    test_path, test_row = RunEvaluator(store, ids["disjoint"], split="test").tsne(30)
    before = test_path.read_bytes()
    val_path, val_row = RunEvaluator(store, ids["disjoint"], split="val").tsne(30)
    small_path, _ = RunEvaluator(store, ids["disjoint"], split="test").tsne(20)
    assert len({test_path, val_path, small_path}) == 3
    assert test_row.extra["png"] == str(test_path) and val_row.extra["png"] == str(val_path)
    assert test_path.read_bytes() == before and val_path.stat().st_size > 0


def test_neighbour_agreement_sees_separate_clusters_that_silhouette_misses() -> None:
    """Each model owning several far-apart clusters: agreement 1, silhouette near 0; mixed: chance."""
    from sklearn.metrics import silhouette_score

    rng = np.random.default_rng(0)
    centres = rng.uniform(-50, 50, size=(12, 2))
    owners = np.repeat(np.arange(3), 200)
    cluster = np.concatenate([rng.permutation(np.arange(k, 12, 3).repeat(50)) for k in range(3)])
    points = centres[cluster] + rng.normal(size=(600, 2))
    agreement, chance = neighbour_agreement(points, owners)
    assert agreement == pytest.approx(1.0, abs=0.01) and chance == pytest.approx(1 / 3)
    assert silhouette_score(points, owners) < 0.3
    mixed, _ = neighbour_agreement(points, rng.permutation(owners))
    assert abs(mixed - 1 / 3) < 0.05
    assert np.isnan(neighbour_agreement(points, np.zeros(600, dtype=int))[0])  # one model: nothing to mix


def test_disjoint_set_resists_transfer_on_digits(digits_runs) -> None:
    """The paper's claim on the default recipe: PGD crafted on one model transfers far less."""
    store, ids = digits_runs
    test = deflect.load_dataset("digits", "test")
    res = {m: transfer_matrix(deflect.load_set(r, store), test, "pgd1", dataset="digits") for m, r in ids.items()}
    for r in res.values():
        assert r.whitebox_mean <= 20.0
    assert res["disjoint"].blackbox_mean >= res["independent"].blackbox_mean + 25.0, (
        res["disjoint"].blackbox_mean, res["independent"].blackbox_mean)


def test_cli_evaluate_json_store_compare_export(tmp_path: Path) -> None:
    run_id = runner.invoke(app, ["train", "--n", "2", "--epochs", "1", "--limit", "256"]).stdout.strip()
    result = runner.invoke(app, ["evaluate", run_id, "--attack", "pgd1,fgsm", "--limit", "50", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [e["attack"] for e in data["evaluations"]] == ["pgd1", "fgsm"]
    first = data["evaluations"][0]
    assert np.array(first["matrix"]).shape == (2, 2) and first["n_examples"] == 50
    assert first["params"]["steps"] == 7 and first["params"]["eps"] == pytest.approx(0.15)
    rows = Store(tmp_path / "deflect.db").evaluations(run_id)
    assert [r.attack for r in rows] == ["pgd1", "fgsm"] and rows[0].matrix == first["matrix"]
    figures = tmp_path / "runs" / run_id / "figures"
    assert (figures / f"transfer-pgd1-{rows[0].id}.png").stat().st_size > 1000

    ens = runner.invoke(app, ["evaluate", run_id, "--attack", "fgsm", "--ensemble", "2", "--limit", "30", "--json"])
    assert ens.exit_code == 0, ens.output
    def strict(token: str) -> None:
        raise AssertionError(f"{token} is not JSON")

    whole = json.loads(ens.stdout, parse_constant=strict)["evaluations"][0]
    assert whole["subsets"] == [[0, 1]] and whole["mean_unowned"] is None  # m = n: no model outside

    cmp = runner.invoke(app, ["compare", run_id, "--json"])
    assert cmp.exit_code == 0 and json.loads(cmp.stdout)["rows"][0][0] == "fgsm"  # Table 1 order
    numbers = json.loads(cmp.stdout)["values"]  # the same cells as numbers, for jq and notebooks
    assert [v["attack"] for v in numbers] == ["fgsm", "pgd1"] and json.loads(cmp.stdout)["runs"] == [run_id]
    stored = {e.attack: e for e in Store(tmp_path / "deflect.db").evaluations(run_id)}
    assert numbers[1]["cells"][0] == {"mean": stored["pgd1"].blackbox_mean, "std": stored["pgd1"].blackbox_std}
    outside = Store(tmp_path / "deflect.db").add_evaluation(Evaluation(  # a static adversary's row, as simulate stores
        run_id=run_id, kind="outside", attack="fgsm", params={"eps": 0.15}, matrix=[[40.0, 60.0]], n_examples=50,
        extra={"row_labels": ["static:r"]}))
    out = runner.invoke(app, ["export", run_id, "--format", "csv", "--out", str(tmp_path / "exp")])
    assert out.exit_code == 0, out.output
    lines = (tmp_path / "exp" / f"{run_id}.csv").read_text().strip().splitlines()
    assert len(lines) == 1 + 4 + 4 + 2 + 2  # header, two 2x2 matrices, one 1x2 ensemble row set, the outside row
    matrices = [(e.kind, e.attack, e.id) for e in Store(tmp_path / "deflect.db").evaluations(run_id)]
    assert sorted(p.name for p in (tmp_path / "exp").glob("*.png")) == sorted(
        f"{run_id}-{kind}-{attack}-{eid}.png" for kind, attack, eid in matrices)  # a heatmap of every matrix
    assert ("outside", "fgsm", outside.id) in matrices

    shown = runner.invoke(app, ["evaluate", run_id, "--attack", "fgsm", "--limit", "50"])  # results on stdout
    assert shown.exit_code == 0, shown.output
    stored = Store(tmp_path / "deflect.db").evaluations(run_id)[-1]
    summary = next(line for line in shown.stdout.splitlines() if line.startswith("fgsm: black-box "))
    assert summary.split()[2].startswith(f"{stored.blackbox_mean:.1f}±"), (summary, stored.blackbox_mean)
    assert sum(line.lstrip("│ ").startswith(("m0 ", "m1 ")) for line in shown.stdout.splitlines()) == 2, shown.stdout

    again = runner.invoke(app, ["evaluate", run_id, "--attack", "pgd1", "--eps", "0.05", "--limit", "50"])
    assert again.exit_code == 0, again.output  # another ε: a figure of its own, the first one kept
    assert sorted(f.name for f in figures.glob("transfer-pgd1-*.png")) == sorted(
        f"transfer-pgd1-{r.id}.png" for r in Store(tmp_path / "deflect.db").evaluations(run_id) if r.attack == "pgd1")
    assert len(list(figures.glob("transfer-pgd1-*.png"))) == 2
    small = runner.invoke(app, ["evaluate", run_id, "--attack", "pgd1", "--limit", "5"])
    assert small.exit_code == 0, small.output
    # compare keeps Table 1's pgd1 on 50 images: not the newer --eps 0.05 row, nor the 5-image check
    paper = [r for r in Store(tmp_path / "deflect.db").evaluations(run_id) if r.attack == "pgd1"][0]
    values = json.loads(runner.invoke(app, ["compare", run_id, "--json"]).stdout)["values"]
    assert values[1]["attack"] == "pgd1" and values[1]["cells"][0]["mean"] == paper.blackbox_mean
    assert "own_settings" not in values[1]["cells"][0]
    # an attack stored only at other settings is shown, marked as such
    assert runner.invoke(app, ["evaluate", run_id, "--attack", "fgm", "--eps", "0.05", "--limit", "5"]).exit_code == 0
    marked = json.loads(runner.invoke(app, ["compare", run_id, "--json"]).stdout)
    fgm = next(v for v in marked["values"] if v["attack"] == "fgm")
    assert fgm["cells"][0]["own_settings"] is False
    assert next(r for r in marked["rows"] if r[0] == "fgm")[1].endswith("*")
    printed = runner.invoke(app, ["compare", run_id]).stdout
    assert "* measured only at other settings than the attack's own" in printed


def test_cli_evaluate_honours_split_and_seed_and_reports_the_sweep_and_tsne(small_run) -> None:
    """--split val --seed 3: the val images, the seed in the params and in the figures; and the JSON of
    --eps-sweep and --tsne, checked against the library calls and the stored rows."""
    db, run_id = small_run
    store = Store(db)
    models = deflect.load_set(run_id, store)
    val, test = deflect.load_dataset("digits", "val"), deflect.load_dataset("digits", "test")
    result = runner.invoke(app, ["evaluate", run_id, "--attack", "pgd1", "--split", "val", "--seed", "3", "--json",
                                 "--db", str(db)])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    (ev,) = out["evaluations"]
    assert out["split"] == "val" and ev["n_examples"] == len(val) != len(test)
    assert ev["params"]["eval_seed"] == 3
    stored = {e.id: e for e in store.evaluations(run_id)}[ev["evaluation_id"]]
    assert stored.params["split"] == "val" and stored.params["eval_seed"] == 3 and stored.n_examples == len(val)
    x, y = val.batch(torch.arange(len(val)))
    assert ev["clean"] == pytest.approx([_accuracy(m, x, y) for m in models], abs=1e-4)
    expected = transfer_matrix(models, val, "pgd1", dataset="digits", seed=3)  # seed 3's random starts
    np.testing.assert_allclose(ev["matrix"], expected.matrix, atol=1e-9)

    both = runner.invoke(app, ["evaluate", run_id, "--eps-sweep", "--tsne", "--steps", "2", "--limit", "30", "--json",
                               "--db", str(db)])
    assert both.exit_code == 0, both.output
    sweep, tsne = json.loads(both.stdout)["evaluations"]  # only these two: no attack was named
    assert (sweep["kind"], tsne["kind"]) == ("eps-sweep", "tsne")
    direct = eps_sweep(models, test, steps=2, dataset="digits", limit=30)
    assert [p["eps"] for p in sweep["points"]] == pytest.approx(sweep_eps_values("digits")) and len(direct) == 8
    for point, res in zip(sweep["points"], direct, strict=True):
        assert point["blackbox_mean"] == pytest.approx(res.blackbox_mean)
        assert point["whole_set_mean"] == pytest.approx(res.whole_set_mean)
    assert sweep["points"][-1]["whole_set_mean"] < sweep["points"][0]["whole_set_mean"]
    rows = {e.id: e for e in store.evaluations(run_id)}
    swept = rows[sweep["evaluation_id"]]
    assert swept.kind == "eps-sweep" and swept.n_examples == 30
    assert swept.matrix == [[p["eps"], p["blackbox_mean"], p["whole_set_mean"]] for p in sweep["points"]]
    assert [np.array(m).shape for m in swept.extra["matrices"]] == [(3, 3)] * 8
    embedded = rows[tsne["evaluation_id"]]
    assert embedded.kind == "tsne" and embedded.n_examples == 30 and embedded.params["n_images"] == 30
    assert np.array(embedded.extra["centroids"]).shape == (3, 2)
    assert Path(tsne["png"]).stat().st_size > 1000 and embedded.extra["png"] == tsne["png"]
    assert tsne["chance"] == pytest.approx(1 / 3) and 0.0 <= tsne["neighbour_agreement"] <= 1.0
    assert -1.0 <= tsne["separation"] <= 1.0


def test_cli_compare_two_runs_by_whole_set_and_blackbox(tmp_path: Path) -> None:
    """Two runs side by side: a cell per run, '-' where a run lacks the attack, and each metric's own numbers."""
    store = Store(tmp_path / "deflect.db")
    a = train(tiny_config(n=2, epochs=1, train_limit=128), store)
    b = train(tiny_config(n=2, epochs=1, train_limit=128, method="independent"), store)
    for run_id, attacks in ((a, "fgsm,pgd1"), (b, "fgsm")):
        done = runner.invoke(app, ["evaluate", run_id, "--attack", attacks, "--limit", "30", "--json"])
        assert done.exit_code == 0, done.output
    stored = {(e.run_id, e.attack): e for e in store.evaluations()}
    whole = runner.invoke(app, ["compare", a, b, "--metric", "whole-set", "--json"])
    assert whole.exit_code == 0, whole.output
    out = json.loads(whole.stdout)
    assert out["runs"] == [a, b] and len(out["header"]) == 3 and out["metric"] == "whole-set"
    values = {v["attack"]: v["cells"] for v in out["values"]}
    assert list(values) == ["no attack", "fgsm", "pgd1"]
    assert values["no attack"] == [{"mean": pytest.approx(np.mean(store.get_run(r).clean_acc))} for r in (a, b)]
    assert values["fgsm"] == [{"mean": stored[(r, "fgsm")].whole_set_mean} for r in (a, b)]
    assert values["pgd1"] == [{"mean": stored[(a, "pgd1")].whole_set_mean}, None]
    rows = {row[0]: row[1:] for row in out["rows"]}
    assert rows["pgd1"] == [f"{stored[(a, 'pgd1')].whole_set_mean:.1f}", "-"]
    assert rows["fgsm"] == [f"{stored[(r, 'fgsm')].whole_set_mean:.1f}" for r in (a, b)]
    # the two metrics differ on these runs, so a whole-set column showing black-box numbers would be seen
    assert any(e.whole_set_mean != e.blackbox_mean for e in stored.values())
    black = json.loads(runner.invoke(app, ["compare", a, b, "--json"]).stdout)
    assert {v["attack"]: v["cells"] for v in black["values"]}["pgd1"] == [
        {"mean": stored[(a, "pgd1")].blackbox_mean, "std": stored[(a, "pgd1")].blackbox_std}, None]
    table = runner.invoke(app, ["compare", a, b, "--metric", "whole-set"])
    assert table.exit_code == 0, table.output
    pgd_line = next(line for line in table.stdout.splitlines() if "pgd1" in line)
    assert [c.strip() for c in pgd_line.split("│")[1:4]] == ["pgd1", *rows["pgd1"]], table.stdout


@pytest.mark.parametrize("args", [["compare", "digits-disjoint-n2-aaaaaa", "no-such-run"],
                                  ["export", "no-such-run"],
                                  ["simulate", "--adversary", "static", "--run", "no-such-run"],
                                  ["evaluate", "no-such-run", "--tsne"]],
                         ids=["compare", "export", "simulate", "evaluate-tsne"])
def test_cli_commands_name_a_missing_run_in_one_line(store: Store, tmp_path: Path, args: list[str]) -> None:
    from deflect.store import Run
    from tests.test_reliability import _one_line_error

    store.add_run(Run(id="digits-disjoint-n2-aaaaaa", method="disjoint", dataset="digits", arch="cnn", preset="digits",
                      n=2, status="finished", run_dir=str(tmp_path / "runs" / "digits-disjoint-n2-aaaaaa")))
    _one_line_error(args, "no run 'no-such-run'", strict=True)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["evaluate", "no-such-run"], "no run 'no-such-run'"),
        (["evaluate", "latest"], "no runs"),
        (["evaluate", "latest", "--attack", "deepfool"], "unknown attack"),
        (["evaluate", "latest", "--eps", "-1"], "--eps must be a finite non-negative number"),
        (["export", "latest", "--format", "xls"], "unknown --format"),
    ],
)
def test_cli_evaluate_errors(store: Store, args: list[str], needle: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_transfer_matrices_may_use_the_adaptive_attacks() -> None:
    from deflect.errors import DeflectError
    from deflect.pipeline import parse_attacks

    assert parse_attacks("pgd1,di-ti-mifgsm", False) == ["pgd1", "di-ti-mifgsm"]
    assert "di-ti-mifgsm" not in parse_attacks(None, True)  # --all stays the paper's Table 1
    with pytest.raises(DeflectError, match="unknown attack 'nope'"):
        parse_attacks("nope", False)


def test_export_lays_out_an_eps_sweep_by_eps() -> None:
    """An ε sweep's stored rows are (ε, black-box, whole set): export writes them as such, and its
    per-ε matrices as cells with their ε, not as a matrix whose 'accuracy' is ε."""
    import csv
    import io

    from deflect.report import export_run
    from deflect.store import Run

    run = Run(id="r", method="disjoint", dataset="digits", arch="cnn", n=2, clean_acc=[90.0, 91.0])
    sweep = Evaluation(id=1, run_id="r", kind="eps-sweep", attack="pgd-sweep", params={"eps": [0.0948, 0.15]},
                       matrix=[[0.0948, 80.0, 85.0], [0.15, 60.0, 70.0]],
                       extra={"columns": ["eps", "blackbox_mean", "whole_set_mean"],
                              "matrices": [[[1.0, 80.0], [80.0, 2.0]], [[0.0, 60.0], [60.0, 0.0]]]})
    outside = Evaluation(id=2, run_id="r", kind="outside", attack="pgd1", params={"eps": 0.15},
                         matrix=[[50.0, 55.0]], extra={"m": 0})
    rows = list(csv.DictReader(io.StringIO(export_run(run, [sweep, outside], "csv"))))
    swept = [r for r in rows if r["kind"] == "eps-sweep"]
    assert len(swept) == 8 and {r["eps"] for r in swept} == {"0.0948", "0.15"}
    assert [float(r["accuracy"]) for r in swept if r["eps"] == "0.15"] == [0.0, 60.0, 60.0, 0.0]
    assert [r["eps"] for r in rows if r["kind"] == "outside"] == ["0.15", "0.15"]
    md = export_run(run, [sweep, outside], "md")
    assert "| 0.0948 | 80.0 | 85.0 |" in md and "| 0.15 | 60.0 | 70.0 |" in md and "\nm: 0\n" in md


def test_an_evaluation_seed_is_its_own_key_beside_an_attacks_seed() -> None:
    """Square has a `seed` of its own; the evaluation's seed (images and attack noise) never replaces it."""
    from deflect.evaluate import with_setting

    square = make_attack("square", "digits").params()
    assert with_setting(square, False, 7) == {**square, "eval_seed": 7} and square["seed"] == 0
    assert with_setting(square, True, 0) == {**square, "precision": "bf16"}  # defaults leave no key


def test_cli_evaluate_unfooled_picks_what_cw_sends_for_unfooled_samples(small_run) -> None:
    """--unfooled clean: CW κ = 40 sends the clean image for every image it never fooled by its margin
    (torchattacks' convention); the default, the last iterate, lowers each model's white-box accuracy.
    Both are stored under their own settings."""
    db, run_id = small_run
    store = Store(db)
    models = deflect.load_set(run_id, store)
    test = deflect.load_dataset("digits", "test")
    common = ["--attack", "cw2", "--steps", "30", "--limit", "40", "--json", "--db", str(db)]
    out = {}
    for value in ("clean", None):
        result = runner.invoke(app, ["evaluate", run_id, *common, *(["--unfooled", value] if value else [])])
        assert result.exit_code == 0, result.output
        (out[value],) = json.loads(result.stdout)["evaluations"]
    clean, last = out["clean"], out[None]
    assert clean["params"]["unfooled"] == "clean" and last["params"]["unfooled"] == "last"
    expected = transfer_matrix(models, test, make_attack("cw2", "digits", steps=30, unfooled="clean"),
                               dataset="digits", limit=40)
    np.testing.assert_allclose(clean["matrix"], expected.matrix, atol=1e-9)
    # 30 steps of lr 0.01 never reach a 40-logit margin: every image comes back clean under "clean"
    assert np.diag(clean["matrix"]) == pytest.approx(clean["clean"])
    assert all(a < b - 5 for a, b in zip(np.diag(last["matrix"]), np.diag(clean["matrix"]), strict=True))
    rows = {e.id: e for e in store.evaluations(run_id)}
    assert rows[clean["evaluation_id"]].params["unfooled"] == "clean"
    both = runner.invoke(app, ["evaluate", run_id, "--attack", "pgd1,cw2", "--unfooled", "clean", "--steps", "5",
                               "--limit", "10", "--json", "--db", str(db)])
    assert both.exit_code == 0, both.output  # --unfooled reaches the attacks that take it, and only those
    pgd, cw = json.loads(both.stdout)["evaluations"]
    assert "unfooled" not in pgd["params"] and cw["params"]["unfooled"] == "clean"
    for args, needle in ((["--attack", "pgd1", "--unfooled", "clean"], "--unfooled applies to the CW and EAD attacks"),
                         (["--attack", "cw2", "--unfooled", "best"], "--unfooled must be one of last, clean, got"),
                         (["--eps-sweep", "--unfooled", "clean"], "--unfooled applies to the CW and EAD attacks"),
                         (["--adaptive", "--unfooled", "clean"], "--adaptive runs on its own"),
                         # every attack is built before the first matrix: pgd1's is not stored, then refused
                         (["--attack", "pgd1,cw2", "--alpha", "0.01"], "--alpha does not apply to attack cw2")):
        before = len(store.evaluations(run_id))
        bad = runner.invoke(app, ["evaluate", run_id, *args, "--limit", "10", "--db", str(db)])
        assert bad.exit_code == 2 and needle in bad.stderr, bad.output
        assert len(bad.stderr.strip().splitlines()) == 1
        assert len(store.evaluations(run_id)) == before
