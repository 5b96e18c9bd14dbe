"""Threat-model scenarios: every knob of one `deflect simulate`, from flags or a TOML file.

A scenario file is data only (read with `tomllib`, nothing in it is executed). Every key is
checked; a bad one raises `DeflectError` naming the file, the key and what is wrong, so the CLI
prints one line. Command-line flags override the file's values.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deflect.attacks import adaptive_attack_names, attack_names
from deflect.deploy import ReleasePolicy
from deflect.errors import DeflectError

__all__ = ["ADVERSARIES", "SHIPPED", "Scenario", "load_scenario", "with_overrides"]

ADVERSARIES = ("static", "skilled", "oracle")
#: Without --attack: a plain attack for the static adversary, a transferable one for the skilled
#: (MI-FGSM; `cw2` is the high-confidence alternative), a strong white-box one for the oracle.
DEFAULT_ATTACK = {"static": "pgd1", "skilled": "mifgsm2", "oracle": "pgd2"}
DEFAULT_ORACLE_K = 2


def _shipped() -> Path:
    """The scenarios shipped with deflect: scenarios/ beside the package in a source checkout (or an
    editable install), else where a wheel puts them (pyproject's data-files: <prefix>/share/deflect/
    scenarios, the prefix being the one the package was installed under: a venv, --user, --prefix)."""
    here = Path(__file__).resolve().parent  # <prefix>/lib/pythonX.Y/site-packages/deflect when installed
    prefixes = [*here.parents[3:4], Path(sys.prefix)]
    candidates = [here.parent / "scenarios", *(prefix / "share" / "deflect" / "scenarios" for prefix in prefixes)]
    return next((c for c in candidates if c.is_dir()), candidates[0])


SHIPPED = _shipped()


@dataclass
class Scenario:
    """Who attacks, with what, how often, against which deployment."""

    adversary: str | None = None
    k: int | None = None  # models of the set the attacker owns (oracle only; default 2)
    attack: str | None = None  # default by adversary, DEFAULT_ATTACK
    clients: int = 1000
    rounds: int = 10
    per_round: int = 100  # adversarial examples sent per round
    seed: int = 0
    run: str | None = None  # default: latest finished disjoint run
    limit: int | None = None  # pool of held-out test images (seeded subset); None: the whole test split
    release: ReleasePolicy = field(default_factory=ReleasePolicy)
    name: str | None = None
    description: str = ""

    @property
    def owned(self) -> int:
        """How many of the set's models the attacker holds: static 0, skilled 1, oracle k."""
        if self.adversary == "oracle":
            return self.k if self.k is not None else DEFAULT_ORACLE_K
        return 1 if self.adversary == "skilled" else 0

    @property
    def attack_name(self) -> str:
        return self.attack or DEFAULT_ATTACK[self.adversary or "static"]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.update(k=self.owned, attack=self.attack_name)
        return data


_INT_MIN = {"k": 1, "clients": 1, "rounds": 1, "per_round": 1, "seed": 0, "limit": 1}
_INT_MAX = {"clients": 1_000_000, "rounds": 100_000, "per_round": 100_000, "seed": 2**32 - 1}
_STRINGS = ("adversary", "attack", "run", "name", "description")
_RELEASE_KEYS = ("initial", "threshold", "pool")
_NAMES = ("adversary", "attack")  # matched in any case, stored in lower case


def _problem(key: str, value: Any) -> str | None:
    """What is wrong with `value` for scenario key `key`, or None."""
    base = key.rsplit(".", 1)[-1]
    if key in _STRINGS:
        if not isinstance(value, str):
            return f"expected a string, got {type(value).__name__} {value!r}"
        if key == "adversary" and value.strip().lower() not in ADVERSARIES:
            return f"unknown adversary {value!r}; choose one of: {', '.join(ADVERSARIES)}"
        if key == "attack" and value.strip().lower() not in [*attack_names(), *adaptive_attack_names()]:
            return f"unknown attack {value!r}; choose one of: {', '.join([*attack_names(), *adaptive_attack_names()])}"
        return None
    if key == "release.pool":
        return None if isinstance(value, bool) else f"expected true or false, got {type(value).__name__} {value!r}"
    if isinstance(value, bool) or not isinstance(value, int):
        return f"expected an integer, got {type(value).__name__} {value!r}"
    low = 1 if key.startswith("release.") else _INT_MIN[base]
    if value < low:
        return f"must be at least {low}, got {value}"
    if base in _INT_MAX and value > _INT_MAX[base]:
        return f"must be at most {_INT_MAX[base]}, got {value}"
    return None


