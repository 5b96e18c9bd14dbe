"""The attacker game's rules (deflect.game), without the dashboard."""

from __future__ import annotations

import itertools

import pytest
import torch

from deflect.attacks import make_attack
from deflect.errors import DeflectError
from deflect.game import (
    DEFLECTED,
    FOOLED,
    VOID,
    AttackerGame,
    GameRules,
    SuccessTable,
    as_crafted,
    craft_outcomes,
)
from deflect.sets import load_set
from deflect.store import Evaluation, Run, Store

# three models: white-box success 0.9; model 0's examples transfer to model 1 (0.5), nothing else transfers
SUCCESS = [[0.9, 0.5, 0.0], [0.0, 0.9, 0.0], [0.0, 0.0, 0.9]]
CLEAN = [1.0, 0.8, 0.5]


def table() -> SuccessTable:
    return SuccessTable({"pgd1": SUCCESS, "fgsm": [[0.3] * 3] * 3}, {"pgd1": CLEAN, "fgsm": [1.0] * 3})


def game(**rules: int) -> AttackerGame:
    values = dict(n=3, clients=6, budget=100, model_price=10, send_cost=1, rounds=3, max_send=4)
    values.update(rules)
    return AttackerGame(GameRules(**values), [0, 0, 1, 1, 2, 2], table(), seed=0)


def test_price_rises_with_the_number_of_models_bought() -> None:
    rules = GameRules(n=4, model_price=10)
    assert [rules.price(k) for k in range(5)] == [0, 10, 30, 60, 100]
    g = game()
    assert g.buy(2) == 10 and g.buy(0) == 20 and g.budget_left == 70 and g.next_price() == 30


@pytest.mark.parametrize("move, message", [
    (lambda g: g.buy(3), "no model 3"),
    (lambda g: (g.buy(1), g.buy(1)), "already yours"),
    (lambda g: g.send("pgd1", 0, 2, [FOOLED] * 3), "buy at least one model"),
])
def test_illegal_moves_are_refused(move, message: str) -> None:
    with pytest.raises(DeflectError, match=message):
        move(game())


def test_a_model_beyond_the_budget_cannot_be_bought() -> None:
    g = game(budget=25)
    g.buy(0)
    with pytest.raises(DeflectError, match="costs 20, you have 15"):
        g.buy(1)
    assert g.owned == [0] and g.budget_left == 15


def test_send_reveals_each_clients_model_and_scores_the_fooled() -> None:
    g = game()
    g.buy(0)
    played = g.send("pgd1", 5, 4, [FOOLED, DEFLECTED, VOID])
    clients = [r.client for r in played.results]
    assert len(set(clients)) == 4 and clients == sorted(clients)
    for r in played.results:
        assert r.model == [0, 0, 1, 1, 2, 2][r.client]
        assert r.outcome == {0: FOOLED, 1: DEFLECTED, 2: VOID}[r.model]
    assert played.score == sum(r.model == 0 for r in played.results) == g.score
    assert g.budget_left == 100 - 10 - 4 and played.cost == 4 and played.image == 5
    # expected: 4 sends × Σ_v share_v · clean_v · s(0→v) = 4 × (1/3·1·0.9 + 1/3·0.8·0.5 + 0)
    assert played.expected == pytest.approx(4 * (0.9 + 0.4) / 3)


def test_send_checks_attack_outcomes_and_count() -> None:
    g = game()
    g.buy(0)
    with pytest.raises(DeflectError, match="no transfer evaluation for attack 'cw1'"):
        g.send("cw1", 0, 1, [FOOLED] * 3)
    with pytest.raises(DeflectError, match="one outcome per model"):
        g.send("pgd1", 0, 1, [FOOLED])
    with pytest.raises(DeflectError, match="1..4 clients"):
        g.send("pgd1", 0, 5, [FOOLED] * 3)
    assert g.rounds == [] and g.budget_left == 90


