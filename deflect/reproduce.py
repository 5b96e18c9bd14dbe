"""`deflect reproduce`: train the paper's comparison sets, evaluate them, write a results report.

Every step is idempotent: a set is found again by its tag (stored in the run's config) and is
reused when finished or resumed when interrupted; an evaluation is skipped when one with the same
kind, attack and size is stored. So a reproduction that was stopped (Ctrl-C, a reboot) continues
where it was, and rerunning a finished one only rewrites the report.

The report lays the numbers out like the paper: clean accuracy, black-box (Tables 2/3) and
whole-set (Table 4) accuracy per attack, the m-of-n ensemble attack (Table 5), the ablations
(Table 6), the ε sweep (Figure 5) and the gradient t-SNE (Figures 3/4), with PNGs beside it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deflect.attacks import CIFAR10_LINF_EPS, budget_for
from deflect.config import TrainConfig, make_config, preset_dataset, same_recipe
from deflect.errors import DeflectError
from deflect.jobs import check_jobs
from deflect.pipeline import RunEvaluator
from deflect.report import curves_png, markdown_table, own_settings
from deflect.store import EVAL_SEED, Evaluation, Run, Store, settings_key
from deflect.train import Callbacks, train
from deflect.train.grow_run import GrowCallbacks, grow

TAG_KEY = "reproduce"
ENSEMBLE_ATTACK = "pgd2"  # the ensemble attack of Table 5 and Figure 6
BB_GAP, CLEAN_GAP, N8_BLACKBOX, ENSEMBLE_BAR = 1.5, 1.0, 87.0, 85.0  # deflect's bar (the report's Targets)
BREAK_DROP = 10.0  # points below its clean accuracy at which the report says a set stops holding
ATTACKS = ("fgsm", "pgd2", "mifgsm1", "cw2", "ead1")  # FGSM, PGD-20, MI-FGSM, CW κ=40, EAD at the preset ε
Say = Callable[[str], None]
Curves = dict[str, tuple[list[float], list[float]]]  # label -> (x, accuracy %)


@dataclass(frozen=True)
class SetSpec:
    """One set of the reproduction: its label in the report and how to train it."""

    label: str
    n: int
    method: str = "disjoint"
    overrides: dict[str, Any] = field(default_factory=dict)
    ablation: bool = False
    grow_from: str | None = None  # label of an earlier set this one grows by n - its n models (`deflect grow`)

    @property
    def expansion(self) -> bool:
        """A way of making a larger set (Table 7): grown from a frozen set, or joint over all pairs."""
        return self.grow_from is not None or "sample_models" in self.overrides


@dataclass(frozen=True)
class Plan:
    preset: str
    dataset: str
    quick: bool
    sets: tuple[SetSpec, ...]
    attacks: tuple[str, ...]
    limit: int  # test images per evaluation
    train_limit: int | None
    epochs: int | None
    sweep_steps: int
    tsne_images: int
    # (training images, epochs) of the ablation sets when they differ from the other sets' scale
    ablation_scale: tuple[int | None, int | None] | None = None
    width: int | None = None  # the small CNN's width for every set; None keeps the preset's

    @property
    def name(self) -> str:
        return f"{self.dataset}{'-quick' if self.quick else ''}{f'-w{self.width}' if self.width else ''}"

    @property
    def command(self) -> str:
        """The CLI line that makes this plan's report."""
        return (f"deflect reproduce --preset {self.preset}{' --quick' if self.quick else ''}"
                f"{f' --width {self.width}' if self.width else ''}")

    def scale(self, spec: SetSpec) -> tuple[int | None, int | None]:
        """(training images, epochs) `spec` is trained with; None keeps the preset's value."""
        if spec.ablation and self.ablation_scale is not None:
            return self.ablation_scale
        return self.train_limit, self.epochs

    @property
    def ablation_attack(self) -> str:
        """The one attack the ablation sets are evaluated with: PGD-20 (Table 6), else the plan's first."""
        return ENSEMBLE_ATTACK if ENSEMBLE_ATTACK in self.attacks else self.attacks[0]


# Ablations of the full Fashion-MNIST plan run at the quick check's scale, beside a set with every term
# trained the same way: at full scale the eight ablation sets alone cost ~9 h of a 2-core CPU (each
# n = 3 disjoint set ~1 h, all pairs at n = 5 ~2.5 h), ten times what the comparison between them needs.
ABLATION_SCALE = {"fashion-mnist": (20000, 3)}
ABLATION_BASE = "disjoint n=3, all terms"  # the ablations' reference set, where their scale is their own


