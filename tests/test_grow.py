"""Growing a set (`deflect grow`): frozen parents, lineage, disjointness of new models, the pool."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import deflect
from deflect.checkpoint import model_file, sha256_file
from deflect.cli import app
from deflect.data import load_dataset
from deflect.deploy import Deployment, ReleasePolicy
from deflect.errors import DeflectError
from deflect.evaluate import transfer_matrix
from deflect.pool import current_pool, pool_size
from deflect.scenario import Scenario, load_scenario, with_overrides
from deflect.simulate import simulate
from deflect.store import Store
from deflect.train import Callbacks, train
from deflect.train.grow_run import GrowCallbacks, grow, lineage
from tests.conftest import tiny_config

runner = CliRunner()
KEY = "5e" * 32


def _file_digests(run_dir: str, n: int) -> list[str]:
    return [sha256_file(model_file(Path(run_dir), i)) for i in range(n)]


@pytest.fixture(scope="module")
def grown(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 2-model digits disjoint set grown by one model, and an independent pair of the same recipe."""
    store = Store(tmp_path_factory.mktemp("grow") / "deflect.db")
    recipe = dict(n=2, epochs=8, train_limit=1000)
    parent = train(tiny_config(**recipe), store)
    independent = train(tiny_config(method="independent", **recipe), store)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in deflect.load_set(parent, store)]
    files = _file_digests(store.get_run(parent).run_dir, 2)
    child = grow(store, parent, 1)
    return {"store": store, "parent": parent, "independent": independent, "child": child, "before": before,
            "files": files}


def test_frozen_models_are_bit_identical(grown: dict) -> None:
    store, parent, child = grown["store"], grown["parent"], grown["child"]
    after_parent = deflect.load_set(parent, store)
    after_child = deflect.load_set(child, store)
    assert len(after_child) == 3
    for saved, p_model, c_model in zip(grown["before"], after_parent, after_child[:2], strict=True):
        for key, value in saved.items():
            assert torch.equal(value, p_model.state_dict()[key]) and torch.equal(value, c_model.state_dict()[key])
    assert _file_digests(store.get_run(parent).run_dir, 2) == grown["files"]  # the parent's files never change
    new = after_child[2].state_dict()
    assert any(not torch.equal(v, grown["before"][0][k]) for k, v in new.items() if v.is_floating_point())


def test_lineage_is_stored(grown: dict) -> None:
    store, parent, child = grown["store"], grown["parent"], grown["child"]
    run, prev = store.get_run(child), store.get_run(parent)
    assert (run.status, run.n, run.method, run.epochs_done, run.epochs_total) == ("finished", 3, "disjoint", 8, 8)
    cfg = run.config
    assert cfg["parent"] == parent and cfg["inherited"] == [0, 1] and cfg["new"] == [2] and cfg["n"] == 3
    assert cfg["grow"]["parent_n"] == 2 and len(cfg["grow"]["seconds"]) == 1 and cfg["grow"]["seconds"][0] > 0
    assert [r.id for r in lineage(store, child)] == [child, parent]
    on_disk = json.loads((Path(run.run_dir) / "config.json").read_text())
    assert on_disk["parent"] == parent and on_disk["grow"]["seconds"] == cfg["grow"]["seconds"]
    assert run.clean_acc[:2] == prev.clean_acc and len(run.clean_acc) == 3
    epochs = store.epochs(child)
    assert [e.epoch for e in epochs] == list(range(1, 9)) and all(len(e.clean_acc) == 1 for e in epochs)
    assert max(e.clean_acc[0] for e in epochs) >= run.clean_acc[2] > 70
    assert len(deflect.load_set(run.run_dir)) == 3  # the folder verifies through its manifest alone
    assert store.get_run("latest").id == child  # a grown set is an ordinary set


def test_new_model_is_disjoint_from_the_old_ones(grown: dict) -> None:
    """Black-box PGD between the new and the old models is far above an independent pair's."""
    store = grown["store"]
    test = load_dataset("digits", "test")
    kw = dict(dataset="digits", limit=200)
    mixed = np.array(transfer_matrix(deflect.load_set(grown["child"], store), test, "pgd1", **kw).matrix)
    indep = transfer_matrix(deflect.load_set(grown["independent"], store), test, "pgd1", **kw)
    new_old = [mixed[2, 0], mixed[2, 1], mixed[0, 2], mixed[1, 2]]
    assert np.mean(new_old) >= indep.blackbox_mean + 15, (mixed.round(1).tolist(), indep.matrix)
    assert min(new_old) > max(indep.matrix[0][1], indep.matrix[1][0])
    assert mixed[2, 2] < 30  # white-box still works: the new model is not simply robust


