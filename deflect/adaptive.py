"""Honest robustness: adaptive attackers against a randomly deployed set (`deflect evaluate RUN --adaptive`).

The paper's adversaries craft plain attacks on the models they own. An adaptive attacker does better:

* *transfer*: DI-TI-MI-FGSM (many steps, restarts, CE or CW loss) on one owned model and on the
  ensemble of all k owned models, at the preset ε and at twice it (beside the paper's MI-FGSM-2);
* *surrogate*: owns nothing, queries one deployed client for labels on natural images (train split,
  never test) within a query budget, trains its own model on them and transfers from it;
* *method-aware*: owns nothing, trains its own set with deflect's method (another seed) and attacks
  its ensemble;
* *query*: Square (L∞) against one fixed client's model: what random deployment cannot stop when the
  attacker can query its victim, and how many queries it costs.

For each attack, on the same seeded test images: accuracy (%) of every model on the adversarial
examples; *not owned* = mean over the models the attacker does not own; *random deployment* = mean
over all n models (uniform client shares; owned models answer examples crafted on them); *target* =
the queried client's model (surrogate, query). Every result is stored as an `Evaluation` of kind
"adaptive", its cost (queries, gradient evaluations, seconds) in `extra["cost"]`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from deflect.attacks import Attack, Square, budget_for, make_attack
from deflect.attacks.registry import CIFAR10_LINF_EPS
from deflect.config import TrainConfig
from deflect.data import ImageTensorDataset, load_dataset
from deflect.errors import DeflectError
from deflect.evaluate import craft_and_score, select_subset, success_percent
from deflect.inference import inference_copy
from deflect.runtime import fast_cpu_math
from deflect.sets import load_set
from deflect.store import Evaluation, Run, Store
from deflect.surrogate import LabelOracle, QueryBudget, method_aware_set, steal_labels, train_surrogate
from deflect.train import Callbacks, resolve_device

FAMILIES = ("transfer", "surrogate", "method-aware", "query")
#: Crafted on one owned model; the DI-TI ones also on the ensemble of all k owned models.
TRANSFER_ATTACKS = ("mifgsm2", "di-ti-mifgsm", "di-ti-mifgsm-cw", "di-ti-mifgsm-2eps", "di-ti-mifgsm-cw-2eps")
#: Crafted on the surrogate and on the method-aware attacker's set.
OWN_MODEL_ATTACKS = ("di-ti-mifgsm-cw", "di-ti-mifgsm-cw-2eps")
KIND = "adaptive"
Progress = Callable[[str, int, int], None]  # (what, done, total)


@dataclass(frozen=True)
class AdaptiveSettings:
    """What the adaptive evaluation runs; `None` means the attack's or the run's default."""

    k: int | None = None  # models the attacker owns (default min(2, n - 1))
    limit: int | None = None  # seeded subset of test images scored
    eps: float | None = None  # base ε (default: the dataset's preset); the 2ε attacks use twice it
    steps: int | None = None  # DI-TI-MI-FGSM steps (default 50)
    restarts: int | None = None  # DI-TI-MI-FGSM restarts (default 3)
    queries: int = 1000  # surrogate attacker's label-query budget
    max_queries: int = 5000  # Square: queries per image at most
    square_limit: int = 100  # Square: images attacked (a seeded subset of the scored ones)
    surrogate_epochs: int = 30
    aware_epochs: int | None = None  # method-aware set's epochs (default: the run's recipe)
    families: tuple[str, ...] = FAMILIES
    seed: int = 0
    batch_size: int = 256
    split: str = "test"  # images attacked: test, or val to choose settings (the surrogate's pool is train)

    def validate(self, n: int) -> None:
        """Every value, `k` against the set size n (`check` the rest before the run is even opened)."""
        self.check()
        if self.k is not None and not 1 <= self.k < n:
            raise DeflectError(f"--k must be between 1 and {n - 1} (the attacker lacks at least one of the "
                               f"{n} models), got {self.k}")

    def check(self) -> None:
        """The values that do not depend on the set."""
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown or not self.families:
            raise DeflectError(f"unknown adaptive attacker {', '.join(unknown) or '(none)'}; "
                               f"choose from: {', '.join(FAMILIES)}")
        for name in ("queries", "max_queries", "square_limit", "surrogate_epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise DeflectError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("limit", "steps", "restarts", "aware_epochs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise DeflectError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.split not in ("test", "val"):
            raise DeflectError(f"unknown split {self.split!r}; evaluate on 'test' or 'val' (for choosing settings)")
        if self.eps is not None and not (math.isfinite(self.eps) and self.eps > 0):
            raise DeflectError(f"--eps must be a finite positive number, got {self.eps}")

    def owned_count(self, n: int) -> int:
        return self.k if self.k is not None else max(1, min(2, n - 1))


@dataclass
class AdaptiveRow:
    """One attack by one attacker: accuracy of every model on its adversarial examples, and its cost."""

    attack: str
    family: str
    source: str  # what it was crafted on, in words
    eps: float
    owned: list[int]
    accuracy: list[float]  # % per model on the adversarial examples
    success: list[float]  # % per model: flipped among the images the model gets right when clean
    clean: list[float]
    n_examples: int
    cost: dict[str, Any]
    seconds: float
    params: dict[str, Any]
    target: int | None = None  # the client model the attacker queried
    evaluation_id: int | None = None

    @property
    def k(self) -> int:
        return len(self.owned)

    @property
    def unowned(self) -> float | None:
        """Mean accuracy (%) of the models the attacker does not own."""
        vals = [a for i, a in enumerate(self.accuracy) if i not in self.owned]
        return float(np.mean(vals)) if vals else None

    @property
    def deployed(self) -> float:
        """Accuracy (%) under random deployment: a uniformly random client's model answers."""
        return float(np.mean(self.accuracy))

    @property
    def owned_acc(self) -> float | None:
        vals = [self.accuracy[i] for i in self.owned]
        return float(np.mean(vals)) if vals else None

    @property
    def target_acc(self) -> float | None:
        return None if self.target is None else self.accuracy[self.target]

    @property
    def unowned_success(self) -> float | None:
        vals = [s for i, s in enumerate(self.success) if i not in self.owned]
        return float(np.mean(vals)) if vals else None

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "k": self.k, "unowned_acc": self.unowned, "deployed_acc": self.deployed,
                "owned_acc": self.owned_acc, "target_acc": self.target_acc, "unowned_success": self.unowned_success}