def make_plan(preset: str, quick: bool = False, width: int | None = None) -> Plan:
    """The sets and evaluations of a reproduction; `quick` is the issue's quick check (n=3, 20k images, 3 epochs).

    `width` trains every set's small CNN at another width (capacity is the main lever on the gap between
    black-box and clean accuracy, results/fashion-mnist-preset.md); its report and figures are named
    after it, so they sit beside the preset's own."""
    dataset = preset_dataset(preset)
    if width is not None:  # an impossible width, or one the preset's architecture has not, is refused before training
        arch = make_config(3, dataset, preset, width=width).arch
        if arch != "cnn":
            raise DeflectError(f"--width sets the small CNN's width; the {preset} preset trains {arch}")
    scale = None if quick else ABLATION_SCALE.get(preset)
    sets = [SetSpec("independent n=3", 3, "independent"), SetSpec("disjoint n=3", 3)]
    if not quick:
        sets += [SetSpec("disjoint n=5", 5), SetSpec("disjoint n=8", 8)]
    sets += [SetSpec("fast-at n=3", 3, "fast-at"), SetSpec("adp n=3", 3, "adp")]
    base = "disjoint n=3"
    if scale is not None:  # the ablations' own reference: every term, at their scale
        base = ABLATION_BASE
        sets.append(SetSpec(base, 3, ablation=True))
    sets += [SetSpec("disjoint n=3, no angle", 3, overrides={"w_angle": 0.0}, ablation=True),
             SetSpec("disjoint n=3, no transfer", 3, overrides={"w_transfer1": 0.0, "w_transfer2": 0.0},
                     ablation=True)]
    if not quick:
        sets += [SetSpec("disjoint n=3, transfer 1 only", 3, overrides={"w_transfer2": 0.0}, ablation=True),
                 SetSpec("disjoint n=3, transfer 2 only", 3, overrides={"w_transfer1": 0.0}, ablation=True)]
        if scale is not None:  # the main n = 5 set samples 3 models per step; Table 7 needs it at this scale
            sets.append(SetSpec("disjoint n=5, 3 sampled", 5, overrides={"sample_models": 3}, ablation=True))
        sets += [SetSpec("disjoint n=5, all pairs", 5, overrides={"sample_models": 5}, ablation=True),
                 SetSpec("disjoint n=3 grown to 5", 5, grow_from=base, ablation=True)]
    else:
        sets += [SetSpec("disjoint n=3 grown to 4", 4, grow_from=base, ablation=True)]
    return Plan(
        preset=preset, dataset=dataset, quick=quick, sets=tuple(sets),
        attacks=("pgd2", "mifgsm1") if quick else ATTACKS, limit=500 if quick else 1000,
        train_limit=20000 if quick and preset != "digits" else None, epochs=3 if quick else None,
        sweep_steps=20 if quick else 100, tsne_images=300 if quick else 1000, ablation_scale=scale, width=width,
    )


def _tag(plan: Plan, spec: SetSpec) -> str:
    return f"{plan.preset}{'/quick' if plan.quick else ''}/{spec.label}"


def find_run(store: Store, tag: str, matches: Callable[[Run], bool] = lambda run: True) -> Run | None:
    runs = [r for r in store.list_runs() if (r.config or {}).get(TAG_KEY) == tag and matches(r)]
    finished = [r for r in runs if r.status == "finished"]
    return (finished or runs or [None])[-1]


def _set_config(plan: Plan, spec: SetSpec, device: str = "auto", data_dir: str | None = None) -> TrainConfig:
    train_limit, epochs = plan.scale(spec)
    overrides = {"width": plan.width, **spec.overrides}  # a set's own width (a notebook plan's) wins
    return make_config(spec.n, plan.dataset, plan.preset, method=spec.method, epochs=epochs,
                       train_limit=train_limit, device=device, data_dir=data_dir, **overrides)


def _stored(store: Store, plan: Plan, spec: SetSpec, parent: Run | None, cfg: TrainConfig | None = None) -> Run | None:
    """The newest run of `spec` in `store` (finished first): grown from `parent`, or of the plan's recipe."""
    tag = _tag(plan, spec)
    if spec.grow_from is not None:
        if parent is None:
            return None
        return find_run(store, tag, lambda run: (run.config or {}).get("parent") == parent.id)
    wanted = cfg or _set_config(plan, spec)
    return find_run(store, tag, lambda run: same_recipe(run.config or {}, wanted))


def stored_runs(store: Store, plan: Plan) -> dict[str, Run]:
    """The plan's sets already finished in `store`, by label; trains nothing (a report of a run under way)."""
    runs: dict[str, Run] = {}
    for spec in plan.sets:
        found = _stored(store, plan, spec, runs.get(spec.grow_from) if spec.grow_from else None)
        if found is not None and found.status == "finished":
            runs[spec.label] = found
    return runs


def train_set(store: Store, plan: Plan, spec: SetSpec, device: str, data_dir: str | None,
              callbacks: Callbacks | None = None, say: Say | None = None, parent: Run | None = None) -> Run:
    """The set's finished run: reused, resumed, or trained now (grown from `parent` for a grown set)."""
    tag = _tag(plan, spec)
    user = callbacks or Callbacks()
    if spec.grow_from is not None:
        if parent is None:
            raise DeflectError(f"{spec.label}: the plan has no set {spec.grow_from!r} before it to grow")
        found = _stored(store, plan, spec, parent)
        if found is not None and found.status == "finished":
            return found
        return _grow_set(store, spec, tag, parent, device, user, say)
    cfg = _set_config(plan, spec, device, data_dir)
    found = _stored(store, plan, spec, None, cfg)
    if found is not None and found.status == "finished":
        return found

    def on_start(run: Run, first_epoch: int) -> None:
        if (run.config or {}).get(TAG_KEY) != tag:
            store.update_run(run.id, config={**run.config, TAG_KEY: tag})
        if user.on_start:
            user.on_start(run, first_epoch)

    cbs = Callbacks(on_start=on_start, on_batch=user.on_batch, on_epoch=user.on_epoch)
    if found is not None and found.epochs_done and found.status != "running":
        if say:
            say(f"{spec.label}: resuming {found.id} after epoch {found.epochs_done}")
        return store.get_run(train(None, store, cbs, resume=found.id))
    if say:
        say(f"{spec.label}: training ({cfg.epochs} epochs)")
    return store.get_run(train(cfg, store, cbs))