@pytest.fixture
def small_parent(store: Store) -> str:
    return train(tiny_config(n=2, epochs=1), store)


def test_cli_grow_prints_the_new_run(store: Store, small_parent: str) -> None:
    result = runner.invoke(app, ["grow", small_parent[:12], "--add", "2", "--epochs", "1", "--sample", "1",
                                 "--db", str(store.path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["n"] == 4 and data["status"] == "finished" and data["config"]["parent"] == small_parent
    assert data["config"]["grow"]["sample"] == 1 and len(data["config"]["grow"]["seconds"]) == 2
    assert "m3 (new 2)" in result.stderr
    assert "new 1/2 epoch 1/1: loss " in result.stderr and "new 2/2 epoch 1/1: loss " in result.stderr
    plain = runner.invoke(app, ["grow", data["id"], "--epochs", "1", "--db", str(store.path)])
    assert plain.exit_code == 0 and store.get_run(plain.stdout.strip()).config["parent"] == data["id"]
    listed = runner.invoke(app, ["runs", "--db", str(store.path)]).stdout.splitlines()
    assert " disjoint (grown) " in next(line for line in listed if data["id"] in line)
    assert " disjoint " in next(line for line in listed if small_parent in line)
    scaled = runner.invoke(app, ["grow", small_parent, "--epochs", "1", "--pair-scale", "0.25",
                                 "--db", str(store.path)])
    assert scaled.exit_code == 0, scaled.output
    before, after = store.get_run(small_parent).config, store.get_run(scaled.stdout.strip()).config
    assert after["grow"]["pair_scale"] == 0.25 and data["config"]["grow"]["pair_scale"] == 1.0
    # the set's recipe is kept, so growing the grown set again starts from the same weights
    assert all(after[k] == before[k] for k in ("w_class", "w_angle", "w_transfer1", "w_transfer2"))


def _one_line_error(args: list[str], needle: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()  # not stripped: no empty bar line before the error either
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.output, result.stderr


def test_cli_grow_bad_input(store: Store, small_parent: str) -> None:
    db = ["--db", str(store.path)]
    _one_line_error(["grow", "no-such-run", *db], "no run 'no-such-run'")
    _one_line_error(["grow", small_parent, "--add", "0", *db], "--add must be at least 1")
    _one_line_error(["grow", small_parent, "--sample", "0", *db], "--sample must be at least 1")
    _one_line_error(["grow", small_parent, "--pair-scale", "-1", *db], "--pair-scale must be")
    _one_line_error(["grow", small_parent, "--pair-scale", "nan", *db], "--pair-scale must be")
    _one_line_error(["grow", small_parent, "--refill", "2", "--add", "1", *db], "drop --add")
    # --refill's options are checked here, before the background process: it could only log the error
    for bad, needle in ((["--epochs", "0"], "--epochs must be at least 1"), (["--sample", "0"], "--sample must be"),
                        (["--device", "tpu"], "unknown device 'tpu'"), (["--teacher", "no-such-set"], "no-such-set"),
                        (["--transfer-batch", "0"], "--transfer-batch must be at least 2")):
        _one_line_error(["grow", small_parent, "--refill", "2", *bad, *db], needle)
    assert not list(store.runs_root.glob("*.refill.log")) and current_pool(store, small_parent) is None
    independent = train(tiny_config(n=2, epochs=1, method="independent"), store)
    _one_line_error(["grow", independent, "--epochs", "1", *db],
                    f"run {independent} was trained with --method independent")
    _one_line_error(["grow", independent, "--refill", "1", *db], "deflect grow adds disjoint models")
    file = model_file(Path(store.get_run(small_parent).run_dir), 1)
    good, before = file.read_bytes(), [r.id for r in store.list_runs()]
    file.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    try:  # a damaged parent is found before the new run exists: no failed run row, no folder left
        _one_line_error(["grow", small_parent, *db], "sha256")
    finally:
        file.write_bytes(good)
    assert [r.id for r in store.list_runs()] == before

    def stop(metric: object) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(n=2, epochs=2), store, Callbacks(on_epoch=stop))
    unfinished = store.list_runs()[-1].id
    _one_line_error(["grow", unfinished, *db], "only a finished set can be grown")


@pytest.mark.parametrize("when", ["before the run exists", "while it trains"])
def test_cli_grow_interrupted_says_what_was_stored(store: Store, small_parent: str, when: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C during `deflect grow`: exit 130 and one line naming the interrupted child run, or saying none
    was created; the parent is unchanged either way."""
    from deflect.train import grow_run

    if when == "before the run exists":
        def no_child(*args: object, **kwargs: object) -> str:
            raise KeyboardInterrupt
        monkeypatch.setattr(grow_run, "grow", no_child)
    else:
        def stop(*args: object) -> None:
            raise KeyboardInterrupt
        monkeypatch.setattr(grow_run, "_train_new_model", stop)
    result = runner.invoke(app, ["grow", small_parent, "--epochs", "1", "--db", str(store.path)])
    lines = [line for line in result.stderr.splitlines() if "interrupted" in line]
    assert result.exit_code == 130 and len(lines) == 1, result.output
    children = [r for r in Store(store.path).list_runs() if r.id != small_parent]
    if when == "before the run exists":
        assert not children
        assert lines[0] == f"deflect: interrupted; the grown run had not been created; {small_parent} is unchanged"
    else:
        (child,) = children
        assert child.status == "interrupted"
        assert lines[0] == f"deflect: interrupted; run {child.id} is marked interrupted and {small_parent} is unchanged"
    assert Store(store.path).get_run(small_parent).status == "finished"


def test_interrupted_grow_leaves_the_parent_alone(store: Store, small_parent: str) -> None:
    parent = store.get_run(small_parent)
    files = _file_digests(parent.run_dir, 2)

    def stop(metric: object) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        grow(store, small_parent, 2, epochs=2, callbacks=GrowCallbacks(on_epoch=stop))
    child = store.list_runs()[-1]
    assert child.config["parent"] == small_parent and child.status == "interrupted" and child.epochs_done == 1
    after = store.get_run(small_parent)
    assert (after.status, after.n, after.clean_acc, after.updated) == ("finished", 2, parent.clean_acc, parent.updated)
    assert _file_digests(parent.run_dir, 2) == files
    with pytest.raises(DeflectError, match="grown from"):  # `train --resume` would retrain the inherited models
        train(store=store, resume=child.id)


@pytest.mark.parametrize("native", [False, True])
def test_growing_a_bf16_set_keeps_bf16_only_where_it_is_native(store: Store, small_parent: str, native: bool,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    run = store.get_run(small_parent)
    store.update_run(small_parent, config={**run.config, "bf16": True})  # as if trained with --bf16 on a GPU
    # by module object, as the code under test looks the name up
    monkeypatch.setattr(sys.modules["deflect.train.grow_run"], "bf16_supported", lambda device: native)
    used: list[bool] = []
    steps = sys.modules["deflect.train.disjoint"]
    real = steps.autocast
    monkeypatch.setattr(steps, "autocast", lambda device, on: used.append(on) or real(device, on))
    child = store.get_run(grow(store, small_parent, 1, epochs=1))
    assert child.status == "finished" and child.config["bf16"] is native
    assert used and set(used) == {native}  # every growth step ran as the grown run's config says


def test_release_order_puts_the_pool_last() -> None:
    key = bytes.fromhex(KEY)
    dep = Deployment(key, 5, ReleasePolicy(initial=2, threshold=1), pool=2)
    assert dep.release_order()[3:] == [3, 4] and sorted(dep.release_order()[:3]) == [0, 1, 2]
    assert len(dep.released) == 2 and dep.unreleased[-2:] == [3, 4] and max(dep.released) < 3
    for model in list(dep.released):
        dep.record_hits(model)
    dep.rotate()
    own_fresh = dep.release_order()[2]
    assert own_fresh in dep.released and 3 in dep.released  # the set's own fresh model first, then the pool
    with pytest.raises(DeflectError, match="set size 3"):
        Deployment(key, 5, ReleasePolicy(initial=4), pool=2)


def test_pool_feeds_the_staged_release(store: Store, small_parent: str, tmp_path: Path) -> None:
    key = tmp_path / "deflect.key"
    key.write_text(KEY + "\n")
    key.chmod(0o600)
    pool_id = grow(store, small_parent, 1, epochs=1, pool=True)
    pool_run = store.get_run(pool_id)
    assert pool_run.config["pool_of"] == small_parent and pool_run.config["role"] == "pool" and pool_run.n == 3
    assert current_pool(store, small_parent).id == pool_id and pool_size(store, store.get_run(small_parent)) == 1
    assert store.get_run("latest").id == small_parent  # a pool is never 'latest'
    listed = runner.invoke(app, ["runs", "--db", str(store.path)]).stdout.splitlines()
    assert " disjoint (pool) " in next(line for line in listed if pool_id in line)
    scenario = with_overrides(Scenario(release=ReleasePolicy(threshold=1)), adversary="skilled", run=small_parent,
                              rounds=3, per_round=60, limit=100, attack="pgd1")
    res = simulate(store, scenario, key_path=key, save=True)
    assert res.run_id == pool_id and res.pool_of == small_parent and res.pool_models == [2]
    assert res.rounds[0].released == [0, 1]  # the pool stays unreleased until a model retires
    first = res.rotations[0]  # a retired model's clients get the pool model: the set had no fresh model left
    assert first["retired"] in (0, 1) and first["released"] == 2 and len(res.rotations) == 1
    assert all(2 in r.released for r in res.rounds[first["round"]:])
    assert store.simulations(pool_id)[-1].params["pool_of"] == small_parent
    with pytest.raises(DeflectError, match=f"is the pool of run {small_parent}.*simulate run {small_parent}"):
        simulate(store, with_overrides(scenario, run=pool_id), key_path=key, save=False)  # it would release the pool
    # pool models take seeds of their own: a plain grow of the set never trains (and so releases) a pool model
    plain_id = grow(store, small_parent, 1, epochs=1)
    assert pool_run.config["grow"]["seed_stream"] > 0 == store.get_run(plain_id).config["grow"]["seed_stream"]
    pooled, released = (deflect.load_set(r, store)[2].state_dict() for r in (pool_id, plain_id))
    assert not all(torch.equal(pooled[k], released[k]) for k in pooled if pooled[k].is_floating_point())
    no_pool = Scenario(release=ReleasePolicy(threshold=1, pool=False))
    plain = simulate(store, with_overrides(no_pool, adversary="skilled", run=small_parent, rounds=2, per_round=40,
                                           limit=100, attack="pgd1"), key_path=key, save=False)
    assert plain.run_id == small_parent and plain.rotations == [] and plain.pool_of is None


def test_scenario_release_pool_key(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text('adversary = "skilled"\n[release]\nthreshold = 5\npool = false\n')
    assert load_scenario(path).release == ReleasePolicy(threshold=5, pool=False)
    path.write_text('adversary = "skilled"\n[release]\npool = "yes"\n')
    with pytest.raises(DeflectError, match="release.pool.*true or false"):
        load_scenario(path)


def test_cli_refill_grows_the_pool_in_the_background(store: Store, small_parent: str) -> None:
    db = ["--db", str(store.path)]
    result = runner.invoke(app, ["grow", small_parent, "--refill", "1", "--epochs", "1", "--json", *db])
    assert result.exit_code == 0, result.output
    job = json.loads(result.stdout)
    assert job["add"] == 1 and job["size"] == 0 and job["pid"] > 0
    busy = runner.invoke(app, ["grow", small_parent, "--refill", "2", *db])  # before the child has a run row
    assert busy.exit_code == 2 and "already being grown" in busy.output, busy.output
    deadline = time.monotonic() + 120
    while current_pool(store, small_parent) is None and time.monotonic() < deadline:
        time.sleep(0.5)
    pool = current_pool(store, small_parent)
    assert pool is not None and pool.n == 3, Path(job["log"]).read_text()
    assert "new 1/1 epoch 1/1: loss " in Path(job["log"]).read_text()  # the log follows the epochs
    again = runner.invoke(app, ["grow", small_parent, "--refill", "1", *db])
    assert again.exit_code == 0 and "already holds 1 model" in again.stdout
    _one_line_error(["grow", pool.id, "--add", "1", *db], f"is the pool of run {small_parent}")


def test_cli_refill_passes_the_recipe_to_the_background_grow(store: Store, small_parent: str, monkeypatch) -> None:
    """The background grow gets every recipe option the command was given, the teacher's included."""
    import deflect.pool

    calls: list[list[str]] = []

    def spawn(store: Store, base: object, target: int, args: list[str], check: object = None) -> deflect.pool.Refill:
        calls.append(args)
        return deflect.pool.Refill(small_parent, 0, target, 0)

    monkeypatch.setattr(deflect.pool, "spawn_refill", spawn)
    db = ["--db", str(store.path)]
    named = ["--teacher", "T", "--distill", "0.3", "--distill-temperature", "2"]
    for extra in (["--epochs", "2"], named):
        assert runner.invoke(app, ["grow", small_parent, "--refill", "1", *extra, *db]).exit_code == 0
    assert calls == [["--epochs", "2", "--device", "auto"],
                     ["--teacher", "T", "--distill", "0.3", "--distill-temperature", "2.0", "--device", "auto"]]


@pytest.mark.parametrize("clamp", ["batch", "image", "none"])
def test_transfer_batch_puts_every_pair_term_on_the_first_images(digits_runs, clamp: str) -> None:
    """With `transfer_batch`, the pair terms equal the full-batch terms computed on those images alone
    (their gradients rescaled to the whole batch's per-image size); classification keeps the batch."""
    import dataclasses

    from deflect.config import make_config
    from deflect.inference import inference_copy
    from deflect.train.grow import growth_loss
    from deflect.train.losses import ActiveTerms

    store, ids = digits_runs  # trained models: perturbations along their gradients raise their losses
    new, *frozen = deflect.load_set(ids["independent"], store)
    new.eval()  # BatchNorm in eval mode: an image's terms do not depend on the rest of its batch
    frozen = [inference_copy(m, "cpu") for m in frozen]
    test = deflect.load_dataset("digits", "test")
    x, y = test.batch(torch.arange(32))
    cfg = make_config(3, "digits", transfer_clamp=clamp)
    active = ActiveTerms.all_enabled(cfg)
    cut = growth_loss(new, frozen, x, y, dataclasses.replace(cfg, transfer_batch=8), active)
    # the same terms over the 8 images alone, ε1 scaled by 8/32 for the batch mean's 1/B and the tanh
    # scale likewise, which is what rescaling the gradients does
    alone = growth_loss(new, frozen, x[:8], y[:8], dataclasses.replace(
        cfg, eps1=cfg.eps1 * 8 / 32, tanh_scale=cfg.tanh_scale * 8 / 32), active)
    full = growth_loss(new, frozen, x, y, cfg, active)
    cut, alone, full = (parts.as_floats() for parts in (cut, alone, full))
    assert cut["class"] == pytest.approx(full["class"], rel=1e-6)
    for name in ("angle", "transfer1", "transfer2"):
        assert cut[name] == pytest.approx(alone[name], rel=1e-4, abs=1e-6)
    assert cut["transfer1"] > 0 and cut["transfer2"] > 0 and cut["angle"] != 0
    # `pair_scale` multiplies the pair terms' share of the total and leaves classification alone
    scaled = growth_loss(new, frozen, x, y, cfg, active, pair_scale=0.25).as_floats()
    pairs = full["total"] - cfg.w_class * full["class"]
    assert abs(pairs) > 1e-3
    assert scaled["total"] == pytest.approx(cfg.w_class * full["class"] + 0.25 * pairs, rel=1e-5)
    assert all(scaled[k] == pytest.approx(full[k], rel=1e-6) for k in ("class", "angle", "transfer1", "transfer2"))


@pytest.mark.parametrize(("clamp", "clean_bn_stats"), [("batch", False), ("image", True)])
def test_batched_forwards_give_the_same_loss_gradients_and_buffers(digits_runs, clamp: str,
                                                                    clean_bn_stats: bool) -> None:
    """The new model's 2·S perturbed forwards in one (BatchNorm per chunk, `deflect grow` on CUDA for a
    `--step fast` set) give the loss, gradients and running statistics of one forward each."""
    import copy

    from deflect.config import make_config
    from deflect.inference import inference_copy
    from deflect.train.grow import growth_loss
    from deflect.train.losses import ActiveTerms

    store, ids = digits_runs  # trained models: perturbations along their gradients raise their losses
    new, *frozen = deflect.load_set(ids["independent"], store)
    frozen = [inference_copy(m, "cpu") for m in frozen]
    new.train()  # training mode: BatchNorm's batch statistics and running statistics are in play
    cfg = make_config(3, "digits", transfer_clamp=clamp, transfer_batch=16, clean_bn_stats=clean_bn_stats)
    active = ActiveTerms.all_enabled(cfg)
    x, y = deflect.load_dataset("digits", "train").batch(torch.arange(48))
    start = copy.deepcopy(new.state_dict())
    results = []
    for batched in (False, True):
        new.load_state_dict(start)
        new.zero_grad()
        parts = growth_loss(new, frozen, x, y, cfg, active, batched=batched)
        parts.total.backward()
        results.append((parts.as_floats(), [p.grad.clone() for p in new.parameters()],
                        {k: v.clone() for k, v in new.state_dict().items()}))
    (values, grads, buffers), (values_b, grads_b, buffers_b) = results
    assert values["transfer1"] > 0 and values["transfer2"] > 0
    for name, value in values.items():
        assert values_b[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
    for a, b in zip(grads, grads_b, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    for key, value in buffers.items():
        torch.testing.assert_close(buffers_b[key], value, rtol=1e-5, atol=1e-6, msg=key)
    tracked = int(buffers_b["features.1.num_batches_tracked"]) - int(start["features.1.num_batches_tracked"])
    assert tracked == (2 if clean_bn_stats else 2 + 2 * len(frozen))  # 2 clean forwards, 2·S perturbed unless kept out