@dataclass
class AdaptiveReport:
    run_id: str
    method: str
    dataset: str
    n: int
    settings: dict[str, Any]
    rows: list[AdaptiveRow] = field(default_factory=list)

    def table(self) -> list[dict[str, Any]]:
        """One flat dict per attack, the columns of the printed table."""
        return [adaptive_table_row(r) for r in self.rows]

    def to_dict(self) -> dict[str, Any]:
        return {"run": self.run_id, "method": self.method, "dataset": self.dataset, "n": self.n,
                "settings": self.settings, "rows": [r.to_dict() for r in self.rows], "table": self.table()}


def cost_text(row: AdaptiveRow) -> str:
    """The attack's cost in a few words: queries where it queried, else gradient evaluations and time."""
    c = row.cost
    if row.family == "query":
        med = c.get("median_queries")
        med_s = "-" if med is None else f"{med:.0f}"
        return f"success {c['success_rate']:.1f}%, median {med_s} queries (max {c['max_queries']})"
    if row.family == "surrogate":
        return f"{c['queries']} label queries, {c['agreement']:.0f}% agreement, {row.seconds:.0f} s"
    if row.family == "method-aware":
        return f"own set: {c['train_seconds']:.0f} s training, {c['craft_seconds']:.0f} s crafting"
    return f"{c['gradient_evals']:.3g} gradients, {row.seconds:.1f} s"


def adaptive_table_row(row: AdaptiveRow) -> dict[str, Any]:
    return {"attack": row.attack, "attacker": row.family, "source": row.source, "eps": row.eps, "k": row.k,
            "unowned_acc": row.unowned, "deployed_acc": row.deployed, "target": row.target,
            "target_acc": row.target_acc, "cost": cost_text(row), "evaluation_id": row.evaluation_id}


def rich_table(report: AdaptiveReport) -> Any:
    """The report as a Rich table (accuracy %, coloured like the transfer matrices)."""
    from rich.table import Table

    from deflect.console import accuracy_style

    def cell(v: float | None) -> str:
        return "-" if v is None else f"[{accuracy_style(v)}]{v:.1f}[/]"

    table = Table(title=f"{report.run_id} ({report.method}, n={report.n}): adaptive attacks, accuracy %",
                  header_style="bold", caption="not owned: models the attacker lacks · deployed: a random "
                  "client's model · target: the client it queried")
    for col in ("attack", "attacker / source", "ε", "not owned", "deployed", "target", "cost"):
        table.add_column(col, justify="left" if col in ("attack", "attacker / source", "cost") else "right")
    for r in report.rows:
        table.add_row(r.attack, f"{r.family}: {r.source}", f"{r.eps:.3g}", cell(r.unowned), cell(r.deployed),
                      "-" if r.target is None else f"m{r.target} {cell(r.target_acc)}", cost_text(r))
    return table