def _grow_set(store: Store, spec: SetSpec, tag: str, parent: Run, device: str, user: Callbacks,
              say: Say | None) -> Run:
    """Grow `parent` to `spec.n` models; a grow cannot resume, so an interrupted one starts again."""
    if spec.n <= parent.n:
        raise DeflectError(f"{spec.label}: a grown set needs more than its parent's {parent.n} models")
    current: list[Run] = []

    def on_start(run: Run, _parent: Run) -> None:
        current.append(run)
        if user.on_start:
            user.on_start(run, 1)

    def on_model(_done: Any) -> None:  # each new model is its own run of epochs: a new bar
        if user.on_start and current:
            user.on_start(current[-1], 1)

    if say:
        say(f"{spec.label}: growing {parent.id} by {spec.n - parent.n} model(s)")
    run_id = grow(store, parent.id, spec.n - parent.n, device=device,
                  callbacks=GrowCallbacks(on_start=on_start, on_batch=user.on_batch, on_model=on_model))
    run = store.get_run(run_id)
    store.update_run(run_id, config={**run.config, TAG_KEY: tag})
    return store.get_run(run_id)


def sweep_eps(plan: Plan) -> list[float]:
    """The ε values of the plan's sweep: a quarter of the preset's ε up to twice it."""
    eps = CIFAR10_LINF_EPS * budget_for(plan.dataset).linf_scale
    return [round(eps * f, 5) for f in (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)]


def _plan_settings(plan: Plan, kind: str, attack: str, m: int | None) -> str:
    """The settings key (`settings_key`) of the evaluation the plan itself would store."""
    if kind == "eps-sweep":
        params: dict[str, Any] = {"steps": plan.sweep_steps, "eps": sweep_eps(plan)}
    elif kind == "tsne":
        params = {"n_images": plan.tsne_images}
    else:
        return own_settings(attack, plan.dataset, m if kind == "ensemble" else None) or ""
    return json.dumps(params, sort_keys=True)


def _of_record(ev: Evaluation, plan: Plan) -> bool:
    """An evaluation the report may use: the plan's own settings (a user's `--eps`/`--steps` override or an
    earlier attack default is another measurement), on the test split, crafted in float32 with seed 0."""
    if ev.params.get("split", "test") != "test" or "precision" in ev.params or EVAL_SEED in ev.params:
        return False
    m = (ev.extra or {}).get("m") if ev.kind == "ensemble" else None
    return settings_key(ev) == _plan_settings(plan, ev.kind, ev.attack, m)


def _has(store: Store, plan: Plan, run: Run, kind: str, attack: str, n_examples: int,
         m: int | None = None) -> Evaluation | None:
    for ev in reversed(store.evaluations(run.id, kind)):
        if ev.attack == attack and _of_record(ev, plan) and (
                m is None or (ev.extra or {}).get("m") == m) and (kind in ("eps-sweep", "tsne") or ev.n_examples
                                                                   == n_examples):
            return ev
    return None


def evaluate_set(store: Store, plan: Plan, spec: SetSpec, run: Run, device: str, say: Say | None = None) -> None:
    """The plan's evaluations of one set, skipping those already stored."""
    ev = RunEvaluator(store, run.id, limit=plan.limit, device=device)
    count = min(plan.limit, len(ev.test))
    attacks = (plan.ablation_attack,) if spec.ablation else plan.attacks
    for attack in attacks:
        if not _has(store, plan, run, "transfer", attack, count):
            if say:
                say(f"{spec.label}: {attack} transfer matrix")
            ev.transfer(attack)
    if spec.ablation:
        return
    for m in range(2, run.n):
        if not _has(store, plan, run, "ensemble", ENSEMBLE_ATTACK, count, m):
            if say:
                say(f"{spec.label}: pgd2 on every {m}-model ensemble")
            ev.ensemble(ENSEMBLE_ATTACK, m, max_subsets=None if run.n <= 5 else 8)
    if not _has(store, plan, run, "eps-sweep", "pgd-sweep", count):
        eps = sweep_eps(plan)
        if say:
            say(f"{spec.label}: ε sweep to {eps[-1]:g}")
        ev.sweep(eps, plan.sweep_steps)
    if (spec.method in ("disjoint", "independent") and run.n == 3
            and not _has(store, plan, run, "tsne", "gradient-sign", 0)):
        if say:
            say(f"{spec.label}: gradient t-SNE")
        ev.tsne(plan.tsne_images)


