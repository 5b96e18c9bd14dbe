"""Replaying a stored simulation attack by attack (deflect.replay)."""

from __future__ import annotations

import math

import pytest

from deflect.replay import Replay
from deflect.simulate import DEFLECTED, SUCCEEDED, VOID, wilson_interval

ROUNDS = [
    {"round": 1, "released": [0, 1], "attacks": [[0, 0, SUCCEEDED], [1, 1, DEFLECTED], [2, 0, SUCCEEDED],
                                                 [3, 1, VOID]],
     "rotations": [{"slot": 0, "retired": 0, "released": 2, "hits": 2}]},
    {"round": 2, "released": [2, 1], "attacks": [[0, 2, DEFLECTED], [2, 2, DEFLECTED]], "rotations": []},
]
SLOTS = [0, 1, 0, 1]


def test_replay_counts_attacks_and_rotates_models() -> None:
    replay = Replay.from_simulation(3, ROUNDS, {"client_slots": SLOTS})
    assert [replay.client_model(c) for c in range(4)] == [0, 1, 0, 1]
    first = replay.step()
    assert first is not None and (first.round, first.client, first.model, first.outcome) == (1, 0, 0, SUCCEEDED)
    assert replay.succeeded == 1 and replay.hits == [1, 0, 0] and replay.rate == 0.0
    for _ in range(3):
        last = replay.step()
    assert last is not None and last.rotations and replay.round_index == 1
    assert replay.released == [2, 1] and [replay.client_model(c) for c in range(4)] == [2, 1, 2, 1]
    assert replay.log == ["round 1: model 0 retired after 2 hits, model 2 released"]
    assert (replay.sent, replay.void, replay.deflected, replay.succeeded) == (4, 1, 1, 2)
    replay.run_to_end_of_round()
    assert replay.done and replay.step() is None
    assert (replay.sent, replay.counted, replay.deflected) == (6, 5, 3)
    assert replay.rate == pytest.approx(3 / 5)
    assert replay.interval == pytest.approx(wilson_interval(3, 5))


def test_rounds_without_attack_records_replay_a_round_at_a_time() -> None:
    rounds = [{"round": 1, "released": [0, 1], "sent": 10, "void": 1, "deflected": 6, "succeeded": 3,
               "hits": [2, 1], "rotations": []}]
    replay = Replay.from_simulation(2, rounds, {})
    event = replay.step()
    assert event is not None and event.client is None and replay.done
    assert (replay.sent, replay.deflected, replay.succeeded, replay.hits) == (10, 6, 3, [2, 1])
    assert replay.client_model(0) is None


def test_a_live_simulation_grows_while_replayed() -> None:
    replay = Replay(3, SLOTS)
    assert replay.done and replay.rate is None and math.isnan(replay.interval[0])
    replay.add_round(ROUNDS[0])
    assert not replay.done and replay.released == [0, 1]
    replay.run_to_end_of_round()
    assert replay.done
    replay.add_round(ROUNDS[1])
    replay.run_to_end_of_round()
    assert replay.sent == 6 and replay.hits == [2, 0, 0]