# building attacks and scoring them --------------------------------------------------------------------
def build_attack(name: str, dataset: str, settings: AdaptiveSettings) -> Attack:
    """Registry attack `name` for `dataset`, with the settings' base ε, steps and restarts."""
    attack = make_attack(name, dataset)
    over: dict[str, Any] = {}
    if settings.eps is not None:
        scale = settings.eps / (CIFAR10_LINF_EPS * budget_for(dataset).linf_scale)
        over["eps"] = attack.eps * scale  # type: ignore[attr-defined]
        if hasattr(attack, "alpha"):
            over["alpha"] = attack.alpha * scale  # type: ignore[attr-defined]
    if name.startswith("di-ti"):
        over.update({k: v for k, v in (("steps", settings.steps), ("restarts", settings.restarts)) if v is not None})
    if isinstance(attack, Square):
        over["max_queries"] = settings.max_queries
        over["seed"] = settings.seed
    return make_attack(name, dataset, **over) if over else attack


def _label(idx: Sequence[int]) -> str:
    return "+".join(f"m{i}" for i in idx)


def _score(source: Sequence[nn.Module], models: Sequence[nn.Module], data: ImageTensorDataset, attack: Attack,
           settings: AdaptiveSettings, dev: torch.device, progress: Callable[[int, int], None] | None,
           ) -> tuple[list[float], list[float], list[float], int]:
    source = [inference_copy(m, dev) for m in source]  # no-op for the run's own (already copied) models
    adv, flipped, clean, count = craft_and_score([list(source)], models, data, attack, settings.batch_size,
                                                 settings.seed, dev, progress)
    return ((100.0 * adv[0] / count).tolist(), success_percent(flipped[0], clean),
            (100.0 * clean / count).tolist(), count)


def _gradient_evals(attack: Attack, images: int, models: int) -> float:
    p = attack.params()
    return float(images * models * int(p.get("steps", 1)) * int(p.get("restarts", 1)))