def reproduce(store: Store, preset: str, *, quick: bool = False, out: Path = Path("results"), device: str = "auto",
              data_dir: str | None = None, callbacks: Callbacks | None = None, say: Say | None = None,
              plan: Plan | None = None, jobs: int = 1,
              callbacks_for: Callable[[str], Callbacks] | None = None, report_only: bool = False,
              width: int | None = None) -> Path:
    """Train and evaluate every set of the plan (resuming), then write `out/<dataset>.md` and its figures.

    `plan` replaces `make_plan(preset, quick)` (a notebook user's own selection of sets). `jobs` > 1
    works on that many sets at once in worker processes (`deflect.jobs`), sharing the CPU threads.
    `callbacks_for(label)` gives each set its own callbacks (a bar per set); else `callbacks` serve all.
    `report_only` trains and evaluates nothing: the report shows what is stored and lists the rest as pending.
    `width` trains the plan's small CNNs at that width (`make_plan`)."""
    check_jobs(jobs)
    plan = plan or make_plan(preset, quick, width)
    per_set = callbacks_for or (lambda label: callbacks or Callbacks())
    start = time.perf_counter()
    runs: dict[str, Run] = {}
    if report_only:
        runs = stored_runs(store, plan)
        if not runs:
            raise DeflectError(f"no set of the {plan.name} reproduction is finished in {store.path} yet; "
                               "run the command without --report-only to train them")
    elif jobs > 1:
        from deflect.jobs import run_sets

        runs = run_sets(store, plan, device, data_dir, jobs, per_set, say)
    else:
        for spec in plan.sets:
            parent = runs.get(spec.grow_from) if spec.grow_from else None
            runs[spec.label] = train_set(store, plan, spec, device, data_dir, per_set(spec.label), say, parent)
            evaluate_set(store, plan, spec, runs[spec.label], device, say)
    return write_report(store, plan, runs, out, time.perf_counter() - start, 0 if report_only else jobs)


# the report -----------------------------------------------------------------------------------------
def _table(header: list[str], rows: list[list[str]]) -> str:
    return markdown_table(header, rows).rstrip("\n")


def _pct(v: float | None, std: float | None = None) -> str:
    if v is None:
        return "-"
    return f"{v:.1f} ± {std:.1f}" if std is not None else f"{v:.1f}"


def _newest(store: Store, plan: Plan, run: Run, kind: str) -> dict[str, Evaluation]:
    """Per attack (per attack and m for ensembles), the newest evaluation at the plan's own settings."""
    out: dict[str, Evaluation] = {}
    for ev in store.evaluations(run.id, kind):
        if _of_record(ev, plan):
            key = ev.attack if kind != "ensemble" else f"{ev.attack}/m{(ev.extra or {}).get('m')}"
            out[key] = ev
    return out


def _threads(jobs: int) -> str:
    """How the sets shared the CPU; `jobs` 0 is a report written from stored sets (`--report-only`)."""
    if jobs == 0:
        return "threads and jobs as each sitting of the command set them"
    if jobs == 1:
        threads = torch.get_num_threads()
        return f"{threads} torch thread{'s' if threads > 1 else ''}"
    from deflect.jobs import worker_threads

    threads = worker_threads(jobs)
    return f"{jobs} sets at a time, {threads} torch thread{'s' if threads > 1 else ''} each"


def _images_line(evaluations: list[Evaluation], limit: int) -> str:
    """How many test images the evaluations used, as stored: `limit` is only an upper bound (the digits
    test split holds 360)."""
    counts = sorted({ev.n_examples for ev in evaluations if ev.kind in ("transfer", "ensemble")})
    if not counts or counts == [limit]:
        return f"Every evaluation is on a seeded subset of {limit} test images"
    if len(counts) == 1:
        return f"Every evaluation is on all {counts[0]} test images (fewer than the plan's {limit})"
    return f"Evaluations are on {'-'.join(map(str, (counts[0], counts[-1])))} test images (at most {limit} each)"


