"""Threat-model simulations on the default digits sets: ordering, expected figure, storage, CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deflect.cli import app
from deflect.scenario import Scenario, load_scenario, with_overrides
from deflect.simulate import SimulationResult, simulate, wilson_interval
from deflect.store import Store, settings_key

runner = CliRunner()
ADVERSARIES = ("static", "skilled", "oracle")


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fixed deployment key, so that every client's model (and so each result) is reproducible."""
    path = tmp_path_factory.mktemp("key") / "deflect.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("5e" * 32 + "\n")
    return path


@pytest.fixture(scope="module")
def played(digits_runs: tuple[Store, dict[str, str]], key_file: Path) -> dict[str, dict[str, SimulationResult]]:
    """The three adversaries (oracle k=2) against the disjoint and the independent set, 800 attacks each."""
    store, ids = digits_runs
    return {
        method: {
            adv: simulate(store, with_overrides(Scenario(), adversary=adv, run=run_id, rounds=8), key_path=key_file)
            for adv in ADVERSARIES
        }
        for method, run_id in ids.items()
    }


def test_deflection_follows_the_threat_models(played: dict[str, dict[str, SimulationResult]]) -> None:
    """Paper §3: static ≥ skilled ≥ oracle (k=2), and a disjoint set deflects far more than an independent one."""
    rates = {m: {a: r.rate for a, r in per.items()} for m, per in played.items()}
    for method in rates:
        assert rates[method]["static"] >= rates[method]["skilled"] >= rates[method]["oracle"], rates
    for adv in ADVERSARIES:
        assert rates["disjoint"][adv] >= rates["independent"][adv] + 0.15, rates
    skilled = played["disjoint"]["skilled"]
    assert skilled.owned and skilled.k == 1 and skilled.attack == "mifgsm2"
    assert played["disjoint"]["oracle"].k == 2 and len(played["disjoint"]["oracle"].owned) == 2
    assert played["disjoint"]["static"].owned == [] and played["disjoint"]["static"].static_run


def test_simulated_rate_agrees_with_the_expected_figure(played: dict[str, dict[str, SimulationResult]]) -> None:
    """The transfer matrices predict the deflection rate: it lies inside the simulation's Wilson 95% interval.

    Six independent 95% intervals miss now and then by chance (1 - 0.95^6 ≈ 26% for at least one miss),
    so one miss is tolerated if it stays inside the 99.9% interval; a wrong formula misses in most of them.
    """
    misses = []
    for method, per in played.items():
        for adv, res in per.items():
            assert res.sent == 800 and res.counted + res.void == res.sent
            assert res.counted == res.succeeded + res.deflected and sum(res.hits) == res.succeeded
            lo, hi = res.ci
            wide = wilson_interval(res.deflected, res.counted, z=3.2905)
            assert wide[0] <= res.expected_rate <= wide[1], (method, adv, wide, res.rate, res.expected_rate)
            if not lo <= res.expected_rate <= hi:
                misses.append((method, adv, lo, res.rate, hi, res.expected_rate))
    assert len(misses) <= 1, misses


def test_simulation_is_stored_reused_and_reproducible(digits_runs: tuple[Store, dict[str, str]],
                                                      played: dict[str, dict[str, SimulationResult]],
                                                      key_file: Path) -> None:
    store, ids = digits_runs
    res = played["disjoint"]["oracle"]
    row = next(s for s in store.simulations(ids["disjoint"]) if s.id == res.simulation_id)
    assert (row.adversary, row.k, row.attack, row.sent, row.deflected) == ("oracle", 2, "pgd2", 800, res.deflected)
    assert row.ci_low <= row.deflection_rate <= row.ci_high and row.expected_rate == pytest.approx(res.expected_rate)
    assert len(row.rounds) == 8 and row.hits == res.hits and row.params["owned"] == res.owned
    assert "5e5e" not in json.dumps(row.params)  # the key is never stored
    runs_before = len(store.list_runs())
    evals_before = len(store.evaluations())
    again = [simulate(store, with_overrides(Scenario(), adversary="static", run=ids["disjoint"], rounds=2,
                                            per_round=50, seed=3), key_path=key_file, save=False) for _ in range(2)]
    assert len(store.list_runs()) == runs_before  # the static adversary's model is cached
    assert len(store.evaluations()) == evals_before  # and so is the expected figure's evaluation
    assert [r.to_dict() for r in again[0].rounds] == [r.to_dict() for r in again[1].rounds]
    assert store.get_run("latest").id != res.static_run and played["disjoint"]["static"].static_run != ids["disjoint"]