def test_the_game_ends_after_its_rounds_or_when_money_runs_out() -> None:
    g = game(rounds=2)
    g.buy(0)
    for _ in range(2):
        g.send("pgd1", 0, 1, [FOOLED] * 3)
    assert g.over
    with pytest.raises(DeflectError, match="over"):
        g.send("pgd1", 0, 1, [FOOLED] * 3)
    poor = game(budget=12, rounds=10)
    poor.buy(0)
    poor.send("pgd1", 0, 2, [FOOLED] * 3)
    assert poor.budget_left == 0 and poor.over


def test_optimal_play_is_the_best_of_every_strategy() -> None:
    g = game(budget=40, rounds=2, max_send=4)
    best = g.optimal()
    rules = g.rules
    brute = 0.0
    for k in range(1, 4):
        sends = min(rules.rounds * rules.max_send, (rules.budget - rules.price(k)) // rules.send_cost)
        if sends < 1:
            continue
        for owned in itertools.combinations(range(3), k):
            for attack in ("pgd1", "fgsm"):
                brute = max(brute, g.expected_fooled(attack, owned, sends))
    assert best.expected == pytest.approx(brute)
    # two models (price 30) leave 10 coins, 8 sends; owning 0 and 2 fools per send
    # (1·0.9 + 0.8·0.5 + 0.5·0.9) / 3, better than any one model (at most 0.9 + 0.4) or pair
    assert (best.owned, best.attack) == ((0, 2), "pgd1")
    assert best.expected == pytest.approx(8 * 1.75 / 3)
    assert best.sends == 8


def test_success_table_reads_stored_evaluations_and_prefers_ensemble_rows() -> None:
    transfer = Evaluation(run_id="r", kind="transfer", attack="pgd1", success=[[90.0, 10.0], [20.0, 80.0]],
                          clean_acc=[100.0, 50.0])
    ensemble = Evaluation(run_id="r", kind="ensemble", attack="pgd1", success=[[95.0, 99.0]],
                          extra={"row_labels": ["0,1"]})
    t = SuccessTable.from_evaluations([transfer], [ensemble])
    assert t.attacks == ["pgd1"]
    assert t.fool_probability("pgd1", [0], 1) == pytest.approx(0.5 * 0.1)
    assert t.fool_probability("pgd1", [1, 0], 1) == pytest.approx(0.5 * 0.99)  # the ensemble row
    assert t.fool_probability("pgd1", [], 0) == 0.0


def test_bad_game_setups_are_refused() -> None:
    with pytest.raises(DeflectError, match="at least 1"):
        GameRules(n=2, budget=0)
    with pytest.raises(DeflectError, match="assignment has 2 clients"):
        AttackerGame(GameRules(n=2, clients=3), [0, 1], table())
    with pytest.raises(DeflectError, match="no transfer evaluation"):
        AttackerGame(GameRules(n=2, clients=2), [0, 1], SuccessTable({}, {}))


def test_craft_outcomes_white_box_fools_the_owned_model(digits_runs) -> None:
    store, ids = digits_runs
    models = [m.eval() for m in load_set(ids["independent"], store)]
    from deflect.data import load_dataset

    test = load_dataset("digits", "test")
    x, y = test.batch(torch.arange(40))
    attack = make_attack("pgd1", "digits")
    fooled = 0
    for i in range(40):
        out = craft_outcomes(models, [0], attack, x[i:i + 1], y[i:i + 1], seed=i)
        assert len(out) == 3 and set(out) <= {FOOLED, DEFLECTED, VOID}
        with torch.no_grad():
            clean_ok = [bool(m(x[i:i + 1]).argmax(1) == y[i]) for m in models]
        assert [o != VOID for o in out] == clean_ok
        fooled += out[0] == FOOLED
    assert fooled >= 30  # white-box PGD on an undefended model breaks nearly every image


def test_evaluate_ensemble_stores_success_rows_the_game_plays_with(digits_runs) -> None:
    """`deflect evaluate --ensemble 2` feeds the game its measured pair rows."""
    from deflect.pipeline import RunEvaluator

    store, ids = digits_runs
    evaluator = RunEvaluator(store, ids["disjoint"], limit=60)
    evaluator.transfer("fgsm")
    res, ev = evaluator.ensemble("fgsm", 2, None)
    assert len(ev.success) == len(res.subsets) == 3 and all(len(row) == 3 for row in ev.success)
    for acc_row, success_row in zip(res.matrix, res.success, strict=True):
        for acc, success, clean in zip(acc_row, success_row, res.clean, strict=True):
            assert 0.0 <= success <= 100.0
            # the target is right on at least the clean images it keeps: clean·(1 − success) ≤ accuracy
            assert clean * (1 - success / 100) <= acc + 1e-9
    owned_pair = [0, 1]
    assert max(res.success[0][j] for j in owned_pair) > 0  # FGSM crafted on the pair flips some of its images
    table = SuccessTable.from_evaluations(list(store.newest_transfer(ids["disjoint"]).values()),
                                          store.evaluations(ids["disjoint"], "ensemble"))
    assert set(table.ensembles["fgsm"]) == {(0, 1), (0, 2), (1, 2)}
    clean = res.clean[2] / 100
    assert table.fool_probability("fgsm", [1, 0], 2) == pytest.approx(clean * res.success[0][2] / 100)


def test_a_small_check_never_stands_in_for_a_larger_evaluation() -> None:
    """The matrix screen and the game read `newest_transfer`: the largest evaluation, newest of equals."""
    store = Store("x.db")
    store.add_run(Run(id="r", method="disjoint", dataset="digits", arch="cnn", preset="digits", n=3, run_dir="runs/r"))
    big = store.add_evaluation(Evaluation(run_id="r", kind="transfer", attack="pgd1", n_examples=1000))
    store.add_evaluation(Evaluation(run_id="r", kind="transfer", attack="pgd1", n_examples=1))
    assert store.newest_transfer("r")["pgd1"].id == big.id
    again = store.add_evaluation(Evaluation(run_id="r", kind="transfer", attack="pgd1", n_examples=1000))
    assert store.newest_transfer("r")["pgd1"].id == again.id
    # other settings measured since: shown (the newest settings), on however many images
    wider = store.add_evaluation(Evaluation(run_id="r", kind="transfer", attack="pgd1", n_examples=100,
                                            params={"eps": 0.3}))
    assert store.newest_transfer("r")["pgd1"].id == wider.id


def test_the_game_scores_with_evaluations_of_the_attacks_it_crafts() -> None:
    """As the game crafts: the attack's own settings for the dataset, test images, float32."""
    own = make_attack("pgd1", "digits").params()
    rows = [Evaluation(id=1, run_id="r", kind="transfer", attack="pgd1", n_examples=360,
                       params={**own, "split": "test"}),
            Evaluation(id=2, run_id="r", kind="transfer", attack="pgd1", n_examples=1000,
                       params={**own, "eps": 0.3, "split": "test"}),
            Evaluation(id=3, run_id="r", kind="transfer", attack="pgd1", n_examples=1000,
                       params={**own, "split": "val"}),
            Evaluation(id=4, run_id="r", kind="transfer", attack="pgd1", n_examples=1000,
                       params={**own, "precision": "bf16", "split": "test"}),
            Evaluation(id=5, run_id="r", kind="transfer", attack="fgsm", n_examples=360,
                       params={**make_attack("fgsm", "fashion-mnist").params(), "split": "test"})]
    pairs = [Evaluation(id=6, run_id="r", kind="ensemble", attack="pgd1", params={**own, "m": 2, "split": "test"}),
             Evaluation(id=7, run_id="r", kind="ensemble", attack="pgd1", params={**own, "eps": 0.3, "m": 2})]
    transfer, ensemble = as_crafted(rows, pairs, "digits")
    assert [ev.id for ev in transfer] == [1] and [ev.id for ev in ensemble] == [6]