def report_text(store: Store, plan: Plan, runs: dict[str, Run], seconds: float,
                jobs: int = 1) -> tuple[str, dict[str, Any]]:
    """The Markdown report and the data behind its figures."""
    figures: dict[str, Path] = {}
    pending = [s.label for s in plan.sets if s.label not in runs]
    plan = dataclasses.replace(plan, sets=tuple(s for s in plan.sets if s.label in runs))
    main = [s for s in plan.sets if not s.ablation]
    ablations = [s for s in plan.sets if s.ablation]
    transfer = {label: _newest(store, plan, run, "transfer") for label, run in runs.items()}
    train_min = sum(run.seconds for run in runs.values()) / 60
    # the plan's own evaluations: a user's checks at other settings are neither shown nor counted
    evaluations = [ev for run in runs.values() for ev in store.evaluations(run.id) if _of_record(ev, plan)]
    eval_min = sum(ev.seconds for ev in evaluations) / 60
    invocation = ("this report: `--report-only`, from the stored sets" if jobs == 0
                  else f"this invocation: {seconds / 60:.1f} min")
    qualifiers = ", ".join(q for q in ("quick" if plan.quick else "", f"width {plan.width}" if plan.width else "") if q)
    lines = [
        f"# {plan.dataset}: a measured reproduction{f' ({qualifiers})' if qualifiers else ''}",
        "",
        f"Command: `{plan.command}{f' --jobs {jobs}' if jobs > 1 else ''}`. Machine: "
        f"{platform.machine()}, {os.cpu_count()} CPU cores, {_threads(jobs)}, "
        f"torch {torch.__version__}"
        f"{', ' + torch.cuda.get_device_name() if torch.cuda.is_available() else ', CPU only'}. "
        f"Compute behind the numbers: training {train_min:.1f} min, evaluation {eval_min:.1f} min "
        f"({invocation}; steps already stored are not redone). "
        f"{_images_line(evaluations, plan.limit)}; numbers are what was measured.",
        "",
        *([f"**Partial report** (`--report-only`, the reproduction still under way): {len(runs)} of "
           f"{len(runs) + len(pending)} sets finished; pending: {', '.join(pending)}. A finished set's "
           "evaluations still running show as '-'.", ""] if pending else []),
        *_targets(store, plan, runs, transfer),
        *_recipe(plan, runs),
        "## Sets and clean accuracy",
        "",
    ]
    rows = []
    for spec in plan.sets:
        run = runs[spec.label]
        clean = run.clean_acc or []
        rows.append([spec.label, run.id, str(run.epochs_done), " / ".join(f"{v:.1f}" for v in clean),
                     _pct(float(np.mean(clean)) if clean else None), f"{run.seconds / 60:.1f}"])
    lines += [_table(["set", "run", "epochs", "clean % per model", "mean", "train min"], rows), ""]

    for title, metric in (("Black-box accuracy (%, mean ± std over source → target pairs; Tables 2/3)", "bb"),
                          ("Whole-set accuracy (%, every model on every source's examples; Table 4)", "whole")):
        lines += [f"## {title}", ""]
        header = ["attack", *[s.label for s in main]]
        rows = []
        for attack in plan.attacks:
            cells = [attack]
            for spec in main:
                ev = transfer[spec.label].get(attack)
                cells.append("-" if ev is None else _pct(ev.blackbox_mean, ev.blackbox_std) if metric == "bb"
                             else _pct(ev.whole_set_mean))
            rows.append(cells)
        lines += [_table(header, rows), ""]
        if metric == "bb" and any(a.startswith(("cw", "ead")) for a in plan.attacks):
            lines += ["Every attacked image counts, as in the paper's released code. CW and EAD are unbounded "
                      "(L2 / elastic net): a sample they never fool with their κ margin is sent as their last "
                      "iterate, as the released code sends it.", ""]
        if metric == "bb":  # a '-' where the database holds the attack at other settings: say why
            stored = {spec.label: {ev.attack for ev in store.evaluations(runs[spec.label].id, "transfer")}
                      for spec in main}  # one query per set
            elsewhere = [f"{attack} ({spec.label})" for attack in plan.attacks for spec in main
                         if attack not in transfer[spec.label] and attack in stored[spec.label]]
            if elsewhere:
                lines += [f"Stored only at other settings than the plan's (an ε or steps override, another split, "
                          f"bf16, or CW/EAD from before they sent their last iterate), so shown as '-': "
                          f"{', '.join(elsewhere)}. `{plan.command}` without --report-only evaluates them.", ""]

    lines += ["## Ensemble attack: PGD-20 on m of the n models (Table 5)", "",
              "Accuracy (%) of the models outside the attacker's ensemble, mean over the subsets evaluated.", ""]
    rows = []
    sizes = range(2, max((runs[s.label].n for s in main), default=2))
    for spec in main:
        ens = _newest(store, plan, runs[spec.label], "ensemble")
        cells = [spec.label]
        for m in sizes:
            ev = ens.get(f"{ENSEMBLE_ATTACK}/m{m}")
            cells.append(_pct((ev.extra or {}).get("mean_unowned")) if ev else "-")
        rows.append(cells)
    lines += [_table(["set", *[f"m={m}" for m in sizes]], rows), ""]

    fig6, ensemble_curves = _figure6(store, plan, runs, transfer)
    lines += fig6
    first = plan.ablation_attack
    base_label = ABLATION_BASE if any(s.label == ABLATION_BASE for s in ablations) else "disjoint n=3"
    terms = [s for s in ablations if not s.expansion and s.n == 3 and s.label != base_label]
    if terms:
        lines += [f"## Ablations (Table 6): {first} black-box accuracy", "", *_scale_note(plan)]
        base = transfer.get(base_label, {}).get(first)
        rows = [[f"{base_label} (all terms)" if base_label == "disjoint n=3" else base_label,
                 _pct(base.blackbox_mean, base.blackbox_std) if base else "-",
                 _pct(_mean(runs[base_label].clean_acc)) if base_label in runs else "-"]]
        for spec in terms:
            ev = transfer[spec.label].get(first)
            rows.append([spec.label, _pct(ev.blackbox_mean, ev.blackbox_std) if ev else "-",
                         _pct(_mean(runs[spec.label].clean_acc))])
        lines += [_table(["set", f"{first} black-box %", "clean %"], rows), ""]
    lines += _table7(plan, runs, transfer)

    sweeps: Curves = {}
    lines += ["## ε sweep (Figure 5): PGD black-box accuracy (%)", ""]
    eps_header: list[float] = []
    rows = []
    for spec in main:
        sweep = _newest(store, plan, runs[spec.label], "eps-sweep").get("pgd-sweep")
        if sweep and sweep.matrix:
            eps = [r[0] for r in sweep.matrix]
            bb = [r[1] for r in sweep.matrix]
            sweeps[spec.label] = (eps, bb)
            eps_header = eps_header or eps
            rows.append([spec.label, *[_pct(v) for v in bb]])
    if rows:
        lines += [_table(["set", *[f"ε={e:g}" for e in eps_header]], rows), "",
                  f"![ε sweep]({plan.name}-eps-sweep.png)", ""]
    lines += _beyond_budget(plan, runs, sweeps, transfer)
    tsne = []
    for spec in main:
        ev = _newest(store, plan, runs[spec.label], "tsne").get("gradient-sign")
        if ev:
            png = Path((ev.extra or {}).get("png", ""))
            name = f"{plan.name}-tsne-{spec.method}-n{spec.n}.png"
            figures[name] = png
            extra = ev.extra or {}
            tsne.append([spec.label, _ratio(extra.get("neighbour_agreement")), _ratio(extra.get("chance")),
                         _ratio(extra.get("separation")), f"![t-SNE]({name})"])
    if tsne:
        lines += ["## Gradient t-SNE (Figures 3/4)", "",
                  "Neighbour agreement: the share of each point's 10 nearest neighbours in the embedding that "
                  "come from the same model (1: no cluster mixes models; chance: the models mix freely). "
                  "Silhouette by model stays near 0 even for separate clusters, because each model's "
                  "gradients form several clusters of their own.", "",
                  _table(["set", "neighbour agreement", "chance", "silhouette", "figure"], tsne), ""]
    return "\n".join(lines), {"sweeps": sweeps, "figures": figures, "ensemble": ensemble_curves}