def test_zero_day_release_retires_the_attacked_model(digits_runs: tuple[Store, dict[str, str]],
                                                     key_file: Path) -> None:
    store, ids = digits_runs
    scenario = with_overrides(load_scenario("zero-day"), run=ids["disjoint"], rounds=4)
    res = simulate(store, scenario, key_path=key_file, save=False)
    first = res.rounds[0]
    assert len(first.released) == 2 and res.owned[0] in first.released
    (rotation,) = first.rotations  # the skilled adversary's white-box hits retire its own model at once
    assert rotation["retired"] == res.owned[0] and rotation["hits"] >= 25
    later = res.rounds[1:]
    assert all(res.owned[0] not in r.released and rotation["released"] in r.released for r in later)
    assert sum(r.deflected for r in later) / sum(r.counted for r in later) > first.rate + 0.2


def test_cli_simulate_with_no_other_flag(digits_runs: tuple[Store, dict[str, str]],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """After `deflect train`: `deflect simulate --adversary oracle --k 2` alone prints rate, interval, expected."""
    store, ids = digits_runs
    monkeypatch.setenv("DEFLECT_DB", str(store.path))
    result = runner.invoke(app, ["simulate", "--adversary", "oracle", "--k", "2"])
    assert result.exit_code == 0, result.output
    assert ids["disjoint"] in result.stdout  # the latest finished disjoint run by default
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("deflection rate"))
    assert "(Wilson 95% CI)" in line and "expected" in line
    key = store.path.parent / "deflect.key"
    assert (key.stat().st_mode & 0o777) == 0o600  # created on first use, beside the database
    out = runner.invoke(app, ["simulate", "--adversary", "skilled", "--rounds", "2", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["adversary"] == "skilled" and data["sent"] == 200 and len(data["rounds"]) == 2
    assert data["ci_low"] <= data["deflection_rate"] <= data["ci_high"] and data["expected_rate"] is not None
    # off a terminal (CliRunner's stderr, `2> log`) each round is a line as it ends, not a live table
    logged = [ln for ln in out.stderr.splitlines() if ln.startswith("round ")]
    assert [ln.split(":")[0] for ln in logged] == ["round 1/2", "round 2/2"], out.stderr
    first = data["rounds"][0]
    assert f"sent {first['sent']}, void {first['void']}, hit {first['succeeded']}, deflected {first['deflected']}" \
        in logged[0]


def _one_line_error(args: list[str], *needles: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and all(n in lines[0] for n in needles), result.stderr
    assert "Traceback" not in result.output


def test_cli_simulate_errors(tmp_path: Path, digits_runs: tuple[Store, dict[str, str]]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('adversary = "oracle"\nk = "two"\n')
    _one_line_error(["simulate", "--scenario", str(bad)], str(bad), "key 'k'", "expected an integer")
    bad.write_text('adversary = "static"\n[release]\ntreshold = 5\n')
    _one_line_error(["simulate", "--scenario", str(bad)], str(bad), "key 'release.treshold'", "unknown key")
    _one_line_error(["simulate"], "no adversary")
    Store()  # the default database, empty
    _one_line_error(["simulate", "--adversary", "static"], "no finished disjoint run")
    _one_line_error(["simulate", "--adversary", "oracle", "--clients", "0"], "--clients: must be at least 1")
    store, ids = digits_runs
    shared = tmp_path / "shared.key"
    shared.write_text("ab" * 32)
    shared.chmod(0o644)
    _one_line_error(["simulate", "--adversary", "oracle", "--db", str(store.path), "--key", str(shared)],
                    "accessible by group or others")
    _one_line_error(["simulate", "--adversary", "oracle", "--k", "4", "--db", str(store.path)],
                    "more than the 3 released models")


@pytest.mark.slow
def test_demo_end_to_end(tmp_path: Path) -> None:
    result = runner.invoke(app, ["demo", "--json"])
    assert result.exit_code == 0, result.output
    sims = json.loads(result.stdout)["simulations"]
    for adv in ADVERSARIES:
        assert sims["disjoint"][adv]["deflection_rate"] > sims["independent"][adv]["deflection_rate"]


def test_scenarios_may_use_the_adaptive_attacks(tmp_path: Path) -> None:
    from deflect.errors import DeflectError
    from deflect.scenario import load_scenario

    path = tmp_path / "adaptive.toml"
    path.write_text('adversary = "oracle"\nk = 2\nattack = "di-ti-mifgsm-cw"\n')
    assert load_scenario(path).attack_name == "di-ti-mifgsm-cw"
    path.write_text('adversary = "oracle"\nk = 2\nattack = "di-ti-nope"\n')
    with pytest.raises(DeflectError, match="unknown attack 'di-ti-nope'"):
        load_scenario(path)


def test_summary_names_the_scenario_and_flags_an_oracle_that_owns_every_deployed_model(
        played: dict[str, dict[str, SimulationResult]]) -> None:
    """k = n leaves random deployment nothing to do: the summary says what its 'deflections' are."""
    import dataclasses

    from deflect.cli import _simulation_summary

    oracle = played["disjoint"]["oracle"]  # k = 2 of 3 released
    lines = _simulation_summary(oracle).splitlines()
    assert lines[0].startswith("deflection rate") and not any("owns every deployed" in ln for ln in lines)
    released = sorted({m for rd in oracle.rounds for m in rd.released})
    described = {**oracle.scenario, "name": "mine", "description": "two stolen models"}
    every = dataclasses.replace(oracle, owned=released, k=len(released), scenario=described)
    lines = _simulation_summary(every).splitlines()
    assert lines[0] == "scenario mine: two stolen models"
    assert sum("the attacker owns every deployed model" in ln for ln in lines) == 1


def test_static_adversary_trains_like_the_first_set_and_never_distils(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The static adversary's recipe: a grown set's root (not the grow's shorter --epochs), with no
    teacher (the defender's own set); and the method-aware attacker's cache uses the same rule."""
    import dataclasses

    from deflect import simulate as simulate_module
    from deflect.config import make_config, same_recipe
    from deflect.store import Run

    store = Store(tmp_path / "s.db")
    root_cfg = make_config(3, "digits", epochs=4, teacher="digits-independent-n3-cccccc")
    config = json.loads(root_cfg.to_json())
    store.add_run(Run(id="digits-disjoint-n3-aaaaaa", method="disjoint", dataset="digits", arch="cnn", preset="digits",
                      n=3, run_dir=str(tmp_path / "a"), epochs_total=4, status="finished", config=config))
    store.add_run(Run(id="digits-disjoint-n4-bbbbbb", method="disjoint", dataset="digits", arch="cnn", preset="digits",
                      n=4, run_dir=str(tmp_path / "b"), epochs_total=1, status="finished",
                      config={**config, "n": 4, "epochs": 1, "teacher": None, "parent": "digits-disjoint-n3-aaaaaa"}))
    seen: dict[str, object] = {}

    def fake_helper(store: Store, cfg: object, role: str, message: str, callbacks: object = None) -> None:
        seen["cfg"], seen["role"] = cfg, role
        raise RuntimeError("captured")

    monkeypatch.setattr(simulate_module, "helper_run", fake_helper)
    for run_id in ("digits-disjoint-n3-aaaaaa", "digits-disjoint-n4-bbbbbb"):
        with pytest.raises(RuntimeError, match="captured"):
            simulate_module.static_adversary(store, store.get_run(run_id), device="cpu")
        cfg = seen["cfg"]
        assert seen["role"] == simulate_module.STATIC_ROLE
        assert (cfg.method, cfg.n, cfg.epochs, cfg.teacher, cfg.seed) == ("independent", 2, 4, None, 1000), cfg
    # the cache rule: place keys and unknown keys (the helper's role) do not count, a training field does
    stored = {**json.loads(cfg.to_json()), "device": "cuda", "role": "static-adversary"}
    assert same_recipe(stored, cfg) and same_recipe({k: v for k, v in stored.items() if k != "momentum"}, cfg)
    assert not same_recipe(stored, dataclasses.replace(cfg, teacher="digits-independent-n3-cccccc"))


def test_expected_figure_reuses_only_an_evaluation_of_the_same_images(tmp_path: Path, key_file: Path) -> None:
    """An evaluation with another --seed drew other images (and attack noise): it is not the simulation's s_v."""
    from deflect.pipeline import RunEvaluator
    from deflect.train import train
    from tests.conftest import tiny_config

    store = Store(tmp_path / "deflect.db")
    run = train(tiny_config(n=2, epochs=1), store)
    _, seeded = RunEvaluator(store, run, limit=100, seed=7).transfer("pgd1")
    assert seeded.params["eval_seed"] == 7
    scenario = with_overrides(Scenario(), adversary="skilled", run=run, rounds=1, per_round=20, limit=100,
                              attack="pgd1")
    first = simulate(store, scenario, key_path=key_file, save=False)
    assert first.expected_source.endswith("(computed now)") and str(seeded.id) not in first.expected_source
    stored = store.evaluations(run, "transfer")[-1]
    assert "eval_seed" not in stored.params  # seed 0, the simulation's images: the key is left out, as float32 is
    # the same attack settings measured on other images: one setting where the largest evaluation speaks for it
    assert settings_key(seeded) == settings_key(stored) and store.worst_blackbox()[run].n_examples == 100
    again = simulate(store, scenario, key_path=key_file, save=False)
    assert again.expected_source == f"transfer evaluation {stored.id}"


def test_cli_simulate_on_a_run_with_no_saved_epoch_is_one_error(tmp_path: Path) -> None:
    from deflect.train import Callbacks, train
    from tests.conftest import tiny_config

    store = Store(tmp_path / "deflect.db")

    def stop(event: object) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(n=2, epochs=1), store, Callbacks(on_batch=stop))
    run = store.list_runs()[-1]
    assert run.epochs_done == 0
    result = runner.invoke(app, ["simulate", "--adversary", "oracle", "--run", run.id, "--db", str(store.path)])
    assert result.exit_code == 2 and result.stderr.splitlines() == [
        f"deflect: error: run {run.id} has no saved epoch yet (interrupted)"], result.stderr
