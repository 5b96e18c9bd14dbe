"""Play the paper's threat models (§3) against a randomly deployed set and count deflected attacks.

Definitions (the simulated and the expected rate use the same ones):

* an *attack* is one adversarial example, crafted on the attacker's own model(s) from a held-out
  test image, sent to one client drawn at random; the client's model (keyed assignment,
  `deflect.deploy`) answers;
* it *counts* only if that model classifies the clean image correctly: otherwise there is nothing
  to deflect and it is reported as *void*;
* a counted attack *succeeds* if the model misclassifies the adversarial image and is *deflected*
  otherwise; the deflection rate is deflected / counted, with a Wilson 95% interval;
* the *expected* success is Σ_v w_v·s_v, where s_v is the transfer success of the attacker's
  source on model v (`TransferResult.success`: share of the images v gets right that the attack
  flips; white-box when the attacker owns v) and w_v ∝ (share of clients served by v) × (clean
  accuracy of v), the chance that a counted attack lands on v; summed over rounds when models rotate.

Adversaries: *static* crafts on an independent model of its own, outside the set (trained once by
deflect on the same data and cached as a helper run); *skilled* owns one released model of the
set; *oracle* owns k released models and attacks the average of their logits.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deflect.attacks import RFGSM, Attack, make_attack
from deflect.config import TrainConfig
from deflect.data import ImageTensorDataset, load_dataset
from deflect.deploy import Deployment, Rotation, client_ids, default_key_path, load_or_create_key
from deflect.errors import DeflectError
from deflect.evaluate import craft_and_score, select_subset, success_percent, transfer_matrix
from deflect.helper_runs import helper_run
from deflect.inference import inference_copy
from deflect.pipeline import store_transfer
from deflect.pool import current_pool, refuse_pool
from deflect.runtime import fast_cpu_math
from deflect.scenario import Scenario
from deflect.sets import load_set
from deflect.store import Evaluation, Run, Simulation, Store
from deflect.train import Callbacks, resolve_device
from deflect.train.grow_run import lineage

__all__ = ["RoundResult", "SimCallbacks", "SimulationResult", "deployed_set", "simulate", "wilson_interval"]

STATIC_ROLE = "static-adversary"
STATIC_SEED = 1000  # the static adversary's model: an independent run with this seed
Z95 = 1.959963984540054
VOID, DEFLECTED, SUCCEEDED = 0, 1, 2  # outcome codes of RoundResult.attacks
GRID_CLIENTS = 512  # clients whose slot is stored with a simulation, for the dashboard's client grid


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% by default); (nan, nan) without trials.

    Preferred to the normal approximation because deflection rates often sit near 0 or 1.
    """
    if trials <= 0:
        return math.nan, math.nan
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _rate(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


@dataclass
class RoundResult:
    """Outcome of one round; lists are indexed by model (length n)."""

    round: int
    sent: int
    void: int
    succeeded: int
    deflected: int
    released: list[int]
    sent_to: list[int]
    hits: list[int]
    expected_counted: float  # expected number of counted attacks ...
    expected_succeeded: float  # ... and of successes, from the transfer matrices
    rotations: list[dict[str, int]] = field(default_factory=list)
    # one [client index, model, outcome] per attack, in sending order (VOID / DEFLECTED / SUCCEEDED):
    # what `deflect dashboard` replays client by client
    attacks: list[list[int]] = field(default_factory=list)

    @property
    def counted(self) -> int:
        return self.succeeded + self.deflected

    @property
    def rate(self) -> float | None:
        return _rate(self.deflected, self.counted)

    @property
    def expected_rate(self) -> float | None:
        r = _rate(self.expected_succeeded, self.expected_counted)
        return None if r is None else 1.0 - r

    def to_dict(self) -> dict[str, Any]:
        lo, hi = wilson_interval(self.deflected, self.counted)
        return {**dataclasses.asdict(self), "counted": self.counted, "deflection_rate": self.rate,
                "ci_low": _finite(lo), "ci_high": _finite(hi), "expected_rate": self.expected_rate}


def _finite(v: float) -> float | None:
    return None if math.isnan(v) else v


@dataclass
class SimulationResult:
    """A whole simulation: settings, rounds, totals and the expected figure."""

    run_id: str
    adversary: str
    k: int
    attack: str
    attack_params: dict[str, Any]
    scenario: dict[str, Any]
    owned: list[int]  # models of the set the attacker holds
    static_run: str | None  # the static adversary's own (helper) run
    n_models: int
    pool: int  # held-out test images the attacker draws from
    source_success: list[float]  # s_v (%) of the attacker's source on each model
    source_clean: list[float]  # clean accuracy (%) of each model on the pool
    expected_source: str  # which evaluation gave s_v
    rounds: list[RoundResult] = field(default_factory=list)
    seconds: float = 0.0
    simulation_id: int | None = None
    client_slots: list[int] = field(default_factory=list)  # slot of each of the first GRID_CLIENTS clients
    pool_of: str | None = None  # set when run_id is this set's pool run (staged release with a pool)
    pool_models: list[int] = field(default_factory=list)  # the pool's indices, released after the set's own

    def _sum(self, name: str) -> int:
        return int(sum(getattr(r, name) for r in self.rounds))

    @property
    def sent(self) -> int:
        return self._sum("sent")

    @property
    def void(self) -> int:
        return self._sum("void")

    @property
    def succeeded(self) -> int:
        return self._sum("succeeded")

    @property
    def deflected(self) -> int:
        return self._sum("deflected")

    @property
    def counted(self) -> int:
        return self.succeeded + self.deflected

    @property
    def rate(self) -> float | None:
        """Deflection rate: share of counted attacks that fail."""
        return _rate(self.deflected, self.counted)

    @property
    def ci(self) -> tuple[float, float]:
        return wilson_interval(self.deflected, self.counted)

    @property
    def expected_rate(self) -> float | None:
        succ = sum(r.expected_succeeded for r in self.rounds)
        r = _rate(succ, sum(r.expected_counted for r in self.rounds))
        return None if r is None else 1.0 - r

    @property
    def hits(self) -> list[int]:
        """Successful attacks per model over all rounds."""
        return [sum(r.hits[v] for r in self.rounds) for v in range(self.n_models)]

    @property
    def sent_to(self) -> list[int]:
        return [sum(r.sent_to[v] for r in self.rounds) for v in range(self.n_models)]

    @property
    def rotations(self) -> list[dict[str, int]]:
        return [{"round": r.round, **e} for r in self.rounds for e in r.rotations]

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in dataclasses.asdict(self).items() if k != "rounds"}
        lo, hi = self.ci
        data.update(
            sent=self.sent, void=self.void, counted=self.counted, succeeded=self.succeeded,
            deflected=self.deflected, deflection_rate=self.rate, ci_low=_finite(lo), ci_high=_finite(hi),
            expected_rate=self.expected_rate, hits=self.hits, sent_to=self.sent_to, rotations=self.rotations,
            rounds=[r.to_dict() for r in self.rounds],
        )
        return data