def _ratio(value: float | None) -> str:
    """A 0-1 score with two decimals; '-' for a score an older evaluation did not store."""
    return "-" if value is None or value != value else f"{value:.2f}"


def _scale_note(plan: Plan) -> list[str]:
    """A line saying the table's sets were trained at the ablation scale, where it differs from the rest."""
    if plan.ablation_scale is None or plan.ablation_scale == (plan.train_limit, plan.epochs):
        return []
    images, epochs = plan.ablation_scale
    size = f"{images:,}".replace(",", " ") if images is not None else "all the"
    length = f"{epochs} epoch{'s' if epochs != 1 else ''}" if epochs is not None else "the preset's epochs"
    return [f"These sets are trained on {size} training images for {length} (the other tables' sets: the "
            "full preset), so they compare with each other, not with the tables above.", ""]


def _mean(values: list | None) -> float | None:
    return float(np.mean(values)) if values else None


def _clean_on_images(ev: Evaluation | None, run: Run) -> float | None:
    """Mean clean accuracy on the evaluation's own images, else the run's test accuracy."""
    return _mean(ev.clean_acc if ev is not None and ev.clean_acc else run.clean_acc)


def _figure6(store: Store, plan: Plan, runs: dict[str, Run],
             transfer: dict[str, dict[str, Evaluation]]) -> tuple[list[str], Curves]:
    """Figure 6: accuracy over all n models of PGD-20 crafted on m-model ensembles, m = 1 … n-1."""
    curves: Curves = {}
    for spec in plan.sets:
        if spec.ablation:
            continue
        points: dict[int, float] = {}
        single = transfer[spec.label].get(ENSEMBLE_ATTACK)
        if single is not None and single.whole_set_mean is not None:
            points[1] = single.whole_set_mean
        ens = _newest(store, plan, runs[spec.label], "ensemble")
        for m in range(2, runs[spec.label].n):
            ev = ens.get(f"{ENSEMBLE_ATTACK}/m{m}")
            if ev is not None and ev.whole_set_mean is not None:
                points[m] = ev.whole_set_mean
        if points:
            curves[spec.label] = ([float(m) for m in sorted(points)], [points[m] for m in sorted(points)])
    if not curves:
        return [], curves
    width = int(max(max(ms) for ms, _ in curves.values()))
    rows = [[label, *[_pct(dict(zip(ms, acc, strict=True)).get(float(m))) for m in range(1, width + 1)]]
            for label, (ms, acc) in curves.items()]
    return ["## Ensemble size (Figure 6): PGD-20 on m models, accuracy over all n models (%)", "",
            "m = 1 is the transfer matrix's whole-set accuracy (white-box cells included).", "",
            _table(["set", *[f"m={m}" for m in range(1, width + 1)]], rows), "",
            f"![ensemble size]({plan.name}-ensemble-size.png)", ""], curves


def _how_made(spec: SetSpec, run: Run) -> str:
    if spec.grow_from is not None:
        parent_n = (run.config or {}).get("grow", {}).get("parent_n")
        return f"{parent_n} frozen + {run.n - parent_n} grown one at a time" if parent_n else "grown"
    k = TrainConfig.from_dict(run.config).pair_sample_size()
    return "joint, all pairs every step" if k >= run.n else f"joint, {k} models sampled per step"


def _old_new_blackbox(run: Run, ev: Evaluation | None) -> float | None:
    """Mean accuracy of the cells between the parent's models and the grown ones (both directions)."""
    cfg = run.config or {}
    old, new = cfg.get("inherited"), cfg.get("new")
    if ev is None or not ev.matrix or not old or not new:
        return None
    cells = [ev.matrix[i][j] for i in old for j in new] + [ev.matrix[j][i] for i in old for j in new]
    return float(np.mean(cells))


def _table7(plan: Plan, runs: dict[str, Run], transfer: dict[str, dict[str, Evaluation]]) -> list[str]:
    """Table 7: ways of making a larger set: joint over all pairs, joint with sampling, grown from a frozen set."""
    expansions = [s for s in plan.sets if s.expansion]
    if not expansions:
        return []
    sizes = {s.n for s in expansions}
    parents = {s.grow_from for s in expansions if s.grow_from}
    scale = plan.scale(expansions[0])  # reference rows trained at the expansions' scale, no other
    shown = [s for s in plan.sets if not s.expansion and s.method == "disjoint" and plan.scale(s) == scale
             and (s.n in sizes or s.label in parents)]
    first = plan.ablation_attack
    rows = []
    for spec in [*shown, *expansions]:
        run = runs[spec.label]
        ev = transfer[spec.label].get(first)
        rows.append([spec.label, _how_made(spec, run), str(run.n),
                     _pct(ev.blackbox_mean, ev.blackbox_std) if ev else "-",
                     _pct(_old_new_blackbox(run, ev)) if spec.grow_from else "",
                     _pct(_mean(run.clean_acc)), f"{run.seconds / 60:.1f}"])
    return ["## Larger sets (Table 7): joint training, sampling, or growing a frozen set", "", *_scale_note(plan),
            "A grown set's training minutes are the new models' only; its old ↔ new column is the mean "
            "accuracy between the parent's models and the new ones, both directions.", "",
            _table(["set", "made by", "n", f"{first} black-box %", "old ↔ new %", "clean %", "train min"], rows),
            ""]


