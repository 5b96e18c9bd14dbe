"""Keyed deployment, staged release, the Wilson interval and scenario files (no model needed)."""

from __future__ import annotations

import os
import stat
from collections import Counter
from pathlib import Path

import pytest

from deflect.deploy import (
    Deployment,
    ReleasePolicy,
    client_ids,
    default_key_path,
    load_or_create_key,
    slot_of,
)
from deflect.errors import DeflectError
from deflect.scenario import SHIPPED, Scenario, load_scenario, with_overrides
from deflect.simulate import wilson_interval

KEY = bytes(range(32))


def test_key_file_created_private_reused_and_checked(tmp_path: Path) -> None:
    path = default_key_path(tmp_path / "deflect.db")
    assert path == tmp_path.resolve() / "deflect.key"
    key = load_or_create_key(path)
    assert len(key) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_key(path) == key  # reproducible: the same key on every later call
    other = load_or_create_key(tmp_path / "other.key")
    assert other != key
    os.chmod(path, 0o644)
    with pytest.raises(DeflectError, match=r"accessible by group or others \(mode 0644\).*chmod 600"):
        load_or_create_key(path)
    os.chmod(path, 0o600)
    path.write_text("not hex at all\n")
    with pytest.raises(DeflectError, match="does not hold a deflect key") as err:
        load_or_create_key(path)
    assert "not hex" not in str(err.value)  # the file's content is never echoed


def test_assignment_is_uniform_reproducible_and_keyed() -> None:
    ids = client_ids(6000)
    assert ids[0] == "client-0000" and ids[-1] == "client-5999"
    for n, critical in ((3, 13.82), (5, 18.47)):  # chi-square critical values at p = 0.001 (df 2, 4)
        counts = Counter(slot_of(KEY, c, n) for c in ids)
        expected = len(ids) / n
        chi2 = sum((counts[i] - expected) ** 2 / expected for i in range(n))
        assert sorted(counts) == list(range(n)) and chi2 < critical, (n, counts, chi2)
    a = [slot_of(KEY, c, 3) for c in ids]
    assert a == [slot_of(bytes(KEY), c, 3) for c in ids]  # the key reproduces every assignment
    b = [slot_of(b"another key of 32 bytes........", c, 3) for c in ids]
    agree = sum(x == y for x, y in zip(a, b, strict=True)) / len(ids)
    assert 0.28 < agree < 0.39  # without the key: no better than a guess (1/3)
    dep = Deployment(KEY, 4)
    assert dep.released == [0, 1, 2, 3] and dep.unreleased == []
    assert abs(sum(dep.shares(ids)) - 1.0) < 1e-9 and min(dep.shares(ids)) > 0.22


def test_staged_release_retires_hit_models_and_moves_only_their_clients() -> None:
    ids = client_ids(2000)
    dep = Deployment(KEY, 4, ReleasePolicy(initial=2, threshold=10))
    assert len(dep.released) == 2 and len(dep.unreleased) == 2
    assert sorted(dep.released + dep.unreleased) == [0, 1, 2, 3]
    assert dep.release_order() == Deployment(KEY, 4, ReleasePolicy(initial=2)).release_order()
    before = {c: dep.model_for(c) for c in ids}
    assert set(before.values()) == set(dep.released)
    hit, kept = dep.released
    fresh = dep.unreleased[0]
    dep.record_hits(hit, 9)
    assert dep.rotate() == []  # below the threshold: nothing changes
    dep.record_hits(hit, 1)
    dep.record_hits(kept, 3)
    (event,) = dep.rotate()
    assert (event.retired, event.released, event.hits) == (hit, fresh, 10)
    assert dep.released == [fresh, kept] and dep.retired == [hit] and dep.hits[hit] == 10
    after = {c: dep.model_for(c) for c in ids}
    assert all(after[c] == (fresh if before[c] == hit else before[c]) for c in ids)
    # The last fresh model replaces the next one over the threshold; then the pool is exhausted.
    dep.record_hits(kept, 7)
    assert [e.released for e in dep.rotate()] == [dep.release_order()[3]]
    dep.record_hits(fresh, 50)
    assert dep.rotate() == [] and fresh in dep.released
    with pytest.raises(DeflectError, match="between 1 and the set size 4"):
        Deployment(KEY, 4, ReleasePolicy(initial=5))