@dataclass
class SimCallbacks:
    """Hooks for a front end: phases (text), crafting progress, each finished round."""

    on_phase: Callable[[str], None] | None = None
    on_progress: Callable[[int, int], None] | None = None
    on_round: Callable[[RoundResult, SimulationResult], None] | None = None
    training: Callbacks | None = None  # forwarded when the static adversary's model is trained


# the static adversary's own model -----------------------------------------------------------------
def static_config(root: Run, device: str = "auto") -> TrainConfig:
    """The recipe of `root`, the first set of the target's lineage (the target itself unless it was
    grown), as an independent pair with its own seed: a normal, unadapted model.

    A grown set's own config would do worse: the models a grow adds may train for fewer epochs
    (`deflect grow --epochs`) than the adversary should. A teacher is the defender's own set, which
    a static adversary does not hold, so its model never distils.
    """
    base = TrainConfig.from_dict(root.config)
    return dataclasses.replace(base, n=2, method="independent", seed=STATIC_SEED, device=device, teacher=None)


def static_adversary(store: Store, run: Run, device: str = "auto",
                     callbacks: Callbacks | None = None) -> tuple[nn.Module, str]:
    """The static adversary's model (model 0 of a cached helper run), training it on first use."""
    cfg = static_config(lineage(store, run.id)[-1], device)
    helper, _ = helper_run(store, cfg, STATIC_ROLE,
                           f"static adversary's own model (deflect simulate, seed {STATIC_SEED})", callbacks)
    return load_set(helper.id, store)[0], helper.id


# expected figure ----------------------------------------------------------------------------------
def _jsonable(params: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(params))


