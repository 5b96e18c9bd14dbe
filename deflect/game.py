"""The attacker game's rules: the player is the adversary of a randomly deployed set.

The player has a budget. Models of the set can be bought (the j-th one costs j × `model_price`,
so owning more gets dearer, as it would for a real adversary who has to steal or buy them).
Each round the player picks an attack and a target image, crafts the example on the models they
own, and pays `send_cost` per client to send it to clients they cannot see. The game reveals,
client by client, which model answered and whether it was fooled, deflected it, or was wrong
on the clean image already (void: nothing to deflect). A round scores the clients fooled.

At the end the game compares the player's score with what the transfer matrices say the best
play would have got: for every number of bought models k, the best k models and attack, and
every remaining coin spent on sending. This module has no Textual in it: the dashboard's game
screen only renders an `AttackerGame`, and the rules are tested on their own.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from math import comb

import numpy as np
import torch
from torch import nn

from deflect.attacks import Attack
from deflect.errors import DeflectError
from deflect.report import own_settings
from deflect.store import Evaluation, largest_by, settings_key

FOOLED, DEFLECTED, VOID = "fooled", "deflected", "void"
MAX_SUBSETS = 5000  # exhaustive search of owned sets up to this many per k, greedy beyond


@dataclass(frozen=True)
class GameRules:
    """Prices and limits of one game; `clients` unknown clients are served by the n models."""

    n: int
    budget: int = 100
    model_price: int = 10
    send_cost: int = 1
    rounds: int = 5
    max_send: int = 12
    clients: int = 48

    def __post_init__(self) -> None:
        if self.n < 1:
            raise DeflectError(f"a game needs a set of at least one model, got n={self.n}")
        if min(self.budget, self.model_price, self.send_cost, self.rounds, self.max_send, self.clients) < 1:
            raise DeflectError("budget, prices, rounds, max_send and clients must all be at least 1")

    def price(self, k: int) -> int:
        """Total price of owning k models: the j-th costs j × model_price."""
        return self.model_price * k * (k + 1) // 2


@dataclass(frozen=True)
class SuccessTable:
    """Per attack, the share (0-1) of each model's correctly answered images that an example
    crafted on a source flips (`success[src][tgt]`; the diagonal is white-box), each model's clean
    accuracy (0-1), and per attack the stored ensemble rows keyed by the owned models."""

    success: dict[str, list[list[float]]]
    clean: dict[str, list[float]]
    ensembles: dict[str, dict[tuple[int, ...], list[float]]] = field(default_factory=dict)

    @property
    def attacks(self) -> list[str]:
        return list(self.success)

    @classmethod
    def from_evaluations(cls, transfer: Sequence[Evaluation], ensemble: Sequence[Evaluation] = ()) -> SuccessTable:
        """The newest transfer evaluation of each attack (and any ensemble rows) of one run."""
        success: dict[str, list[list[float]]] = {}
        clean: dict[str, list[float]] = {}
        for ev in transfer:
            if ev.success and ev.clean_acc and len(ev.success) == len(ev.clean_acc):
                success[ev.attack] = [[v / 100 for v in row] for row in ev.success]
                clean[ev.attack] = [v / 100 for v in ev.clean_acc]
        ensembles: dict[str, dict[tuple[int, ...], list[float]]] = {}
        for ev in sorted(ensemble, key=lambda e: (e.n_examples, e.id or 0)):  # the largest, newest rows win
            labels = (ev.extra or {}).get("row_labels") or []
            if ev.attack not in success or not ev.success:
                continue
            for label, row in zip(labels, ev.success, strict=False):
                try:
                    owned = tuple(sorted(int(i) for i in str(label).split(",")))
                except ValueError:
                    continue
                ensembles.setdefault(ev.attack, {})[owned] = [v / 100 for v in row]
        return cls(success, clean, ensembles)

    def fool_probability(self, attack: str, owned: Sequence[int], victim: int) -> float:
        """Chance that an example crafted on `owned` and sent to `victim` counts and fools it.

        A stored ensemble row for exactly these models (`deflect evaluate --ensemble k`) is the
        measured figure and is used when there is one. Without it, the figure for each victim is
        the best of the owned models' single-source rows (white-box when the victim is owned): an
        estimate of the averaged-logits example that assumes it does on every model as well as the
        best single source does, which ensemble attacks come near on their members and often pass
        on the others, but which no measurement backs.
        """
        if not owned:
            return 0.0
        key = tuple(sorted(owned))
        row = self.ensembles.get(attack, {}).get(key)
        s = row[victim] if row is not None else max(self.success[attack][i][victim] for i in key)
        return self.clean[attack][victim] * s


@dataclass(frozen=True)
class ClientOutcome:
    client: int
    model: int
    outcome: str  # FOOLED | DEFLECTED | VOID


@dataclass(frozen=True)
class GameRound:
    number: int
    attack: str
    image: int
    owned: tuple[int, ...]
    cost: int
    results: tuple[ClientOutcome, ...]
    expected: float  # fooled clients the transfer matrices expected for this send

    def count(self, outcome: str) -> int:
        return sum(r.outcome == outcome for r in self.results)

    @property
    def score(self) -> int:
        return self.count(FOOLED)


@dataclass(frozen=True)
class OptimalPlay:
    """The best play the matrices allow: which models to buy, which attack, how many sends."""

    owned: tuple[int, ...]
    attack: str
    sends: int
    expected: float  # fooled clients expected


class AttackerGame:
    """State of one game. `assignment[c]` is the model that client c holds (hidden from the player)."""

    def __init__(self, rules: GameRules, assignment: Sequence[int], table: SuccessTable, seed: int = 0) -> None:
        if len(assignment) != rules.clients:
            raise DeflectError(f"assignment has {len(assignment)} clients, the rules say {rules.clients}")
        if any(not 0 <= m < rules.n for m in assignment):
            raise DeflectError(f"assignment names a model outside 0..{rules.n - 1}")
        if not table.attacks:
            raise DeflectError("no transfer evaluation to play with: run 'deflect evaluate RUN' first")
        self.rules = rules
        self.assignment = list(assignment)
        self.table = table
        self.rng = np.random.default_rng(seed)
        self.owned: list[int] = []
        self.spent = 0
        self.rounds: list[GameRound] = []

    # state ----------------------------------------------------------------------------------
    @property
    def budget_left(self) -> int:
        return self.rules.budget - self.spent

    @property
    def score(self) -> int:
        return sum(r.score for r in self.rounds)

    @property
    def expected_score(self) -> float:
        return sum(r.expected for r in self.rounds)

    @property
    def over(self) -> bool:
        return len(self.rounds) >= self.rules.rounds or self.budget_left < self.rules.send_cost

    def next_price(self) -> int:
        """What buying one more model costs now."""
        return self.rules.model_price * (len(self.owned) + 1)

    def shares(self) -> list[float]:
        counts = np.bincount(self.assignment, minlength=self.rules.n)
        return (counts / counts.sum()).tolist()

    def max_sendable(self) -> int:
        return max(0, min(self.rules.max_send, self.budget_left // self.rules.send_cost))

    # moves ----------------------------------------------------------------------------------
    def buy(self, model: int) -> int:
        """Buy `model`; returns what it cost."""
        if self.over:
            raise DeflectError("the game is over")
        if not 0 <= model < self.rules.n:
            raise DeflectError(f"there is no model {model}; the set has models 0..{self.rules.n - 1}")
        if model in self.owned:
            raise DeflectError(f"model {model} is already yours")
        price = self.next_price()
        if price > self.budget_left:
            raise DeflectError(f"model {model} costs {price}, you have {self.budget_left} left")
        self.owned.append(model)
        self.spent += price
        return price

    def expected_fooled(self, attack: str, owned: Sequence[int], count: int) -> float:
        """Fooled clients expected when `count` random clients receive an example crafted on `owned`."""
        shares = self.shares()
        per_send = sum(shares[v] * self.table.fool_probability(attack, owned, v) for v in range(self.rules.n))
        return count * per_send

    def send(self, attack: str, image: int, count: int, outcomes: Sequence[str]) -> GameRound:
        """Send one crafted example to `count` distinct random clients.

        `outcomes[v]` is what model v does with this example (FOOLED/DEFLECTED/VOID): the screen
        crafts the example on the owned models and asks every model; tests pass fixed outcomes.
        """
        if self.over:
            raise DeflectError("the game is over")
        if not self.owned:
            raise DeflectError("buy at least one model first: an attack is crafted on the models you own")
        if attack not in self.table.success:
            raise DeflectError(f"no transfer evaluation for attack {attack!r}; choose one of: "
                               f"{', '.join(self.table.attacks)}")
        if len(outcomes) != self.rules.n or any(o not in (FOOLED, DEFLECTED, VOID) for o in outcomes):
            raise DeflectError(f"need one outcome per model ({self.rules.n}) among fooled/deflected/void")
        if not 1 <= count <= self.max_sendable():
            raise DeflectError(f"you can send to 1..{self.max_sendable()} clients this round, not {count}")
        clients = sorted(int(c) for c in self.rng.choice(self.rules.clients, size=count, replace=False))
        results = tuple(ClientOutcome(c, self.assignment[c], outcomes[self.assignment[c]]) for c in clients)
        cost = count * self.rules.send_cost
        self.spent += cost
        played = GameRound(len(self.rounds) + 1, attack, image, tuple(sorted(self.owned)), cost, results,
                           self.expected_fooled(attack, self.owned, count))
        self.rounds.append(played)
        return played

    # the matrices' verdict ------------------------------------------------------------------
    def optimal(self) -> OptimalPlay:
        """Best expected play over the whole game from the start: buy k models, spend the rest on sends."""
        rules = self.rules
        best = OptimalPlay((), self.table.attacks[0], 0, 0.0)
        for k in range(1, rules.n + 1):
            left = rules.budget - rules.price(k)
            if left < rules.send_cost:
                break
            sends = min(rules.rounds * rules.max_send, left // rules.send_cost)
            for attack in self.table.attacks:
                owned = self._best_owned(attack, k)
                value = self.expected_fooled(attack, owned, sends)
                if value > best.expected + 1e-12:
                    best = OptimalPlay(owned, attack, sends, value)
        return best

    def _best_owned(self, attack: str, k: int) -> tuple[int, ...]:
        n = self.rules.n
        shares = self.shares()

        def value(owned: tuple[int, ...]) -> float:
            return sum(shares[v] * self.table.fool_probability(attack, owned, v) for v in range(n))

        if comb(n, k) <= MAX_SUBSETS:
            return max(itertools.combinations(range(n), k), key=value)
        owned: tuple[int, ...] = ()
        for _ in range(k):  # greedy: add the model that helps most
            owned = max((tuple(sorted((*owned, v))) for v in range(n) if v not in owned), key=value)
        return owned


def as_crafted(transfer: Sequence[Evaluation], ensemble: Sequence[Evaluation], dataset: str
               ) -> tuple[list[Evaluation], list[Evaluation]]:
    """The evaluations a game's expected score may use: the attack's own settings for `dataset` (as the
    game crafts it: no ε or step override, no bf16) on the test split, where its images come from;
    of the transfer evaluations, each attack's largest (the newest of equals)."""
    def default(ev: Evaluation) -> bool:
        own = own_settings(ev.attack, dataset, (ev.params or {}).get("m"))  # any images: the seed is not a setting
        return own is not None and (ev.params or {}).get("split", "test") == "test" and settings_key(ev) == own

    largest = largest_by((ev for ev in transfer if default(ev)), lambda ev: ev.attack)
    return list(largest.values()), [ev for ev in ensemble if default(ev)]


def craft_outcomes(models: Sequence[nn.Module], owned: Sequence[int], attack: Attack, x: torch.Tensor,
                   y: torch.Tensor, seed: int = 0) -> list[str]:
    """Craft one example on the owned models (their averaged logits when several) and ask every model.

    `x` is one image [1, C, H, W] in [0,1]; returns FOOLED/DEFLECTED/VOID per model of the set.
    """
    if not owned:
        raise DeflectError("an attack needs at least one owned model to be crafted on")
    sources = [models[i] for i in owned]
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):  # forks only x's device
        torch.manual_seed(seed)
        x_adv = attack(sources[0] if len(sources) == 1 else sources, x, y)
    outcomes = []
    with torch.no_grad():
        for m in models:
            clean_ok = bool(m(x).argmax(1).eq(y).all())
            adv_ok = bool(m(x_adv).argmax(1).eq(y).all())
            outcomes.append(VOID if not clean_ok else DEFLECTED if adv_ok else FOOLED)
    return outcomes