def test_wilson_interval_matches_known_values() -> None:
    assert wilson_interval(5, 10) == pytest.approx((0.236593, 0.763407), abs=1e-6)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.277533), abs=1e-6)  # z²/(n+z²)
    assert wilson_interval(81, 263) == pytest.approx((0.255289, 0.366210), abs=1e-6)  # scipy's binomtest
    lo, hi = wilson_interval(0, 0)
    assert lo != lo and hi != hi  # nan without trials


def test_shipped_scenarios_parse() -> None:
    found = {p.stem: load_scenario(p) for p in sorted(SHIPPED.glob("*.toml"))}
    assert set(found) >= {"static", "skilled", "oracle-k2", "zero-day"}
    assert found["static"].adversary == "static" and found["static"].owned == 0
    assert found["skilled"].owned == 1 and found["skilled"].attack_name == "mifgsm2"
    assert found["oracle-k2"].adversary == "oracle" and found["oracle-k2"].owned == 2
    assert found["zero-day"].release == ReleasePolicy(initial=2, threshold=25)
    assert load_scenario("zero-day") == found["zero-day"]  # a bare name finds a shipped scenario
    merged = with_overrides(found["oracle-k2"], k=1, rounds=3)
    assert merged.owned == 1 and merged.rounds == 3 and merged.attack_name == "pgd2"


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ('adversary = "static"\nroundz = 3\n', "roundz", "unknown key"),
        ('adversary = "static"\nrounds = "ten"\n', "rounds", "expected an integer, got str"),
        ('adversary = "static"\nclients = 0\n', "clients", "must be at least 1, got 0"),
        ('adversary = "static"\nper_round = true\n', "per_round", "expected an integer, got bool"),
        ('adversary = "ninja"\n', "adversary", "unknown adversary 'ninja'"),
        ('adversary = "static"\nattack = "deepfool"\n', "attack", "unknown attack 'deepfool'"),
        ('adversary = "skilled"\nk = 2\n', "k", "only the oracle adversary chooses k"),
        ('adversary = "oracle"\nk = 3\n[release]\ninitial = 2\n', "k", "k=3 > release.initial=2"),
        ('adversary = "static"\n[release]\nthreshold = -1\n', "release.threshold", "must be at least 1"),
        ('adversary = "static"\n[release]\nevery = 2\n', "release.every", "unknown key"),
        ('adversary = "static"\nrelease = 2\n', "release", "expected a table"),
    ],
)
def test_malformed_scenario_names_file_key_and_problem(tmp_path: Path, text: str, key: str, problem: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(DeflectError) as err:
        load_scenario(path)
    message = str(err.value)
    assert message.startswith(f"{path}: key '{key}': ") and problem in message and "\n" not in message


def test_scenario_file_errors_and_flag_errors(tmp_path: Path) -> None:
    (tmp_path / "syntax.toml").write_text("adversary = \n")
    with pytest.raises(DeflectError, match=r"syntax\.toml: not valid TOML"):
        load_scenario(tmp_path / "syntax.toml")
    with pytest.raises(DeflectError, match=r"scenario file .*missing\.toml does not exist"):
        load_scenario(tmp_path / "missing.toml")
    with pytest.raises(DeflectError, match="no adversary"):
        with_overrides(Scenario())
    with pytest.raises(DeflectError, match="--rounds: must be at least 1, got 0"):
        with_overrides(Scenario(), adversary="static", rounds=0)
    with pytest.raises(DeflectError, match="--k: only the oracle"):
        with_overrides(Scenario(), adversary="static", k=2)
    oracle = load_scenario("oracle-k2")  # k comes from the file, the adversary from a flag: name the file's key
    with pytest.raises(DeflectError, match="^scenario oracle-k2: key 'k' = 2: only the oracle adversary chooses k"):
        with_overrides(oracle, adversary="skilled")