@fast_cpu_math()
def _source_success(
    store: Store, run: Run, models: Sequence[nn.Module], pool: ImageTensorDataset, attack: Attack,
    adversary: str, owned: list[int], static: tuple[nn.Module, str] | None, device: torch.device,
    batch_size: int, progress: Callable[[int, int], None] | None,
) -> tuple[list[float], list[float], str]:
    """(s_v %, clean %, where from) for the attacker's source: a stored evaluation on the same pool
    and attack parameters if there is one, else computed now and stored."""
    params = _jsonable({**attack.params(), "split": "test"})
    if adversary == "skilled":
        for ev in reversed(store.evaluations(run.id, "transfer")):
            if (ev.attack == attack.name and ev.params == params and ev.success and ev.clean_acc
                    and ev.n_examples == len(pool)):
                return ev.success[owned[0]], ev.clean_acc, f"transfer evaluation {ev.id}"
        res = transfer_matrix(models, pool, attack, batch_size=batch_size, seed=0, device=device, progress=progress)
        row = store_transfer(store, run, res)
        return res.success[owned[0]], res.clean, f"transfer evaluation {row.id} (computed now)"

    models = [inference_copy(m, device) for m in models]
    if adversary == "oracle":
        kind, label = "ensemble", ",".join(map(str, owned))
        params = {**params, "m": len(owned)}
        sources = [[models[i] for i in owned]]
    else:
        assert static is not None
        kind, label = "outside", f"static:{static[1]}"
        params = {**params, "source_run": static[1], "source_model": 0}
        sources = [[inference_copy(static[0], device)]]
    for ev in reversed(store.evaluations(run.id, kind)):
        labels = ev.extra.get("row_labels") or []
        if (ev.attack == attack.name and ev.params == params and ev.success and ev.clean_acc
                and ev.extra.get("pool") == len(pool) and ev.extra.get("passes") and label in labels):
            i = labels.index(label)
            return ev.success[i], ev.clean_acc, f"{kind} evaluation {ev.id}"
    start = time.perf_counter()
    adv, flipped, clean, count, passes = _craft_passes(sources, models, pool, attack, batch_size, device, progress)
    matrix = (100.0 * adv / count).tolist()
    success = success_percent(flipped, clean)
    clean_pct = (100.0 * clean / count).tolist()
    owned_set = set(owned)
    unowned = [v for j, v in enumerate(matrix[0]) if j not in owned_set]
    row = store.add_evaluation(Evaluation(
        run_id=run.id, kind=kind, attack=attack.name, params=params, matrix=matrix, success=success,
        clean_acc=clean_pct, whole_set_mean=float(np.mean(matrix)), n_examples=count,
        success_rate=float(np.mean(success[0])), seconds=time.perf_counter() - start,
        extra={"row_labels": [label], "m": len(owned), "pool": len(pool), "passes": passes,
               "by": "deflect simulate", "mean_unowned": float(np.mean(unowned)) if unowned else None},
    ))
    return success[0], clean_pct, f"{kind} evaluation {row.id} (computed now)"