def _beyond_budget(plan: Plan, runs: dict[str, Run], sweeps: Curves,
                   transfer: dict[str, dict[str, Evaluation]]) -> list[str]:
    """Where the defence stops holding as ε grows past the preset's budget, and the objective's reason.

    "Holding" is relative to the set's own clean accuracy (an absolute bar says nothing about a set
    whose clean accuracy is below it): the sweep's first ε that costs more than BREAK_DROP points."""
    eps0 = CIFAR10_LINF_EPS * budget_for(plan.dataset).linf_scale
    disjoint = [label for label in sweeps if runs[label].method == "disjoint"]
    if not disjoint:
        return []
    lines = [f"## Beyond the budget: ε from {eps0:g} to {2 * eps0:g}", ""]
    reference = next((label for label in sweeps if runs[label].method == "independent"), None)
    for label in disjoint:
        eps, bb = sweeps[label]
        at = dict(zip(eps, bb, strict=True))
        ev = transfer[label].get(plan.attacks[0])
        clean = _clean_on_images(ev, runs[label]) or 0.0
        below = [e for e in eps if at[e] < clean - BREAK_DROP]
        nearest = min(eps, key=lambda e: abs(e - eps0))
        text = (f"- **{label}** (clean {clean:.1f} %): black-box accuracy {_pct(at[nearest])} % at ε = {nearest:g}, "
                f"{_pct(at[eps[-1]])} % at ε = {eps[-1]:g}; ")
        text += (f"it first costs more than {BREAK_DROP:g} points at ε = {below[0]:g}." if below
                 else f"no ε of the sweep costs more than {BREAK_DROP:g} points.")
        if reference is not None:
            ref = dict(zip(*sweeps[reference], strict=True))
            gaps = ", ".join(f"{e:g}: {at[e] - ref[e]:+.1f}" for e in eps if e in ref)
            text += f" Lead over {reference} (points) at ε = {gaps}."
        lines.append(text)
    cfg = runs[disjoint[0]].config or {}
    lines += ["", "Why: the transfer terms train each model against the others' perturbations of two kinds, "
              f"{_term1_words(cfg)} and the L∞ step ε2·tanh(∇) (ε2 = {cfg.get('eps2', '?')}); "
              "nothing in the objective keeps the models' loss surfaces apart further out, so an attack with a "
              "larger budget reaches directions the models share, and transfers again.", ""]
    return lines


TUNING_RECORD = {"fashion-mnist": "fashion-mnist-preset.md", "digits": "digits-preset.md"}
CLAMP_WORDS = {"image": "each image's loss increase (`image`)",
               "batch": "the batch mean's increase (`batch`, the released code)",
               "none": "no clamp: the mean increase against a detached clean loss (`none`)"}


def _recipe(plan: Plan, runs: dict[str, Run]) -> list[str]:
    """The disjoint sets' hyperparameters, read from a stored run, and where the choices are recorded."""
    run = next((runs[s.label] for s in plan.sets if s.method == "disjoint" and not s.ablation and s.label in runs),
               None)
    if run is None:
        return []
    c = run.config

    def window(key: str) -> str:
        w = c.get(key) or {}
        return f"epochs {w.get('first', 1)}-{w['last'] if w.get('last') else 'end'}"

    width = f", width {c['width']}{' (`--width`)' if plan.width else ''}" if c["arch"] == "cnn" else ""
    term1, size = (("ρ·∇/‖∇‖, `--transfer1-l2`", f"ρ = {c['transfer1_l2']:g}") if c.get("transfer1_l2")
                   else ("ε1·∇", f"ε1 = {c['eps1']:g}"))
    rows = [["architecture", f"{c['arch']}{width}"],
            ["schedule", f"{c['epochs']} epochs, batch {c['batch_size']}, one-cycle lr peak {c['lr_max']:g}"],
            [f"transfer loss 1 ({term1})", f"{size}, weight {c['w_transfer1']:g}, {window('transfer1_window')}"],
            ["transfer loss 2 (ε2·tanh ∇)",
             f"ε2 = {c['eps2']:g}, weight {c['w_transfer2']:g}, {window('transfer2_window')}"],
            ["transfer clamp", CLAMP_WORDS.get(c.get("transfer_clamp", "batch"), CLAMP_WORDS["batch"])],
            ["angular loss", f"weight {c['w_angle']:g}, {window('angle_window')}"]]
    if c.get("transfer_steps", 1) > 1:
        rows.insert(5, ["perturbation steps", f"{c['transfer_steps']} (`--transfer-steps`), on "
                        f"{c.get('transfer_refine', 1.0):g} of each batch"])
    record = TUNING_RECORD.get(plan.preset)
    why = (f"Each value that departs from the paper's was chosen on a validation split carved from the training "
           f"data, never on the test split; what each change did is in [{record}]({record})."
           if record else "The paper's released hyperparameters.")
    return ["## Recipe", "", f"The disjoint sets' `{plan.preset}` preset, as stored with "
            f"{run.id}. {why}", "", _table(["setting", "value"], rows), ""]