class _Runner:
    """Shared state of one adaptive evaluation: the run, its models, the scored images, the draws."""

    def __init__(self, store: Store, run: Run, settings: AdaptiveSettings, dev: torch.device,
                 progress: Progress | None) -> None:
        self.store, self.run, self.settings, self.dev, self.progress = store, run, settings, dev, progress
        self.models = [inference_copy(m, dev) for m in load_set(run.id, store)]  # built once, reused by every attack
        n = len(self.models)
        images = load_dataset(run.dataset, settings.split, run.config.get("data_dir"), False)
        self.data = select_subset(images, settings.limit, settings.seed)
        rng = np.random.default_rng(settings.seed)
        self.owned = sorted(int(i) for i in rng.choice(n, size=settings.owned_count(n), replace=False))
        self.target = int(rng.integers(n))  # the one client the querying attackers talk to

    def cb(self, what: str) -> Callable[[int, int], None] | None:
        return (lambda done, total: self.progress(what, done, total)) if self.progress else None

    def transfer(self, name: str, owned: list[int]) -> AdaptiveRow:
        attack = build_attack(name, self.run.dataset, self.settings)
        start = time.perf_counter()
        source = [self.models[i] for i in owned]
        acc, succ, clean, count = _score(source, self.models, self.data, attack, self.settings, self.dev,
                                         self.cb(f"{name} on {_label(owned)}"))
        seconds = time.perf_counter() - start
        return AdaptiveRow(attack=name, family="transfer", source=_label(owned), eps=attack.eps,  # type: ignore[attr-defined]
                           owned=owned, accuracy=acc, success=succ, clean=clean, n_examples=count,
                           cost={"gradient_evals": _gradient_evals(attack, count, len(owned)), "seconds": seconds},
                           seconds=seconds, params=attack.params())

    def surrogate(self) -> list[AdaptiveRow]:
        s = self.settings
        start = time.perf_counter()
        budget = QueryBudget(s.queries)
        pool = load_dataset(self.run.dataset, "train", self.run.config.get("data_dir"), False)
        x, labels = steal_labels(LabelOracle(self.models[self.target], budget, s.batch_size), pool, s.seed, self.dev)
        model = train_surrogate(x, labels, TrainConfig.from_dict(self.run.config), epochs=s.surrogate_epochs,
                                seed=s.seed, progress=self.cb(f"surrogate of m{self.target}"))
        train_seconds = time.perf_counter() - start
        agreement = _agreement(model, self.models[self.target], self.data, s.batch_size, self.dev)
        rows = []
        for name in OWN_MODEL_ATTACKS:
            attack = build_attack(name, self.run.dataset, s)
            t0 = time.perf_counter()
            acc, succ, clean, count = _score([model], self.models, self.data, attack, s, self.dev,
                                             self.cb(f"{name} on the surrogate"))
            craft = time.perf_counter() - t0
            rows.append(AdaptiveRow(
                attack=name, family="surrogate", source=f"surrogate of m{self.target} ({budget.used} queries)",
                eps=attack.eps, owned=[], accuracy=acc, success=succ, clean=clean, n_examples=count,  # type: ignore[attr-defined]
                cost={"queries": budget.used, "budget": budget.budget, "agreement": agreement,
                      "train_seconds": train_seconds, "craft_seconds": craft,
                      "gradient_evals": _gradient_evals(attack, count, 1)},
                seconds=train_seconds + craft, params={**attack.params(), "surrogate_epochs": s.surrogate_epochs},
                target=self.target))
        return rows

    def method_aware(self) -> list[AdaptiveRow]:
        s = self.settings
        callbacks = None
        if self.progress:
            progress = self.progress

            def on_batch(ev: Any) -> None:
                progress("method-aware set training", (ev.epoch - 1) * ev.batches + ev.batch, ev.epochs * ev.batches)

            callbacks = Callbacks(on_batch=on_batch)
        own, helper, trained_now = method_aware_set(self.store, self.run, s.aware_epochs, str(self.dev), callbacks)
        own = [m.to(self.dev).eval() for m in own]
        rows = []
        for name in OWN_MODEL_ATTACKS:
            attack = build_attack(name, self.run.dataset, s)
            t0 = time.perf_counter()
            acc, succ, clean, count = _score(own, self.models, self.data, attack, s, self.dev,
                                             self.cb(f"{name} on the own {helper.method} set"))
            craft = time.perf_counter() - t0
            rows.append(AdaptiveRow(
                attack=name, family="method-aware", source=f"own {helper.method} set of {len(own)} ({helper.id})",
                eps=attack.eps, owned=[], accuracy=acc, success=succ, clean=clean, n_examples=count,  # type: ignore[attr-defined]
                cost={"train_seconds": helper.seconds, "trained_now": trained_now, "craft_seconds": craft,
                      "gradient_evals": _gradient_evals(attack, count, len(own)), "helper_run": helper.id},
                seconds=helper.seconds + craft, params={**attack.params(), "helper_run": helper.id}))
        return rows

    def query(self) -> AdaptiveRow:
        s = self.settings
        attack = build_attack("square", self.run.dataset, s)
        assert isinstance(attack, Square)
        data = select_subset(self.data, s.square_limit, s.seed)
        victim = self.models[self.target]
        start = time.perf_counter()
        adv_ok = np.zeros(len(self.models))
        clean_ok = np.zeros(len(self.models))
        flipped = np.zeros(len(self.models))
        queries, hits, victim_clean = [], [], []
        batches = range(0, len(data), s.batch_size)
        for b, lo in enumerate(batches):
            x, y = data.batch(torch.arange(lo, min(lo + s.batch_size, len(data))))
            x, y = x.to(self.dev), y.to(self.dev)
            res = attack.run(victim, x, y)
            with torch.no_grad():
                c = torch.stack([m(x).argmax(1) == y for m in self.models])
                a = torch.stack([m(res.x_adv).argmax(1) == y for m in self.models])
            clean_ok += c.sum(1).cpu().numpy()
            adv_ok += a.sum(1).cpu().numpy()
            flipped += (c & ~a).sum(1).cpu().numpy()
            queries.append(res.queries.cpu())
            hits.append(res.success.cpu())
            victim_clean.append(c[self.target].cpu())
            if self.progress:
                self.progress(f"square on m{self.target}", b + 1, len(batches))
        seconds = time.perf_counter() - start
        q, won, ok = torch.cat(queries), torch.cat(hits), torch.cat(victim_clean)
        counted = won & ok  # broke an image the victim got right
        count = len(data)
        med = float(q[counted].float().median()) if counted.any() else None
        cost = {"success_rate": 100.0 * float(counted.sum()) / max(int(ok.sum()), 1), "median_queries": med,
                "mean_queries": float(q[counted].float().mean()) if counted.any() else None,
                "total_queries": int(q.sum()), "max_queries": int(attack.max_queries), "images": count,
                "seconds": seconds}
        return AdaptiveRow(
            attack="square", family="query", source=f"queries to the client holding m{self.target}", eps=attack.eps,
            owned=[], accuracy=(100.0 * adv_ok / count).tolist(),
            success=success_percent(flipped, clean_ok), clean=(100.0 * clean_ok / count).tolist(),
            n_examples=count, cost=cost, seconds=seconds, params=attack.params(), target=self.target)