def _check_combination(sc: Scenario) -> tuple[str, str] | None:
    """(key, problem) for settings that are fine alone but not together."""
    if sc.k is not None and sc.adversary in ("static", "skilled") and sc.k != sc.owned:
        return "k", f"only the oracle adversary chooses k; the {sc.adversary} adversary owns {sc.owned} model(s)"
    initial = sc.release.initial
    if initial is not None and sc.adversary == "oracle" and sc.owned > initial:
        return "k", f"the oracle can only buy released models: k={sc.owned} > release.initial={initial}"
    return None


def load_scenario(path: str | os.PathLike) -> Scenario:
    """Parse and validate a scenario file; a bare name (e.g. `zero-day`) finds a shipped scenario."""
    path = Path(path)
    if not path.exists() and path.suffix == "" and (SHIPPED / f"{path.name}.toml").exists():
        path = SHIPPED / f"{path.name}.toml"
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        shipped = ", ".join(sorted(p.stem for p in SHIPPED.glob("*.toml"))) if SHIPPED.is_dir() else ""
        hint = f"; shipped scenarios: {shipped}" if shipped and path.suffix == "" else ""
        raise DeflectError(f"scenario file {path} does not exist{hint}") from None
    except IsADirectoryError:
        raise DeflectError(f"scenario file {path} is a directory") from None
    except UnicodeDecodeError as exc:
        raise DeflectError(f"{path}: not valid TOML: {exc.reason}") from None
    except tomllib.TOMLDecodeError as exc:
        raise DeflectError(f"{path}: not valid TOML: {exc}") from None

    def bad(key: str, problem: str) -> DeflectError:
        return DeflectError(f"{path}: key '{key}': {problem}")

    fields = {f.name for f in dataclasses.fields(Scenario)}
    values: dict[str, Any] = {}
    release: dict[str, int | bool] = {}
    for key, value in data.items():
        if key == "release":
            if not isinstance(value, dict):
                raise bad(key, f"expected a table ([release]), got {type(value).__name__}")
            for sub, v in value.items():
                if sub not in _RELEASE_KEYS:
                    raise bad(f"release.{sub}", f"unknown key; allowed: {', '.join(_RELEASE_KEYS)}")
                if (problem := _problem(f"release.{sub}", v)) is not None:
                    raise bad(f"release.{sub}", problem)
                release[sub] = v
            continue
        if key not in fields:
            allowed = sorted(fields - {"release"}) + ["[release]"]
            raise bad(key, f"unknown key; allowed: {', '.join(allowed)}")
        if (problem := _problem(key, value)) is not None:
            raise bad(key, problem)
        values[key] = value.strip().lower() if key in _NAMES else value
    values.setdefault("name", path.stem)
    scenario = Scenario(**values, release=ReleasePolicy(**release))
    if (combo := _check_combination(scenario)) is not None:
        raise bad(*combo)
    return scenario


def with_overrides(base: Scenario, **flags: Any) -> Scenario:
    """`base` with the command-line values that were given (None: keep), each validated."""
    changes: dict[str, Any] = {}
    for key, value in flags.items():
        if value is None:
            continue
        if key not in {f.name for f in dataclasses.fields(Scenario)} or key == "release":
            raise DeflectError(f"unknown scenario setting {key!r}")
        if (problem := _problem(key, value)) is not None:
            raise DeflectError(f"--{key.replace('_', '-')}: {problem}")
        changes[key] = value.strip().lower() if key in _NAMES else value
    scenario = dataclasses.replace(base, **changes)
    if scenario.adversary is None:
        raise DeflectError("no adversary: give --adversary static|skilled|oracle or a --scenario file")
    if (combo := _check_combination(scenario)) is not None:
        key, problem = combo
        if key in changes or not base.name:
            raise DeflectError(f"--{key}: {problem}")
        raise DeflectError(f"scenario {base.name}: key '{key}' = {getattr(scenario, key)}: {problem}")
    return scenario