def _term1_words(cfg: dict[str, Any]) -> str:
    """Transfer term 1's perturbation as a stored config sets it: Eq. 3's, or the L2 step of `--transfer1-l2`."""
    if cfg.get("transfer1_l2"):
        return f"the L2 step ρ·∇/‖∇‖ (ρ = {cfg['transfer1_l2']:g}, `--transfer1-l2`)"
    return f"ε1·∇ (ε1 = {cfg.get('eps1', '?')})"


def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "not met")


def _targets(store: Store, plan: Plan, runs: dict[str, Run], transfer: dict[str, dict[str, Evaluation]]) -> list[str]:
    """deflect's bar (set on Fashion-MNIST at ε = 0.1), each with the measured value and a verdict."""
    rows: list[list[str]] = []

    def bb(label: str, attack: str) -> tuple[float, float] | None:
        """(black-box mean, clean mean on the same images) of one stored transfer matrix."""
        ev = transfer.get(label, {}).get(attack)
        if ev is None or ev.blackbox_mean is None:
            return None
        clean = _clean_on_images(ev, runs[label])
        return ev.blackbox_mean, clean if clean is not None else float("nan")

    ind = _mean(runs["independent n=3"].clean_acc) if "independent n=3" in runs else None
    for attack in ("pgd2", "mifgsm1", "cw2"):
        got = bb("disjoint n=3", attack)
        rows.append([f"n=3: {attack} black-box within {BB_GAP:g} of clean",
                     f"{got[0]:.1f} vs clean {got[1]:.1f}" if got else "not measured",
                     _verdict(got[1] - got[0] <= BB_GAP if got else None)])
    for label in ("disjoint n=3", "disjoint n=8"):
        clean = _mean(runs[label].clean_acc) if label in runs else None
        ok = None if clean is None or ind is None else ind - clean <= CLEAN_GAP
        rows.append([f"{label}: clean within {CLEAN_GAP:g} of independent n=3",
                     f"{clean:.1f} vs {ind:.1f}" if ok is not None else "not in this plan", _verdict(ok)])
    for attack in ("pgd2", "mifgsm1"):
        got = bb("disjoint n=8", attack)
        rows.append([f"n=8: {attack} black-box ≥ {N8_BLACKBOX:g}", f"{got[0]:.1f}" if got else "not in this plan",
                     _verdict(got[0] >= N8_BLACKBOX if got else None)])
    for spec in plan.sets:
        if spec.ablation or spec.method != "disjoint":
            continue
        unowned: dict[int, float] = {}
        single = transfer[spec.label].get(ENSEMBLE_ATTACK)
        if single is not None and single.blackbox_mean is not None:
            unowned[1] = single.blackbox_mean
        for key, ev in _newest(store, plan, runs[spec.label], "ensemble").items():
            m, value = (ev.extra or {}).get("m"), (ev.extra or {}).get("mean_unowned")
            if key.startswith(f"{ENSEMBLE_ATTACK}/") and isinstance(m, int) and m < spec.n and value is not None:
                unowned[m] = value
        worst = min(unowned, key=unowned.__getitem__) if unowned else None
        rows.append([f"{spec.label}: every m < n, models outside the ensemble ≥ {ENSEMBLE_BAR:g}",
                     f"lowest {unowned[worst]:.1f} (m={worst})" if worst else "not measured",
                     _verdict(unowned[worst] >= ENSEMBLE_BAR if worst else None)])
    big, fast = (transfer.get(label, {}).get("pgd2") for label in ("disjoint n=8", "fast-at n=3"))
    have = big is not None and fast is not None and big.whole_set_mean is not None and fast.whole_set_mean is not None
    rows.append(["whole-set pgd2: disjoint n=8 above fast-at n=3",
                 f"{big.whole_set_mean:.1f} vs {fast.whole_set_mean:.1f}" if have else "not in this plan",
                 _verdict(big.whole_set_mean > fast.whole_set_mean if have else None)])
    return ["## Targets", "",
            "deflect's bar, set for Fashion-MNIST at ε = 0.1 (a yardstick on other datasets). Clean accuracy in "
            "the black-box rows is on the same test images as the attack.", "",
            _table(["target", "measured %", "verdict"], rows), ""]


def write_report(store: Store, plan: Plan, runs: dict[str, Run], out: Path, seconds: float, jobs: int = 1) -> Path:
    """`out/<plan.name>.md` and its figures; `jobs` 0 marks a report written from stored sets only."""
    out.mkdir(parents=True, exist_ok=True)
    text, data = report_text(store, plan, runs, seconds, jobs)
    if data["sweeps"]:
        eps = next(iter(data["sweeps"].values()))[0]
        curves_png(eps, {k: v[1] for k, v in data["sweeps"].items() if v[0] == eps},
                   out / f"{plan.name}-eps-sweep.png", f"{plan.dataset}: PGD black-box accuracy vs ε", "ε (L∞)")
    if data["ensemble"]:
        curves = data["ensemble"]
        curves_png([], {k: v[1] for k, v in curves.items()}, out / f"{plan.name}-ensemble-size.png",
                   f"{plan.dataset}: PGD-20 on m-model ensembles", "models in the attacker's ensemble (m)",
                   xs={k: v[0] for k, v in curves.items()}, integer_x=True)
    for name, source in data["figures"].items():
        if source.is_file():
            shutil.copyfile(source, out / name)
    path = out / f"{plan.name}.md"
    path.write_text(text + "\n")
    return path