@torch.no_grad()
def _agreement(a: nn.Module, b: nn.Module, data: ImageTensorDataset, batch_size: int, dev: torch.device) -> float:
    """% of test images on which the surrogate answers like the client it imitates (measured, not queried)."""
    same = 0
    for lo in range(0, len(data), batch_size):
        x, _ = data.batch(torch.arange(lo, min(lo + batch_size, len(data))))
        x = x.to(dev)
        same += int((a(x).argmax(1) == b(x).argmax(1)).sum())
    return 100.0 * same / max(len(data), 1)


def store_row(store: Store, run: Run, row: AdaptiveRow, settings: AdaptiveSettings) -> Evaluation:
    """Store one adaptive attack as an `Evaluation` (kind "adaptive"): a 1×n accuracy matrix."""
    budget = {"surrogate": settings.queries, "query": settings.max_queries}.get(row.family)
    ev = store.add_evaluation(Evaluation(
        run_id=run.id, kind=KIND, attack=row.attack,
        params={**row.params, "family": row.family, "k": row.k, "owned": row.owned, "target": row.target,
                "budget": budget, "limit": settings.limit, "seed": settings.seed, "split": settings.split},
        matrix=[row.accuracy], success=[row.success], clean_acc=row.clean, blackbox_mean=row.unowned,
        whole_set_mean=row.deployed, whitebox_mean=row.owned_acc, success_rate=row.unowned_success,
        n_examples=row.n_examples, seconds=row.seconds,
        extra={"family": row.family, "row_labels": [row.source], "unowned_acc": row.unowned,
               "deployed_acc": row.deployed, "target_acc": row.target_acc, "cost": row.cost},
    ))
    row.evaluation_id = ev.id
    return ev


def plan(settings: AdaptiveSettings, owned: list[int]) -> list[tuple[str, list[int]]]:
    """(attack, owned models) of the transfer family: each attack on one owned model, the DI-TI ones
    also on the ensemble of all owned models when there are several."""
    out = []
    for name in TRANSFER_ATTACKS:
        out.append((name, owned[:1]))
        if len(owned) > 1 and name.startswith("di-ti"):
            out.append((name, owned))
    return out


@fast_cpu_math()
def evaluate_adaptive(store: Store, run_ref: str, settings: AdaptiveSettings | None = None, *,
                      device: str = "auto", progress: Progress | None = None) -> AdaptiveReport:
    """Run every adaptive attacker of `settings.families` against run `run_ref`; store and return the rows."""
    settings = settings or AdaptiveSettings()
    run = store.get_run(run_ref)
    if not run.epochs_done:
        raise DeflectError(f"run {run.id} has no saved epoch yet ({run.status})")
    settings.validate(run.n)
    dev = resolve_device(device)
    runner = _Runner(store, run, settings, dev, progress)
    report = AdaptiveReport(run_id=run.id, method=run.method, dataset=run.dataset, n=run.n,
                            settings={**dataclasses.asdict(settings), "owned": runner.owned,
                                      "target": runner.target})
    steps: list[Callable[[], list[AdaptiveRow]]] = []
    if "transfer" in settings.families:
        steps += [lambda name=name, owned=owned: [runner.transfer(name, owned)]
                  for name, owned in plan(settings, runner.owned)]
    if "surrogate" in settings.families:
        steps.append(runner.surrogate)
    if "method-aware" in settings.families:
        steps.append(runner.method_aware)
    if "query" in settings.families:
        steps.append(lambda: [runner.query()])
    for step in steps:  # stored as they finish: an interrupted evaluation keeps what it measured
        for row in step():
            store_row(store, run, row, settings)
            report.rows.append(row)
    return report
