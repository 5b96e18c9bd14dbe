"""Replaying a simulation attack by attack: the state the dashboard's replay screen draws.

A stored simulation keeps, per round, one [client, model, outcome] triple per attack, the models
released that round and the rotations made after it; with the clients' slots (kept with the
simulation) that is enough to redraw every client's model and every attack in order. Rounds stored
without per-attack triples replay a round at a time. No Textual here: the rules are tested alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from deflect.simulate import DEFLECTED, SUCCEEDED, VOID, wilson_interval

OUTCOME_NAMES = {VOID: "void", DEFLECTED: "deflected", SUCCEEDED: "succeeded"}


@dataclass(frozen=True)
class ReplayEvent:
    """One step: an attack on a client (client None when a whole round is replayed at once)."""

    round: int
    client: int | None
    model: int | None
    outcome: int | None
    rotations: tuple[dict[str, int], ...] = ()  # rotations made when this step ended its round


@dataclass
class Replay:
    """Counters and client models after the steps played so far; feed rounds, then `step()`."""

    n_models: int
    client_slots: list[int]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    round_index: int = 0  # rounds[round_index] is being played
    attack_index: int = 0  # next attack within it
    sent: int = 0
    void: int = 0
    deflected: int = 0
    succeeded: int = 0
    hits: list[int] = field(default_factory=list)
    released: list[int] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    last: ReplayEvent | None = None

    def __post_init__(self) -> None:
        self.hits = self.hits or [0] * self.n_models
        if self.rounds and not self.released:
            self.released = list(self.rounds[0].get("released") or range(self.n_models))

    @classmethod
    def from_simulation(cls, n_models: int, rounds: Sequence[dict[str, Any]], params: dict[str, Any]) -> Replay:
        return cls(n_models, list(params.get("client_slots") or []), list(rounds))

    def add_round(self, round_data: dict[str, Any]) -> None:
        """A round that has just been played live (simulations in progress grow while replayed)."""
        self.rounds.append(round_data)
        if len(self.rounds) == 1 and not self.released:
            self.released = list(round_data.get("released") or range(self.n_models))

    # derived --------------------------------------------------------------------------------
    @property
    def counted(self) -> int:
        return self.deflected + self.succeeded

    @property
    def rate(self) -> float | None:
        return self.deflected / self.counted if self.counted else None

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.deflected, self.counted)

    @property
    def done(self) -> bool:
        """Every stored round replayed (a live simulation may still add more)."""
        return self.round_index >= len(self.rounds)

    @property
    def round_number(self) -> int:
        if not self.rounds:
            return 0
        return int(self.rounds[min(self.round_index, len(self.rounds) - 1)].get("round", self.round_index + 1))

    def client_model(self, client: int) -> int | None:
        """The model a client holds now (None when its slot was not stored)."""
        if client >= len(self.client_slots) or not self.released:
            return None
        return self.released[self.client_slots[client] % len(self.released)]

    # playing --------------------------------------------------------------------------------
    def step(self) -> ReplayEvent | None:
        """Play the next attack (or the next whole round, for rounds without per-attack records)."""
        if self.done:
            return None
        data = self.rounds[self.round_index]
        number = int(data.get("round", self.round_index + 1))
        attacks = data.get("attacks") or []
        if attacks:
            client, model, outcome = (int(v) for v in attacks[self.attack_index])
            self._count(model, outcome)
            self.attack_index += 1
            event = ReplayEvent(number, client, model, outcome)
            if self.attack_index >= len(attacks):
                event = ReplayEvent(number, client, model, outcome, self._end_round(data))
        else:
            self.sent += int(data.get("sent", 0))
            self.void += int(data.get("void", 0))
            self.deflected += int(data.get("deflected", 0))
            self.succeeded += int(data.get("succeeded", 0))
            for v, h in enumerate(data.get("hits") or []):
                self.hits[v] += int(h)
            event = ReplayEvent(number, None, None, None, self._end_round(data))
        self.last = event
        return event

    def run_to_end_of_round(self) -> None:
        start = self.round_index
        while not self.done and self.round_index == start:
            self.step()

    def _count(self, model: int, outcome: int) -> None:
        self.sent += 1
        if outcome == VOID:
            self.void += 1
        elif outcome == DEFLECTED:
            self.deflected += 1
        else:
            self.succeeded += 1
            self.hits[model] += 1

    def _end_round(self, data: dict[str, Any]) -> tuple[dict[str, int], ...]:
        rotations = tuple(data.get("rotations") or [])
        number = int(data.get("round", self.round_index + 1))
        for rot in rotations:
            slot, retired, fresh = int(rot["slot"]), int(rot["retired"]), int(rot["released"])
            if 0 <= slot < len(self.released):
                self.released[slot] = fresh
            self.log.append(f"round {number}: model {retired} retired after {rot.get('hits', '?')} hits, "
                            f"model {fresh} released")
        self.round_index += 1
        self.attack_index = 0
        if not self.done:
            nxt = self.rounds[self.round_index].get("released")
            if nxt:
                self.released = list(nxt)
        return rotations