def _craft_passes(
    sources: list[list[nn.Module]], models: Sequence[nn.Module], pool: ImageTensorDataset, attack: Attack,
    batch_size: int, device: torch.device, progress: Callable[[int, int], None] | None,
    target_se: float = 0.3, max_images: int = 5000, max_passes: int = 12,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Craft over the pool once, or, for an attack with a random start or step, again with seeds
    1, 2, ... until the mean success (%) is known to `target_se` (its standard error across passes).

    One pass gives each image one random draw; on a small pool that leaves the expected figure a
    point or more off, and every simulation of the run would repeat the same error. A pool of more
    than max_images / 2 images is crafted once.
    """
    params = attack.params()
    randomised = (bool(params.get("random_start")) or isinstance(attack, RFGSM) or params.get("restarts", 1) > 1
                  or params.get("diversity_prob", 0) > 0)
    limit = min(max_passes, max_images // max(len(pool), 1)) if randomised and 2 * len(pool) <= max_images else 1
    adv = flipped = clean = 0
    count, means = 0, []
    for rep in range(limit):
        cb = (lambda d, t, rep=rep: progress(rep * t + d, limit * t)) if progress else None
        a, f, c, k = craft_and_score(sources, models, pool, attack, batch_size, rep, device, cb)
        adv, flipped, clean, count = adv + a, flipped + f, clean + c, count + k
        means.append(float(np.mean(100.0 * f / np.maximum(c, 1)[None, :])))
        if len(means) >= 2 and np.std(means, ddof=1) / math.sqrt(len(means)) <= target_se:
            break
    if progress:
        progress(1, 1)
    return np.asarray(adv), np.asarray(flipped), np.asarray(clean), count, len(means)


# the simulation -----------------------------------------------------------------------------------
def resolve_run(store: Store, ref: str | None) -> Run:
    """`ref`, or the latest finished disjoint run."""
    if ref is not None:
        run = store.get_run(ref)
    else:
        found = store.latest_run(method="disjoint", status="finished")
        if found is None:
            raise DeflectError(f"no finished disjoint run in {store.path}; train one with 'deflect train' "
                               f"or pass --run")
        run = found
    refuse_pool(run, "simulate run {base} (a staged release draws on its pool)")
    if not run.epochs_done:
        raise DeflectError(f"run {run.id} has no saved epoch yet ({run.status})")
    return run


def deployed_set(store: Store, run: Run, scenario: Scenario) -> Run:
    """The run whose models are deployed: `run`, or its pool run when a staged release may need fresh
    models beyond the set's own (a threshold is set, the scenario allows the pool, and one exists).

    A pool run holds the set's models first, so every index means the same model; the simulation
    and its expected-figure evaluations are stored under the pool run, whose size they match.
    """
    if scenario.release.threshold is None or not scenario.release.pool:
        return run
    return current_pool(store, run.id) or run


@torch.no_grad()
def _answers(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def _craft(attack: Attack, surrogate: nn.Module | list[nn.Module], x: torch.Tensor, y: torch.Tensor,
           batch_size: int) -> torch.Tensor:
    return torch.cat([attack(surrogate, x[i:i + batch_size], y[i:i + batch_size])
                      for i in range(0, len(x), batch_size)])


@fast_cpu_math()
def simulate(
    store: Store,
    scenario: Scenario,
    *,
    key_path: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 256,
    callbacks: SimCallbacks | None = None,
    save: bool = True,
) -> SimulationResult:
    """Play `scenario` against its run and return (and store, as a Simulation row) the outcome."""
    start = time.perf_counter()
    cb = callbacks or SimCallbacks()
    if scenario.adversary is None:
        raise DeflectError("no adversary: choose static, skilled or oracle")
    run = resolve_run(store, scenario.run)
    key = load_or_create_key(key_path or default_key_path(store.path))
    where = f"scenario {scenario.name}: " if scenario.name else ""
    initial = scenario.release.initial
    if initial is not None and initial > run.n:
        raise DeflectError(f"{where}release.initial={initial} but run {run.id} has only {run.n} models")
    base, run = run, deployed_set(store, run, scenario)
    n = run.n
    deployment = Deployment(key, n, scenario.release, pool=n - base.n)
    k = scenario.owned
    if k > len(deployment.released):
        raise DeflectError(f"{where}--k {k} is more than the {len(deployment.released)} released models "
                           f"of run {run.id}")

    dev = resolve_device(device)
    models = [m.to(dev).eval() for m in load_set(run.id, store)]
    rng = np.random.default_rng(scenario.seed)
    owned = sorted(int(i) for i in rng.choice(deployment.released, size=k, replace=False)) if k else []
    static = None
    if scenario.adversary == "static":
        if cb.on_phase:
            cb.on_phase("static adversary: its own model (an independent run, trained once and cached)")
        static = static_adversary(store, base, device, cb.training)
        surrogate: nn.Module | list[nn.Module] = static[0].to(dev).eval()
    else:
        surrogate = models[owned[0]] if k == 1 else [models[i] for i in owned]
    attack = make_attack(scenario.attack_name, run.dataset)
    test = load_dataset(run.dataset, "test", run.config.get("data_dir"), False)
    pool = select_subset(test, scenario.limit, 0)  # seed 0: the subset `deflect evaluate --limit` uses

    if cb.on_phase:
        cb.on_phase(f"expected figure: {attack.name} success of the attacker's source on each model")
    s_row, c_row, source = _source_success(store, run, models, pool, attack, scenario.adversary, owned, static,
                                           dev, batch_size, cb.on_progress)
    result = SimulationResult(
        run_id=run.id, adversary=scenario.adversary, k=k, attack=attack.name,
        attack_params=_jsonable(attack.params()), scenario=_jsonable(scenario.to_dict()), owned=owned,
        static_run=static[1] if static else None, n_models=n, pool=len(pool), source_success=list(s_row),
        source_clean=list(c_row), expected_source=source,
        pool_of=base.id if run is not base else None, pool_models=list(range(base.n, n)),
    )
    if cb.on_phase:
        counts = ((scenario.rounds, "round", " of"), (scenario.per_round, "attack", " on"),
                  (scenario.clients, "client", ""))
        cb.on_phase(" ".join(f"{count} {word}{'s' if count != 1 else ''}{tail}" for count, word, tail in counts))
    ids = client_ids(scenario.clients)
    result.client_slots = [deployment.slot(c) for c in ids[:GRID_CLIENTS]]
    for r in range(1, scenario.rounds + 1):
        result.rounds.append(_play_round(r, scenario, deployment, ids, rng, pool, models, surrogate, attack,
                                         s_row, c_row, dev, batch_size))
        if cb.on_round:
            cb.on_round(result.rounds[-1], result)
    result.seconds = time.perf_counter() - start
    if save:
        lo, hi = result.ci
        row = store.add_simulation(Simulation(
            run_id=run.id, adversary=result.adversary, k=k, attack=attack.name, scenario=scenario.name,
            params={**result.scenario, "owned": owned, "static_run": result.static_run,
                    "attack_params": result.attack_params, "expected_source": source, "pool": len(pool),
                    "client_slots": result.client_slots, "pool_of": result.pool_of,
                    "pool_models": result.pool_models},
            rounds=[rd.to_dict() for rd in result.rounds], sent=result.sent, counted=result.counted,
            succeeded=result.succeeded, deflected=result.deflected, deflection_rate=result.rate,
            ci_low=_finite(lo), ci_high=_finite(hi), expected_rate=result.expected_rate, hits=result.hits,
            seconds=result.seconds,
        ))
        result.simulation_id = row.id
    return result


def _play_round(
    r: int, scenario: Scenario, deployment: Deployment, ids: list[str], rng: np.random.Generator,
    pool: ImageTensorDataset, models: Sequence[nn.Module], surrogate: nn.Module | list[nn.Module],
    attack: Attack, s_row: Sequence[float], c_row: Sequence[float], dev: torch.device, batch_size: int,
) -> RoundResult:
    """Craft `per_round` examples, send each to a random client, score, then let the defender rotate."""
    n, m = len(models), scenario.per_round
    released = list(deployment.released)
    shares = deployment.shares(ids)
    img = rng.choice(len(pool), size=m, replace=m > len(pool))
    victims_of = rng.integers(0, len(ids), size=m)
    victims = np.array([deployment.model_for(ids[c]) for c in victims_of])
    x, y = pool.batch(torch.as_tensor(img))
    x, y = x.to(dev), y.to(dev)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(scenario.seed * 1_000_003 + r)
        x_adv = _craft(attack, surrogate, x, y, batch_size)
    sent_to, hits, void = [0] * n, [0] * n, 0
    deflected = 0
    outcome = np.zeros(m, dtype=np.int64)
    for v in np.unique(victims).tolist():
        mask = torch.as_tensor(victims == v, device=dev)
        clean_ok = _answers(models[v], x[mask], batch_size) == y[mask]
        adv_ok = _answers(models[v], x_adv[mask], batch_size) == y[mask]
        sent_to[v] = int(mask.sum())
        hits[v] = int((clean_ok & ~adv_ok).sum())
        void += int((~clean_ok).sum())
        deflected += int((clean_ok & adv_ok).sum())
        codes = torch.where(clean_ok, torch.where(adv_ok, DEFLECTED, SUCCEEDED), VOID)
        outcome[victims == v] = codes.cpu().numpy()
    exp_counted = m * sum(shares[v] * c_row[v] / 100 for v in range(n))
    exp_succ = m * sum(shares[v] * c_row[v] / 100 * s_row[v] / 100 for v in range(n))
    for v in range(n):
        if hits[v]:
            deployment.record_hits(v, hits[v])
    events: list[Rotation] = deployment.rotate()
    return RoundResult(
        round=r, sent=m, void=void, succeeded=sum(hits), deflected=deflected, released=released,
        sent_to=sent_to, hits=hits, expected_counted=exp_counted, expected_succeeded=exp_succ,
        rotations=[dataclasses.asdict(e) for e in events],
        attacks=[[int(c), int(v), int(o)] for c, v, o in zip(victims_of, victims, outcome, strict=True)],
    )
