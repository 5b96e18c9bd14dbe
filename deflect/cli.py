"""The `deflect` command line: a thin Typer layer over the library.

Every command turns a `DeflectError` into one line on stderr and exit code 2; progress goes to
stderr so that `--json` output on stdout stays machine-readable.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer

from deflect.errors import DeflectError
from deflect.launch import INTERRUPTED

if TYPE_CHECKING:
    from deflect.store import BlackboxFigure

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    help="Train adversarially-disjoint model sets, evaluate transfer, and measure deflected attacks.",
)

F = TypeVar("F", bound=Callable[..., Any])

DbOption = Annotated[
    Path | None,
    typer.Option("--db", envvar="DEFLECT_DB", help="SQLite database (default ./deflect.db).", show_default=False),
]
ATTACK_HELP = ("Attack or comma list: fgsm, fgm, rfgsm, pgd1, pgd2, mifgsm1, mifgsm2, cw1, cw2, ead1, ead2 (Table 1); "
               "di-ti-mifgsm, di-ti-mifgsm-cw, di-ti-mifgsm-2eps, di-ti-mifgsm-cw-2eps, square (adaptive).")
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
DistillOption = Annotated[float | None, typer.Option(
    help="With --teacher: share of the classification target from the teacher (default 0.5).")]
DistillTemperatureOption = Annotated[float | None, typer.Option(
    help="With --teacher: softmax temperature of the soft targets (default 4).")]


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"deflect: error: {message}", err=True)
    raise typer.Exit(code)


_interrupt_reported = False


def interrupted_line(detail: str = "") -> None:
    """The one line a Ctrl-C gets, with what to do next when there is something to do."""
    global _interrupt_reported
    _interrupt_reported = True
    typer.echo("deflect: interrupted" + (f"; {detail}" if detail else ""), err=True)


def interrupted(detail: str = "") -> NoReturn:
    """End a command after a Ctrl-C: its one line and exit code 130."""
    interrupted_line(detail)
    raise typer.Exit(INTERRUPTED)


def handle_errors(fn: F) -> F:
    """One line on stderr and exit 2 for the project's own errors; never a traceback. A Ctrl-C the
    command does not handle itself (one that arrives while it loads, or a command with nothing to
    resume) gets one line and exit 130: Typer would otherwise end the command with 130 silently."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _OPENED.clear()  # an earlier command's database (tests, a notebook) is not this one's
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            interrupted()
        except DeflectError as exc:
            fail(str(exc))
        except MemoryError:
            fail("out of memory; try a smaller --batch-size or --limit")
        except OSError as exc:
            if exc.errno is None:
                raise
            fail(f"{exc.strerror}: {exc.filename or ''}".rstrip(": "))
        except Exception as exc:
            # A database that breaks mid-command (disk full, locked past the busy timeout, damaged)
            # is the user's environment, not a deflect bug: name it in one line.
            from sqlalchemy.exc import SQLAlchemyError

            if not isinstance(exc, SQLAlchemyError):
                raise
            orig = getattr(exc, "orig", None) or exc
            where = f" in {_OPENED[-1]}" if _OPENED else ""  # the file, not only SQLite's words for its state
            fail(f"database error{where}: {str(orig).splitlines()[0]}")

    return wrapper  # type: ignore[return-value]


def open_store(db: Path | None, create: bool = False) -> Any:
    """The database; only the commands that make runs (train, demo, reproduce) and the dashboard, which
    waits for a first run, create it: elsewhere a mistyped --db is an error, not a new empty file."""
    from deflect.store import Store

    store = Store(db, create=create)
    _OPENED.append(store.path)
    return store


_OPENED: list[Path] = []  # the database this command opened, named by a database error's line


#: `deflect train` options that set the disjoint objective's pair terms: refused for the other methods
DISJOINT_ONLY = ("eps1", "eps2", "w_angle", "w_transfer1", "w_transfer2", "w_smooth", "angle_epochs", "transfer_until",
                 "sample", "no_angle", "no_transfer", "eps1_per_sample", "transfer_batch", "transfer_clamp",
                 "detach_clean", "clean_bn_stats", "transfer_steps", "transfer_refine", "transfer1_l2")


def typed_options(ctx: typer.Context) -> list[str]:
    """The options given on the command line (not defaults or the environment), in declaration order."""
    return [name for name in ctx.params if getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"]


def as_flags(names: Sequence[str]) -> str:
    """Parameter names as the flags a user types: `--w-angle, --sample`."""
    return ", ".join("--" + name.replace("_", "-") for name in names)


def only_apply(names: Sequence[str], where: str) -> str:
    """`--k only applies with --adaptive`; `--queries, --restarts only apply with --adaptive`."""
    return f"{as_flags(names)} only {'applies' if len(names) == 1 else 'apply'} {where}"


def warn_idle_terms(cfg: Any, flag: str = "--epochs", what: str = "a disjoint set") -> None:
    """Say when a disjoint run is too short for its own schedule: it would pass for a disjoint set."""
    from deflect.console import err_console
    from deflect.train.losses import idle_terms

    idle = idle_terms(cfg)
    if idle:
        terms = " and ".join(f"{label} (from epoch {first})" for label, first in idle)
        verb = "switches" if len(idle) == 1 else "switch"
        need = max(first for _, first in idle)
        err_console.print(f"deflect: warning: {terms} never {verb} on in {cfg.epochs} epoch"
                          f"{'s' if cfg.epochs != 1 else ''}; use {flag} {need} or more for {what}",
                          highlight=False, markup=False)


def warn_unfinished(run: Any) -> None:
    """One line on stderr when a command works on a set that never finished training."""
    if run.status != "finished" and run.epochs_done:  # none saved: the command refuses the run instead
        from deflect.console import err_console

        err_console.print(f"deflect: warning: run {run.id} is {run.status} after {run.epochs_done} of "
                          f"{run.epochs_total} epochs; its last saved checkpoint is used", highlight=False)


def output_folder(out: Path) -> Path:
    """`--out`, made and checked before any work: hours of training must not end on a bad folder."""
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(f"cannot create --out folder {out}: {exc.strerror or exc}")
    if not os.access(out, os.W_OK | os.X_OK):
        fail(f"--out folder {out} is not writable")
    return out


def _training_bar(progress: Any, task: dict[str, Any], label: str = "") -> Callable[[Any], None]:
    """A batch callback that drives one Rich task per training run (created at its first batch,
    so a resumed run starts the bar at the epoch it resumes from); clear task["id"] for a new run.
    `label` names the run in the bar, for several bars at once."""
    from deflect.console import format_losses

    prefix = f"{label} · " if label else ""

    def on_batch(event: Any) -> None:
        if "id" not in task:
            total = event.batches * event.epochs
            done = event.batches * (event.epoch - 1)
            task["id"] = progress.add_task("train", total=total, completed=done, epoch="", losses="", rate="")
        progress.update(
            task["id"], advance=1,
            epoch=f"{prefix}{event.epoch}/{event.epochs} batch {event.batch}/{event.batches}",
            losses=format_losses(event), rate=f"{event.images_per_s:.0f} img/s",
        )

    return on_batch


@app.command()
@handle_errors
def train(
    ctx: typer.Context,
    n: Annotated[int, typer.Option("--n", "-n", help="Number of models in the set (≥ 2).")] = 3,
    dataset: Annotated[str, typer.Option(help="digits | fashion-mnist | mnist | cifar10.")] = "digits",
    method: Annotated[str, typer.Option(help="disjoint | independent | fast-at | adp.")] = "disjoint",
    preset: Annotated[str | None, typer.Option(help="digits | fashion-mnist | paper-cifar10.")] = None,
    arch: Annotated[str | None, typer.Option(help="cnn | preact-resnet18.")] = None,
    width: Annotated[int | None, typer.Option(help="Channels of the small CNN's first stage (preset default).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs (preset default).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size (preset default).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate of the cyclic schedule.")] = None,
    eps1: Annotated[float | None, typer.Option(help="ε1 of transfer loss 1 (Eq. 3).")] = None,
    eps2: Annotated[float | None, typer.Option(help="ε2 of transfer loss 2 (Eq. 4).")] = None,
    w_angle: Annotated[float | None, typer.Option(help="Weight of the angular loss.")] = None,
    w_transfer1: Annotated[float | None, typer.Option(help="Weight of transfer loss 1.")] = None,
    w_transfer2: Annotated[float | None, typer.Option(help="Weight of transfer loss 2.")] = None,
    w_smooth: Annotated[float | None, typer.Option(help=(
        "Weight of a smoothness term (TRS): each model's mean squared per-image input-gradient norm "
        "(default 0: off, as in the paper)."))] = None,
    angle_epochs: Annotated[int | None, typer.Option(help="Angular loss active for the first N epochs.")] = None,
    transfer_until: Annotated[int | None, typer.Option(help=(
        "Transfer losses off after epoch N (default: on to the end); once the angular loss is over too "
        "(--angle-epochs), the later epochs train on classification alone."))] = None,
    sample: Annotated[int | None, typer.Option(help="Models sampled per iteration for the transfer terms.")] = None,
    no_angle: Annotated[bool, typer.Option("--no-angle", help="Ablation: drop the angular loss.")] = False,
    no_transfer: Annotated[bool, typer.Option("--no-transfer", help="Ablation: drop both transfer losses.")] = False,
    eps1_per_sample: Annotated[bool, typer.Option(
        "--eps1-per-sample", help="Scale ε1 by the batch size (batch-size independent).")] = False,
    at_eps: Annotated[float | None, typer.Option(help="fast-at: L∞ budget (default: the dataset's ε).")] = None,
    step: Annotated[str, typer.Option(help="reference | fast: same objective, faster layout.")] = "reference",
    transfer_batch: Annotated[int | None, typer.Option(
        help="Images per batch for the pair terms, angle and transfer (changes the objective; default all).")] = None,
    transfer_clamp: Annotated[str | None, typer.Option(
        help="batch | image | none: clamp the transfer terms' mean increase (released code) or each "
             "image's (preset default), or not at all (each model also learns the others' perturbed "
             "images; implies --detach-clean).")] = None,
    detach_clean: Annotated[bool, typer.Option("--detach-clean", help=(
        "Transfer losses compare with a detached clean loss, so they never raise it (changes the "
        "objective; the released code's is live)."))] = False,
    clean_bn_stats: Annotated[bool, typer.Option("--clean-bn-stats", help=(
        "BatchNorm running statistics from clean images only: the transfer losses' perturbed forwards "
        "leave them alone (the trained weights are the same; the released code lets every forward "
        "update them)."))] = False,
    transfer_steps: Annotated[int | None, typer.Option(
        help="Sign steps of transfer loss 2's perturbation, and L2 steps of loss 1's under --transfer1-l2 "
             "(changes the objective; default 1, Eq. 4).")] = None,
    transfer_refine: Annotated[float | None, typer.Option(
        help="Share of each batch whose perturbations --transfer-steps refines (default 1; the "
             "rest keeps the one step).")] = None,
    transfer1_l2: Annotated[float | None, typer.Option(
        "--transfer1-l2", help="Transfer loss 1's perturbation as an L2 step of this length per image along "
        "its gradient, in place of Eq. 3's ε1·∇ (against L2 attacks such as CW; changes the objective); "
        "--transfer-steps and --transfer-refine refine it as PGD-L2.")] = None,
    teacher: Annotated[str | None, typer.Option(help=(
        "A finished set of the same dataset (run id, prefix or 'latest') whose averaged soft targets "
        "replace a share --distill of the classification target (changes the objective)."))] = None,
    distill: DistillOption = None,
    distill_temperature: DistillTemperatureOption = None,
    select: Annotated[str | None, typer.Option(help="Kept checkpoint: val-loss | last.")] = None,
    limit: Annotated[int | None, typer.Option(help="Train on a seeded subset of N images.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    bf16: Annotated[bool, typer.Option("--bf16", help=(
        "bf16 autocast for the disjoint step (a GPU, or a CPU with AVX512-BF16/AMX)."))] = False,
    data_dir: Annotated[Path | None, typer.Option(help="Dataset root for torchvision datasets.")] = None,
    download: Annotated[bool, typer.Option("--download", help="Let torchvision download the dataset.")] = False,
    resume: Annotated[str | None, typer.Option(help="Continue an interrupted run.")] = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Train a set of n models; prints the run id.

    Example: deflect train --n 6 ; deflect train --n 3 --dataset fashion-mnist ;
    torchrun --nproc-per-node 2 -m deflect train -n 3 (each process a shard of every batch)
    """
    from deflect.config import TermWindow, make_config
    from deflect.console import err_console, format_epoch, training_progress
    from deflect.train import Callbacks
    from deflect.train import train as run_training
    from deflect.train.distill import require_teacher

    typed = typed_options(ctx)
    given = [name for name in typed if name not in ("resume", "db", "as_json")]
    if resume is not None and given:  # the run's stored settings decide; a setting given beside it would be ignored
        fail(f"--resume continues a run with its stored settings; drop {as_flags(given)}")
    if method != "disjoint" and (pair_options := [name for name in DISJOINT_ONLY if name in typed]):
        fail(only_apply(pair_options, f"to --method disjoint (its pair terms), not {method}"))
    if at_eps is not None and method != "fast-at":
        fail(f"--at-eps only applies to --method fast-at, not {method}")
    for ablation, weights in (("no_angle", ("w_angle",)), ("no_transfer", ("w_transfer1", "w_transfer2"))):
        if ablation in typed and (set_too := [name for name in weights if name in typed]):  # which one was meant?
            fail(f"{as_flags([ablation])} sets {as_flags(set_too)} to 0; drop one of them")
    if "transfer1_l2" in typed and (unused := [name for name in ("eps1", "eps1_per_sample") if name in typed]):
        fail(f"--transfer1-l2 replaces ε1's step of transfer loss 1; drop {as_flags(unused)}")
    if data_dir is not None and not download and not data_dir.is_dir():  # else a built-in copy would stand in
        fail(f"--data-dir {data_dir} is not a folder (add --download to fetch the dataset into it)")
    store = open_store(db, create=True)
    cfg = None
    if resume is None:
        overrides: dict[str, Any] = dict(
            method=method, arch=arch, width=width, epochs=epochs, batch_size=batch_size, lr_max=lr, eps1=eps1,
            eps2=eps2, w_angle=w_angle, w_transfer1=w_transfer1, w_transfer2=w_transfer2,
            w_smooth=w_smooth, sample_models=sample, select=select, train_limit=limit, seed=seed, device=device,
            bf16=bf16, data_dir=str(data_dir) if data_dir else None, download=download,
            eps1_per_sample=eps1_per_sample or None, step=step, transfer_batch=transfer_batch, at_eps=at_eps,
            transfer_clamp=transfer_clamp, transfer_steps=transfer_steps, transfer_refine=transfer_refine,
            transfer1_l2=transfer1_l2, detach_clean=detach_clean or None, clean_bn_stats=clean_bn_stats or None,
            teacher=teacher, distill_alpha=distill, distill_temperature=distill_temperature,
        )
        require_teacher(teacher, distill, distill_temperature)
        if angle_epochs is not None:
            if angle_epochs < 0:
                fail(f"--angle-epochs must be at least 0 (0: no angular term), got {angle_epochs}")
            overrides["angle_window"] = TermWindow(1, angle_epochs)
        if transfer_until is not None:
            overrides["transfer_until"] = transfer_until
        if no_angle:
            overrides["w_angle"] = 0.0
        if no_transfer:
            overrides["w_transfer1"] = overrides["w_transfer2"] = 0.0
        cfg = make_config(n=n, dataset=dataset, preset=preset, **overrides)

    from deflect.train.distributed import from_env
    from deflect.train.runner import resolve_device

    want = cfg.device if cfg is not None else str(store.get_run(resume).config.get("device", "auto"))
    shard = from_env(resolve_device(want).type)  # torchrun: one process per shard of each batch
    if shard is not None and not shard.leader:
        run_training(cfg, store, Callbacks(), resume=resume, shard=shard)  # rank 0 reports
        return
    progress = training_progress(err_console)
    task: dict[str, Any] = {}

    def on_start(run: Any, first_epoch: int) -> None:
        err_console.print(f"[bold]run[/] {run.id}  ({run.method}, {run.dataset}, {run.arch}, n={run.n}, {run.device})")
        task["run"] = run.id
        if cfg is not None:  # a new run, past every check: not a warning before an error
            warn_idle_terms(cfg)

    on_batch = _training_bar(progress, task)

    def on_epoch(metric: Any) -> None:
        progress.console.print(f"epoch {metric.epoch}: {format_epoch(metric)}")

    try:
        with progress:
            run_id = run_training(cfg, store, Callbacks(on_start, on_batch, on_epoch), resume=resume, shard=shard)
    except KeyboardInterrupt:
        rid = task.get("run", resume)
        interrupted(f"continue with 'deflect train --resume {rid}'" if rid is not None
                    else "the run had not been created, so nothing was stored")
    run = store.get_run(run_id)
    if as_json:
        from deflect.store import run_to_dict

        typer.echo(json.dumps(run_to_dict(run)))
    else:
        typer.echo(run_id)


@app.command()
@handle_errors
def grow(
    run: Annotated[str, typer.Argument(help="Finished run to grow: id, unique prefix, or 'latest'.")],
    add: Annotated[int | None, typer.Option("--add", help="New models to train, one after another (default 1).")]
    = None,
    pool: Annotated[bool, typer.Option("--pool", help="Keep the new models as the set's unreleased pool.")] = False,
    refill: Annotated[int | None, typer.Option(
        help="Top the pool up to N models in a background process and return at once (implies --pool).")] = None,
    sample: Annotated[int | None, typer.Option(help="Frozen models sampled per step (default 2).")] = None,
    transfer_batch: Annotated[int | None, typer.Option(
        help="Pair terms on the first B images of each batch (changes the objective; default: the parent's).")]
    = None,
    transfer_steps: Annotated[int | None, typer.Option(
        help="Sign steps of transfer loss 2's perturbations, and L2 steps of loss 1's for a set trained with "
             "--transfer1-l2 (changes the objective; default: the parent's).")]
    = None,
    transfer_refine: Annotated[float | None, typer.Option(
        help="Share of each batch those steps refine (changes the objective; default: the parent's).")]
    = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs per new model (default: the parent's).")] = None,
    pair_scale: Annotated[float | None, typer.Option(
        help="Multiply the set's angular and transfer weights in the new models' loss (default 1).")] = None,
    teacher: Annotated[str | None, typer.Option(help=(
        "A finished set of the same dataset whose soft targets guide the new models (changes the "
        "objective; default none: a parent's own teacher is not inherited)."))] = None,
    distill: DistillOption = None,
    distill_temperature: DistillTemperatureOption = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the new models (default: the parent's).")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Add K models to a finished disjoint set without retraining it; prints the new run id.

    Each new model trains against the frozen models before it (transfer terms both ways and the
    angular term, with the parent's weights and schedule). The grown set is a new run that records
    its parent.

    Example: deflect grow latest --add 3 ; deflect grow RUN --refill 4
    """
    from deflect.console import err_console, format_epoch, format_losses, grow_progress
    from deflect.store import run_to_dict
    from deflect.train.distill import require_teacher
    from deflect.train.grow_run import GrowCallbacks
    from deflect.train.grow_run import grow as run_grow

    if add is not None and add < 1:
        fail(f"--add must be at least 1, got {add}")
    require_teacher(teacher, distill, distill_temperature)  # here too: --refill only spawns the grow
    store = open_store(db)
    if refill is not None:
        from dataclasses import asdict

        from deflect.pool import pool_base, spawn_refill

        if add is not None:
            fail("--refill works out how many models to add; drop --add")
        base = pool_base(store, store.get_run(run))
        if base.status != "finished":
            fail(f"run {base.id} is {base.status}; only a finished set can be grown")
        passed = [(f"--{name}", value) for name, value in (("sample", sample), ("epochs", epochs), ("seed", seed),
                                                            ("transfer-batch", transfer_batch),
                                                            ("transfer-steps", transfer_steps),
                                                            ("transfer-refine", transfer_refine),
                                                            ("pair-scale", pair_scale), ("teacher", teacher),
                                                            ("distill", distill),
                                                            ("distill-temperature", distill_temperature))
                  if value is not None]
        args = [str(a) for pair in passed for a in pair] + ["--device", device]
        from deflect.train.grow_run import check_grow

        def check(need: int) -> None:  # the background grow's own checks, made here where they can fail loudly
            check_grow(store, base.id, need, pool=True, sample=sample, epochs=epochs, device=device,
                       transfer_batch=transfer_batch, transfer_steps=transfer_steps, transfer_refine=transfer_refine,
                       pair_scale=pair_scale, teacher=teacher, distill_alpha=distill,
                       distill_temperature=distill_temperature)

        job = spawn_refill(store, base, refill, args, check)
        if as_json:
            typer.echo(json.dumps({**asdict(job), "log": str(job.log) if job.log else None}))
        elif job.add == 0:
            typer.echo(f"the pool of {base.id} already holds {job.size} model(s) (target {refill})")
        else:
            typer.echo(f"growing {job.add} pool model(s) for {base.id} in the background (pid {job.pid}); "
                       f"log: {job.log}")
        return

    progress = grow_progress(err_console)
    task: dict[str, Any] = {}

    def on_start(new: Any, parent: Any) -> None:
        role = "pool of " + new.config["pool_of"] if new.config.get("pool_of") else "set"
        err_console.print(f"[bold]run[/] {new.id}  ({role}: {parent.id} n={parent.n} + {new.n - parent.n} new, "
                          f"{new.device})")
        task["run"], task["parent"] = new.id, parent.id

    def on_batch(event: Any) -> None:
        if "id" not in task:
            task["id"] = progress.add_task("grow", total=event.batches * event.epochs * event.models, model="",
                                           epoch="", losses="", rate="")
        task["at"] = (event.model, event.models, event.epoch, event.epochs)
        progress.update(task["id"], advance=1, model=f"{event.model}/{event.models}",
                        epoch=f"epoch {event.epoch}/{event.epochs} batch {event.batch}/{event.batches}",
                        losses=format_losses(event), rate=f"{event.images_per_s:.0f} img/s")

    def on_epoch(metric: Any) -> None:  # a line per epoch, as `deflect train` logs, also where no bar is drawn
        model, models, epoch, epochs = task["at"]
        progress.console.print(f"new {model}/{models} epoch {epoch}/{epochs}: {format_epoch(metric)}")

    def on_model(done: Any) -> None:
        progress.console.print(f"m{done.index} (new {done.position}): clean {done.clean_acc:.1f}% "
                               f"(epoch {done.best_epoch}) in {done.seconds:.1f} s")

    try:
        with progress:  # stopped before its first task (no such run), it leaves no line (console._Progress)
            run_id = run_grow(store, run, add or 1, sample=sample, epochs=epochs, seed=seed, device=device,
                              pool=pool, transfer_batch=transfer_batch, pair_scale=pair_scale,
                              transfer_steps=transfer_steps, transfer_refine=transfer_refine,
                              teacher=teacher, distill_alpha=distill,
                              distill_temperature=distill_temperature,
                              callbacks=GrowCallbacks(on_start, on_batch, on_epoch, on_model))
    except KeyboardInterrupt:
        parent = task.get("parent", run)
        interrupted(f"run {task['run']} is marked interrupted and {parent} is unchanged" if "run" in task
                    else f"the grown run had not been created; {parent} is unchanged")
    if as_json:
        typer.echo(json.dumps(run_to_dict(store.get_run(run_id))))
    else:
        typer.echo(run_id)


@app.command()
@handle_errors
def runs(db: DbOption = None, as_json: JsonOption = False) -> None:
    """List the runs in the database.

    worst BB %: the lowest black-box accuracy over the attacks (and settings) evaluated on the test split, each at its
    largest evaluation.

    Example: deflect runs --json
    """

    from deflect.console import runs_table, stdout_console
    from deflect.store import default_db_path, run_to_dict

    path = db if db is not None else default_db_path()
    if not path.exists() and path.parent.is_dir():  # nothing to list; the path is named, in case it is a typo
        typer.echo("[]" if as_json else f"no runs yet: no database at {path}; 'deflect train' or 'deflect demo' "
                                        "creates it")
        return
    store = open_store(db)
    rows = store.list_runs()
    worst = store.worst_blackbox()
    if as_json:
        typer.echo(json.dumps([{**run_to_dict(r), **_worst_fields(worst.get(r.id))} for r in rows]))
        return
    if not rows:
        typer.echo("no runs yet; create one with 'deflect train' or 'deflect demo'")
        return
    out = stdout_console()
    out.print(runs_table(rows, {k: v.accuracy for k, v in worst.items()}, out.width))


def _worst_fields(figure: BlackboxFigure | None) -> dict[str, Any]:
    """`deflect runs --json`'s black-box fields of one run (null where it has no transfer evaluation)."""
    return {"worst_blackbox": figure.accuracy if figure else None,
            "worst_blackbox_attack": figure.attack if figure else None,
            "worst_blackbox_params": figure.params if figure else None,
            "worst_blackbox_images": figure.n_examples if figure else None}


def _progress_callback(progress: Any, description: str, unit: str) -> Callable[[int, int], None]:
    """Adapt a (done, total) callback to a Rich task with throughput.

    The first call comes when the first unit is already done, at an unknown cost: the rate counts
    the units done since then, over the time since then, and stays blank until a second call."""
    state: dict[str, Any] = {}

    def update(done: int, total: int) -> None:
        now = time.perf_counter()
        if "task" not in state:
            state.update(task=progress.add_task(description, total=total, rate=""), t0=now, first=done)
        rate = f"{(done - state['first']) / (now - state['t0']):.2f} {unit}/s" if done > state["first"] else ""
        progress.update(state["task"], completed=done, total=total, rate=rate)

    return update


def _evaluate_adaptive(store: Any, run: str, settings: Any, device: str, as_json: bool) -> None:
    """`evaluate --adaptive`: every adaptive attacker, one progress task per attack, then the table."""
    record = store.get_run(run)
    warn_unfinished(record)
    store.check_writable()
    if settings.aware_epochs is not None and record.method == "disjoint" and "method-aware" in settings.families:
        from deflect.surrogate import aware_config

        warn_idle_terms(aware_config(record, settings.aware_epochs, device), "--aware-epochs",
                        "the method-aware attacker's set")
    from deflect.adaptive import evaluate_adaptive, rich_table
    from deflect.console import err_console, stdout_console, work_progress

    with work_progress(err_console) as progress:
        tasks: dict[str, Callable[[int, int], None]] = {}

        def on_progress(what: str, done: int, total: int) -> None:
            tasks.setdefault(what, _progress_callback(progress, what, "batches"))(done, total)

        report = evaluate_adaptive(store, run, settings, device=device, progress=on_progress)
    if as_json:
        typer.echo(json.dumps({"run": report.run_id, "split": settings.split, "kind": "adaptive",
                               **{k: v for k, v in report.to_dict().items() if k != "run"}}))
        return
    out = stdout_console()
    out.print(rich_table(report))
    out.print(f"stored {len(report.rows)} adaptive evaluation(s) for {report.run_id}", highlight=False)


@app.command()
@handle_errors
def evaluate(
    ctx: typer.Context,
    run: Annotated[str, typer.Argument(help="Run id, unique prefix, or 'latest'.")] = "latest",
    attack: Annotated[str | None, typer.Option(help=ATTACK_HELP)] = None,
    all_attacks: Annotated[bool, typer.Option("--all", help="All eleven attacks of the paper's Table 1.")] = False,
    ensemble: Annotated[int | None, typer.Option(help="Craft on every M-model subset (logit average).")] = None,
    max_subsets: Annotated[int | None, typer.Option(help="Cap the number of M-model subsets.")] = None,
    eps_sweep: Annotated[bool, typer.Option("--eps-sweep", help="PGD-100 over the Figure 5 ε list.")] = False,
    tsne: Annotated[bool, typer.Option("--tsne", help="t-SNE of input-gradient signs (PNG).")] = False,
    adaptive: Annotated[bool, typer.Option("--adaptive", help=(
        "Adaptive attackers: DI-TI-MI-FGSM on k owned models, a query-trained surrogate, a method-aware "
        "attacker, Square against one client."))] = False,
    k: Annotated[int | None, typer.Option("--k", help="--adaptive: models the attacker owns (default 2, "
                                          "at most n-1).")] = None,
    attackers: Annotated[str | None, typer.Option(help="--adaptive: comma list of transfer, surrogate, "
                                                  "method-aware, query (default all).")] = None,
    queries: Annotated[int, typer.Option(help="--adaptive: the surrogate's label-query budget.")] = 1000,
    max_queries: Annotated[int, typer.Option(help="--adaptive: Square's queries per image at most.")] = 5000,
    square_limit: Annotated[int, typer.Option(help="--adaptive: images Square attacks.")] = 100,
    restarts: Annotated[int | None, typer.Option(help="--adaptive: DI-TI-MI-FGSM restarts (default 3).")] = None,
    aware_epochs: Annotated[int | None, typer.Option(help="--adaptive: epochs of the method-aware attacker's "
                                                     "own set (default: the run's).")] = None,
    limit: Annotated[int | None, typer.Option(help="Fixed, seeded subset of N test images.")] = None,
    eps: Annotated[float | None, typer.Option(help="Override ε.")] = None,
    alpha: Annotated[float | None, typer.Option(help="Override the step size α.")] = None,
    steps: Annotated[int | None, typer.Option(
        help="Override the number of steps/iterations; the step size stays the attack's (give --alpha "
             "too, e.g. 2.5·ε/steps, to keep the total movement).")] = None,
    unfooled: Annotated[str | None, typer.Option(help=(
        "CW/EAD: what a sample never fooled by the κ margin sends: last (its last iterate, as the paper's "
        "released code; default) or clean (the clean image, as torchattacks)."))] = None,
    batch_size: Annotated[int | None, typer.Option(help="Evaluation batch size (default 128 on CPU, "
                                                   "256 on a GPU; --adaptive: 256).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the subset and the attacks' randomness.")] = 0,
    split: Annotated[str, typer.Option(help="test, or val to choose settings without touching test.")] = "test",
    bf16: Annotated[bool, typer.Option("--bf16", help=(
        "Craft under bf16 autocast (a GPU, or a CPU with AVX512-BF16/AMX); scoring stays float32. "
        "Recorded with each evaluation."))] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Transfer matrices of attacks across a set, stored in the database.

    Example: deflect evaluate latest --attack pgd1 ; deflect evaluate RUN --all --limit 500 ;
    deflect evaluate RUN --adaptive --k 2
    """

    from deflect.attacks import default_params
    from deflect.attacks.base import UNFOOLED
    from deflect.console import (
        err_console,
        key_value_table,
        matrix_table,
        result_console,
        stdout_console,
        work_progress,
    )
    from deflect.pipeline import RunEvaluator, parse_attacks, split_names

    for name, value in (("--eps", eps), ("--alpha", alpha)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            fail(f"{name} must be a finite non-negative number, got {value}")
    if steps is not None and steps < 1:
        fail(f"--steps must be at least 1, got {steps}")
    if batch_size is not None and batch_size < 1:
        fail(f"--batch-size must be at least 1, got {batch_size}")
    adaptive_only = ("k", "attackers", "queries", "max_queries", "square_limit", "restarts", "aware_epochs")
    if not adaptive and (given := [name for name in typed_options(ctx) if name in adaptive_only]):
        fail(only_apply(given, "with --adaptive"))
    if all_attacks and attack is not None:
        fail("--all runs every attack of Table 1; drop --attack, or --all")
    if max_subsets is not None and ensemble is None:
        fail("--max-subsets only applies with --ensemble M")
    if ensemble is not None and attack is None and not all_attacks and (eps_sweep or tsne):
        fail("--ensemble crafts the attacks of --attack/--all, not the ε sweep or the t-SNE; name the attacks")
    if adaptive:
        if (attack or all_attacks or ensemble is not None or eps_sweep or tsne or alpha is not None or bf16
                or unfooled is not None):
            fail("--adaptive runs on its own: drop --attack/--all/--ensemble/--eps-sweep/--tsne/--alpha/--bf16/"
                 "--unfooled")
        from deflect.adaptive import FAMILIES, AdaptiveSettings

        families = tuple(split_names(",".join(FAMILIES) if attackers is None else attackers, "--attackers"))
        settings = AdaptiveSettings(k=k, limit=limit, eps=eps, steps=steps, restarts=restarts, queries=queries,
                                    max_queries=max_queries, square_limit=square_limit, aware_epochs=aware_epochs,
                                    families=families, seed=seed, batch_size=batch_size or 256, split=split)
        settings.check()  # before the run is opened
        _evaluate_adaptive(open_store(db), run, settings, device, as_json)
        return
    if unfooled is not None and unfooled not in UNFOOLED:
        fail(f"--unfooled must be one of {', '.join(UNFOOLED)}, got {unfooled!r}")
    names = parse_attacks(attack, all_attacks) if (attack or all_attacks or not (eps_sweep or tsne)) else []
    with_unfooled = {name for name in names if "unfooled" in default_params(name)}  # CW and EAD
    if unfooled is not None and not with_unfooled:
        fail("--unfooled applies to the CW and EAD attacks (cw1, cw2, ead1, ead2); name one with --attack or --all")

    def overrides_for(name: str) -> dict[str, Any]:
        """The overrides given, --unfooled only for the attacks that take it (so --all --unfooled works)."""
        given = {"eps": eps, "alpha": alpha, "steps": steps, "unfooled": unfooled if name in with_unfooled else None}
        return {k: v for k, v in given.items() if v is not None}

    store = open_store(db)
    store.check_writable()  # before the matrices, not after: a locked database would lose them
    ev = RunEvaluator(store, run, limit=limit, batch_size=batch_size, seed=seed, device=device, split=split,
                      bf16=bf16)
    warn_unfinished(ev.run)
    if ensemble is not None and not 1 <= ensemble <= ev.run.n:
        fail(f"--ensemble must be between 1 and the set size {ev.run.n}, got {ensemble}")
    for name in names:  # every attack built before the first matrix: a refused override wastes no work
        ev.attack(name, **overrides_for(name))
    out = stdout_console()
    payload: list[dict[str, Any]] = []
    labels = [f"m{i}" for i in range(ev.run.n)]
    with work_progress(err_console) as progress:
        shown = result_console(progress.console)
        for name in names:
            kw = overrides_for(name)
            if ensemble is not None:
                res, row = ev.ensemble(name, ensemble, max_subsets, kw,
                                       _progress_callback(progress, f"{name} m={ensemble}", "batches"))
                payload.append({"evaluation_id": row.id, **res.to_dict()})
                if not as_json:
                    rows = [",".join(map(str, s)) for s in res.subsets]
                    s = res.summary()
                    shown.print(matrix_table(
                        f"{ev.run.id} · {name} on {ensemble}-model ensembles (accuracy %)", res.matrix, rows, labels))
                    unowned = "-" if s["mean_unowned"] is None else f"{s['mean_unowned']:.1f}"
                    shown.print(f"{name} m={ensemble}: all models {s['mean_all']:.1f} · not owned "
                                f"{unowned} · owned {s['mean_owned']:.1f}", highlight=False)
                continue
            res, row = ev.transfer(name, kw, _progress_callback(progress, name, "batches"))
            payload.append({"evaluation_id": row.id, **res.to_dict()})
            if not as_json:
                s = res.summary()
                crafted = ", bf16 crafting" if bf16 else ""
                shown.print(matrix_table(
                    f"{ev.run.id} · {name} (accuracy %, {res.n_examples} images{crafted})", res.matrix, labels, labels))
                shown.print(f"{name}: black-box {s['blackbox_mean']:.1f}±{s['blackbox_std']:.1f} · whole set "
                            f"{s['whole_set_mean']:.1f} · white-box {s['whitebox_mean']:.1f} · "
                            f"transfer success {s['success_rate']:.1f}% · clean "
                            + " ".join(f"{c:.1f}" for c in res.clean), highlight=False)
        if eps_sweep:
            task: dict[str, Any] = {}

            def sweep_progress(done: int, total: int, value: float) -> None:
                if "id" not in task:
                    task["id"] = progress.add_task("ε sweep", total=total, rate="")
                progress.update(task["id"], completed=done, rate=f"ε={value:g}")

            results, row = ev.sweep(None if eps is None else [eps], steps or 100, sweep_progress)
            payload.append({"evaluation_id": row.id, "kind": "eps-sweep",
                            "points": [{"eps": r.params["eps"], **r.summary()} for r in results]})
            if not as_json:
                shown.print(key_value_table(
                    f"{ev.run.id} · PGD-{steps or 100} ε sweep (black-box / whole set %)",
                    [(f"ε={r.params['eps']:.4g}", f"{r.blackbox_mean:.1f} / {r.whole_set_mean:.1f}") for r in results]))
        if tsne:
            path, row = ev.tsne(limit or 1000)
            payload.append({"evaluation_id": row.id, "kind": "tsne", "png": str(path),
                            "separation": row.extra["separation"],
                            "neighbour_agreement": row.extra["neighbour_agreement"], "chance": row.extra["chance"]})
            if not as_json:
                shown.print(
                    f"gradient t-SNE: {path} (neighbour agreement {row.extra['neighbour_agreement']:.2f}, "
                    f"chance {row.extra['chance']:.2f}; silhouette by model {row.extra['separation']:.2f})")
    if as_json:
        typer.echo(json.dumps({"run": ev.run.id, "split": split, "evaluations": payload}))
    else:
        out.print(f"stored {len(payload)} evaluation(s) for {ev.run.id}; figures in {Path(ev.run.run_dir) / 'figures'}",
                  highlight=False)


@app.command()
@handle_errors
def compare(
    runs: Annotated[list[str], typer.Argument(help="Run ids (or prefixes) to put side by side.")],
    metric: Annotated[str, typer.Option(help="blackbox (Tables 2/3) | whole-set (Table 4).")] = "blackbox",
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Stored evaluations of several runs side by side, laid out like the paper's tables.

    Example: deflect compare RUN_INDEPENDENT RUN_DISJOINT --metric whole-set
    """
    from rich.table import Table

    from deflect.console import stdout_console
    from deflect.report import comparison_rows, comparison_values, latest_per_attack

    if metric not in ("blackbox", "whole-set"):
        fail(f"unknown --metric {metric!r}; choose blackbox or whole-set")
    store = open_store(db)
    records = [store.get_run(r) for r in runs]
    evals = {r.id: latest_per_attack(store.evaluations(r.id), dataset=r.dataset) for r in records}
    header, rows = comparison_rows(records, evals, metric)
    if as_json:  # "rows" as printed, "values" as numbers for jq and notebooks
        typer.echo(json.dumps({"metric": metric, "header": header, "rows": rows, "runs": [r.id for r in records],
                               "values": comparison_values(records, evals, metric)}))
        return
    title = "black-box accuracy (%) mean±std" if metric == "blackbox" else "whole-set accuracy (%)"
    table = Table(title=title, header_style="bold")
    for i, col in enumerate(header):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    stdout_console().print(table)
    if any(cell.endswith("*") for row in rows for cell in row[1:]):
        stdout_console().print("* measured only at other settings than the attack's own (an ε or steps override, "
                               "or CW/EAD from before they sent their last iterate)", highlight=False)


@app.command()
@handle_errors
def export(
    run: Annotated[str, typer.Argument(help="Run id, unique prefix, or 'latest'.")] = "latest",
    fmt: Annotated[str, typer.Option("--format", help="csv | json | md.")] = "md",
    out: Annotated[Path | None, typer.Option(help="Folder for the file and PNG heatmaps (default stdout).")] = None,
    db: DbOption = None,
) -> None:
    """Export a run's stored evaluations (and PNG heatmaps of every matrix).

    Example: deflect export latest --format csv --out results/
    """
    from deflect.report import export_run, heatmap_png

    if fmt not in ("csv", "json", "md"):
        fail(f"unknown --format {fmt!r}; choose csv, json or md")
    if out is not None:
        output_folder(out)
    store = open_store(db)
    record = store.get_run(run)
    evals = store.evaluations(record.id)
    text = export_run(record, evals, fmt)
    if out is None:
        typer.echo(text, nl=False)
        return
    from deflect.checkpoint import atomic_write

    atomic_write(out / f"{record.id}.{fmt}", text.encode())  # a full disk leaves no half-written export
    for ev in evals:
        if ev.kind in ("transfer", "ensemble", "outside") and ev.matrix:  # attack matrices (a sweep's is a table)
            heatmap_png(ev.matrix, out / f"{record.id}-{ev.kind}-{ev.attack}-{ev.id}.png",
                        f"{record.id}: {ev.attack}", row_labels=ev.extra.get("row_labels"))
    typer.echo(str(out / f"{record.id}.{fmt}"))


@app.command()
@handle_errors
def dashboard(db: DbOption = None) -> None:
    """Live dashboard: runs, training curves, transfer matrices, scenario replays and the attacker game
    (q quits, ? keys). It never changes a run; it writes only what you ask for (a PNG, a scenario you run).

    Example: deflect dashboard
    """
    from deflect.tui.app import DeflectApp

    store = open_store(db, create=True)
    store.runs_readonly(), store.worst_blackbox()  # what its first screen reads: a damaged file fails here, in one line
    DeflectApp(store).run()


class _SimDisplay:
    """One Rich display at a time on stderr, switched as `simulate` moves through its phases:
    training the static adversary's model, crafting for the expected figure, then the live rounds."""

    def __init__(self, console: Any, title: str = "") -> None:
        self.console, self.title = console, title
        self.live: Any = None
        self.kind: str | None = None
        self.task: Any = None

    def _switch(self, kind: str, factory: Callable[[], Any]) -> None:
        if self.kind != kind:
            self.close()
            self.live, self.kind, self.task = factory(), kind, None
            self.live.start()

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
        self.live, self.kind, self.task = None, None, None

    def phase(self, text: str) -> None:
        self.close()
        self.console.print(f"[dim]{self.title}{text}[/]")

    def progress(self, done: int, total: int) -> None:
        from deflect.console import work_progress

        self._switch("work", lambda: work_progress(self.console))
        if self.task is None:
            self.task = self.live.add_task("crafting", total=total, rate="")
        self.live.update(self.task, completed=done, total=total)

    def batch(self, event: Any) -> None:
        from deflect.console import training_progress

        self._switch("train", lambda: training_progress(self.console))
        if self.task is None:
            self.task = self.live.add_task("train", total=event.batches * event.epochs, epoch="", losses="", rate="")
        self.live.update(self.task, advance=1, epoch=f"static model {event.epoch}/{event.epochs}",
                         losses=f"L {event.losses['total']:.3f}", rate=f"{event.images_per_s:.0f} img/s")

    def round(self, played: Any, result: Any) -> None:
        from rich.live import Live

        if not self.console.is_terminal:  # no live table off a terminal (2> log): a line per round, as train's epochs
            rounds = (result.scenario or {}).get("rounds")
            rotated = "; ".join(f"m{e['retired']}→m{e['released']}" for e in played.rotations)
            self.console.print(f"{self.title}round {played.round}{f'/{rounds}' if rounds else ''}: sent {played.sent}, "
                               f"void {played.void}, hit {played.succeeded}, deflected {played.deflected} "
                               f"({_pct(played.rate)}%); total {_rate_ci(result)}"
                               f"{f'; rotated {rotated}' if rotated else ''}", highlight=False)
            return
        table = _rounds_table(result)
        self._switch("rounds", lambda: Live(table, console=self.console, transient=True, auto_refresh=False))
        self.live.update(table, refresh=True)

    def callbacks(self) -> Any:
        from deflect.simulate import SimCallbacks
        from deflect.train import Callbacks

        return SimCallbacks(on_phase=self.phase, on_progress=self.progress, on_round=self.round,
                            training=Callbacks(on_batch=self.batch))


def _pct(value: float | None) -> str:
    return "-" if value is None or value != value else f"{100 * value:.1f}"


def _rate_ci(result: Any) -> str:
    lo, hi = result.ci
    return f"{_pct(result.rate)}% [{_pct(lo)}, {_pct(hi)}]"


def _rounds_table(result: Any) -> Any:
    """Per-round outcomes and the running total: the live display and the final report."""
    from rich.table import Table

    from deflect.simulate import wilson_interval

    owned = ", ".join(f"m{i}" for i in result.owned)
    who = f"{result.adversary} (owns {owned})" if owned else f"{result.adversary} (own outside model)"
    staged = any(r.rotations or len(r.released) < result.n_models for r in result.rounds)
    table = Table(title=f"{result.run_id} · {who} · {result.attack}", header_style="bold")
    cols = ["round", *(["deployed"] if staged else []), "sent", "void", "hit", "deflected", "deflection % [95% CI]",
            "expected %", *(["rotated after"] if staged else [])]
    for col in cols:
        table.add_column(col, justify="left" if col in ("deployed", "rotated after") else "right")
    for r in result.rounds:
        lo, hi = wilson_interval(r.deflected, r.counted)
        deployed = [" ".join(f"m{i}" for i in r.released)] if staged else []
        rot = ["; ".join(f"m{e['retired']}→m{e['released']}" for e in r.rotations)] if staged else []
        table.add_row(str(r.round), *deployed, str(r.sent), str(r.void), str(r.succeeded), str(r.deflected),
                      f"{_pct(r.rate)} [{_pct(lo)}, {_pct(hi)}]", _pct(r.expected_rate), *rot)
    table.add_section()
    table.add_row("total", *([""] if staged else []), str(result.sent), str(result.void), str(result.succeeded),
                  str(result.deflected), _rate_ci(result).replace("%", ""), _pct(result.expected_rate),
                  *([""] if staged else []), style="bold")
    return table


def _simulation_summary(result: Any) -> str:
    hits = " · ".join(f"m{i} {h}/{s}" for i, (h, s) in enumerate(zip(result.hits, result.sent_to, strict=True)))
    about = result.scenario or {}
    lines = [f"scenario {about['name']}" + (f": {about['description']}" if about.get("description") else "")
             ] if about.get("name") else []
    lines += [
        f"deflection rate {_rate_ci(result)} (Wilson 95% CI) · expected {_pct(result.expected_rate)}% "
        f"from {result.expected_source}",
        f"attacks sent {result.sent}: counted {result.counted} (succeeded {result.succeeded}, deflected "
        f"{result.deflected}), void {result.void} (victim wrong on the clean image)",
        f"successful attacks / attacks received per model: {hits}",
    ]
    if result.owned and all(set(rd.released) <= set(result.owned) for rd in result.rounds):
        lines.append("the attacker owns every deployed model: each attack met a model it was crafted on, so these "
                     "are the ensemble attack's failures, not deflections by random deployment")
    for e in result.rotations:
        lines.append(f"after round {e['round']}: m{e['retired']} retired after {e['hits']} observed successes, "
                     f"m{e['released']} released to its clients")
    if getattr(result, "pool_of", None):
        pool = " ".join(f"m{i}" for i in result.pool_models)
        lines.append(f"pool of {result.pool_of}: {pool} (run {result.run_id}), released after the set's own models")
    if result.static_run:
        lines.append(f"static adversary's model: {result.static_run} (model 0)")
    if result.simulation_id is not None:
        lines.append(f"stored as simulation {result.simulation_id} of run {result.run_id}")
    return "\n".join(lines)


@app.command()
@handle_errors
def simulate(
    adversary: Annotated[str | None, typer.Option(help="static | skilled | oracle (paper §3).")] = None,
    k: Annotated[int | None, typer.Option("--k", help="Models the oracle owns and ensembles (default 2).")] = None,
    run: Annotated[str | None, typer.Option(help="Run id or prefix (default: latest finished disjoint run).")] = None,
    attack: Annotated[str | None, typer.Option(
        help="Any attack of deflect evaluate --attack (default: pgd1 static, mifgsm2 skilled, pgd2 oracle; "
             "cw2: high-confidence).")] = None,
    clients: Annotated[int | None, typer.Option(help="Number of clients (default 1000).")] = None,
    rounds: Annotated[int | None, typer.Option(help="Rounds of attacks (default 10).")] = None,
    per_round: Annotated[int | None, typer.Option(help="Attacks sent per round (default 100).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of images, victims and owned models (default 0).")] = None,
    limit: Annotated[int | None, typer.Option(help="Draw from a seeded subset of N test images.")] = None,
    scenario: Annotated[Path | None, typer.Option(
        help="Scenario TOML (scenarios/NAME.toml, or a shipped NAME); flags override its values.")] = None,
    key: Annotated[Path | None, typer.Option(
        envvar="DEFLECT_KEY_FILE", help="Deployment key file (default: deflect.key beside the database).",
        show_default=False)] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Attack a randomly deployed set as the paper's static, skilled or oracle adversary; count deflections.

    Example: deflect simulate --adversary oracle --k 2 ; deflect simulate --scenario zero-day
    (a shipped scenario by name, or the path of your own .toml)
    """

    from deflect.console import err_console, stdout_console
    from deflect.scenario import Scenario, load_scenario, with_overrides
    from deflect.simulate import simulate as run_simulation

    base = load_scenario(scenario) if scenario is not None else Scenario()
    sc = with_overrides(base, adversary=adversary, k=k, run=run, attack=attack, clients=clients, rounds=rounds,
                        per_round=per_round, seed=seed, limit=limit)
    store = open_store(db)
    store.check_writable()
    if sc.run is not None:
        warn_unfinished(store.get_run(sc.run))
    display = _SimDisplay(err_console)
    try:
        result = run_simulation(store, sc, key_path=key, device=device, callbacks=display.callbacks())
    finally:
        display.close()
    if as_json:
        typer.echo(json.dumps(result.to_dict()))
        return
    out = stdout_console()
    out.print(_rounds_table(result))
    out.print(_simulation_summary(result), highlight=False)


@app.command()
@handle_errors
def demo(
    n: Annotated[int, typer.Option("--n", help="Models per set.")] = 3,
    attack: Annotated[str, typer.Option(help="Attack for the transfer comparison.")] = "pgd1",
    clients: Annotated[int, typer.Option(help="Clients in each simulation.")] = 1000,
    rounds: Annotated[int, typer.Option(help="Rounds of 100 attacks in each simulation.")] = 10,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """The whole pipeline on the embedded digits set in a few CPU minutes.

    Trains an independent and a disjoint set, evaluates PGD transfer, plays the static, skilled and
    oracle (k=2) adversaries against both, and prints a side-by-side summary.

    Example: deflect demo
    """
    from rich.table import Table

    from deflect.config import make_config
    from deflect.console import err_console, stdout_console, training_progress
    from deflect.pipeline import RunEvaluator, parse_attacks
    from deflect.scenario import Scenario, with_overrides
    from deflect.simulate import simulate as run_simulation
    from deflect.train import Callbacks
    from deflect.train import train as run_training

    if n < 2:
        fail(f"--n must be at least 2, got {n}")
    parse_attacks(attack, False)
    make_config(n=n, dataset="digits")  # every value checked before any work
    with_overrides(Scenario(), adversary="static", clients=clients, rounds=rounds)
    store = open_store(db, create=True)
    ids: dict[str, str] = {}
    for method in ("independent", "disjoint"):
        cfg = make_config(n=n, dataset="digits", method=method)
        with training_progress(err_console) as progress:
            task: dict[str, Any] = {}

            def on_batch(event: Any, task: dict[str, Any] = task, progress: Any = progress,
                         method: str = method) -> None:
                if "id" not in task:
                    task["id"] = progress.add_task(method, total=event.batches * event.epochs, epoch="",
                                                   losses="", rate="")
                progress.update(task["id"], advance=1, epoch=f"{method} {event.epoch}/{event.epochs}",
                                losses=f"L {event.losses['total']:.3f}", rate=f"{event.images_per_s:.0f} img/s")

            ids[method] = run_training(cfg, store, Callbacks(on_batch=on_batch))
    transfer = {}
    for method, run_id in ids.items():
        err_console.print(f"[dim]{method}: {attack} transfer matrix[/]")
        transfer[method], _ = RunEvaluator(store, run_id).transfer(attack)
    adversaries = ("static", "skilled", "oracle")
    sims: dict[str, dict[str, Any]] = {}
    for method, run_id in ids.items():
        for adversary in adversaries:
            sc = with_overrides(Scenario(name=f"demo-{adversary}"), adversary=adversary, run=run_id,
                                clients=clients, rounds=rounds)
            display = _SimDisplay(err_console, title=f"{method} · {adversary}: ")
            try:
                sims.setdefault(method, {})[adversary] = run_simulation(store, sc, callbacks=display.callbacks())
            finally:
                display.close()
    if as_json:
        typer.echo(json.dumps({"runs": ids, "transfer": {m: r.to_dict() for m, r in transfer.items()},
                               "simulations": {m: {a: s.to_dict() for a, s in per.items()}
                                               for m, per in sims.items()}}))
        return
    out = stdout_console()
    table = Table(title=f"digits, n={n}: deflection rate % [95% CI] (expected from transfer matrices)",
                  header_style="bold")
    for col in ("set", "clean %", f"{attack} black-box acc. %", "static", "skilled", "oracle k=2"):
        table.add_column(col, justify="left" if col == "set" else "right")
    for method, res in transfer.items():
        cells = [f"{_rate_ci(s)} ({_pct(s.expected_rate)})" for s in sims[method].values()]
        table.add_row(method, f"{sum(res.clean) / len(res.clean):.1f}", f"{res.blackbox_mean:.1f}", *cells)
    out.print(table)
    out.print(f"attacks: static {sims['disjoint']['static'].attack} on its own model, skilled "
              f"{sims['disjoint']['skilled'].attack} on one model of the set, oracle "
              f"{sims['disjoint']['oracle'].attack} on 2 models' averaged logits; {rounds * 100} attacks per "
              f"adversary, each sent to one random client of {clients}", highlight=False)
    out.print(f"runs: {ids['independent']} {ids['disjoint']} (see 'deflect runs', 'deflect compare', "
              f"'deflect simulate --run RUN --adversary ...')", highlight=False)


@app.command()
@handle_errors
def reproduce(
    preset: Annotated[str, typer.Option(help="fashion-mnist | digits | paper-cifar10 (GPU).")] = "fashion-mnist",
    quick: Annotated[bool, typer.Option(
        "--quick", help="n=3 sets and one grown model, 20k training images, 3 epochs.")] = False,
    out: Annotated[Path, typer.Option(help="Folder for the Markdown report and its figures.")] = Path("results"),
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    data_dir: Annotated[Path | None, typer.Option(help="Dataset root for torchvision datasets.")] = None,
    db: DbOption = None,
    jobs: Annotated[int, typer.Option(
        help="Sets trained at once, in worker processes sharing the CPU threads (2 on a 2-core CPU: "
             "one thread each).")] = 1,
    report_only: Annotated[bool, typer.Option(
        "--report-only", help="Write the report from what is stored, training and evaluating nothing "
                              "(sets not finished are listed as pending).")] = False,
    width: Annotated[int | None, typer.Option(
        help="Small CNN width of every set (default: the preset's); the report is <dataset>[-quick]-w<W>.md.")] = None,
) -> None:
    """Train the comparison sets, evaluate them and write results/<dataset>[-quick].md; resumes if stopped.

    Example: deflect reproduce --preset fashion-mnist --quick
    """
    from deflect.console import err_console, training_progress
    from deflect.jobs import check_jobs
    from deflect.reproduce import make_plan
    from deflect.reproduce import reproduce as run_reproduction
    from deflect.train import Callbacks, resolve_device

    make_plan(preset, quick, width)  # an unknown preset or width, device or data folder: refused before
    if not report_only:  # a folder, a database or a line of work exists (a report alone uses neither)
        resolve_device(device)
        if data_dir is not None and not data_dir.is_dir():
            fail(f"--data-dir {data_dir} is not a folder")
    check_jobs(jobs)
    output_folder(out)
    store = open_store(db, create=True)
    progress = training_progress(err_console)
    bars: dict[str, Callbacks] = {}

    def callbacks_for(label: str) -> Callbacks:
        """Each set its own bar (a fresh one whenever a training of it starts), named when sets run side by side."""
        if label not in bars:
            state: dict[str, Any] = {}
            bars[label] = Callbacks(on_start=lambda run, first_epoch: state.pop("id", None),
                                    on_batch=_training_bar(progress, state, label if jobs > 1 else ""))
        return bars[label]

    try:
        with progress:
            path = run_reproduction(store, preset, quick=quick, out=out, device=device,
                                    data_dir=str(data_dir) if data_dir else None, jobs=jobs,
                                    report_only=report_only, width=width,
                                    callbacks_for=callbacks_for,
                                    say=lambda text: progress.console.print(f"[bold]reproduce[/] {text}"))
    except KeyboardInterrupt:
        interrupted("run the same command again to continue")
    typer.echo(str(path))


@app.command()
@handle_errors
def bench(
    ctx: typer.Context,
    quick: Annotated[bool, typer.Option("--quick", help=(
        "Fewer figures, small models and batches: a smoke check in seconds (a --preset keeps its model; "
        "on a CPU its batch drops to 16)."))] = False,
    steps: Annotated[int | None, typer.Option(
        help="Timed steps per figure after one warm-up (default: 3 on CPU, 10 on CUDA).")] = None,
    time_to_quality: Annotated[bool, typer.Option(
        "--time-to-quality", help="Train the faithful and the fast recipe until each clears the val bar.")] = False,
    preset: Annotated[str | None, typer.Option(
        help="Time this preset's model, batch and image shape (e.g. paper-cifar10) on synthetic images.")] = None,
    dataset: Annotated[str, typer.Option(help="--time-to-quality: dataset.")] = "fashion-mnist",
    epochs: Annotated[int, typer.Option(help="--time-to-quality: the faithful recipe's epochs.")] = 8,
    fast_epochs: Annotated[int | None, typer.Option(
        help="--time-to-quality: the fast recipe's epochs (default: --epochs).")] = None,
    limit: Annotated[int | None, typer.Option(help="--time-to-quality: training images.")] = 20000,
    clean_bar: Annotated[float, typer.Option(help="--time-to-quality: clean % every model must reach.")] = 88.5,
    blackbox_bar: Annotated[float, typer.Option(help="--time-to-quality: PGD black-box accuracy % to reach.")] = 88.0,
    data_dir: Annotated[Path | None, typer.Option(help="--time-to-quality: dataset root (as for train).")] = None,
    width: Annotated[int | None, typer.Option(
        help="Small-CNN width (default: 16 for the step figures, 32 for --time-to-quality).")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    as_json: JsonOption = False,
) -> None:
    """Time training steps and a transfer matrix here, with ratios against in-process baselines.

    Example: deflect bench ; deflect bench --quick --json ; deflect bench --preset paper-cifar10
    """
    from rich.table import Table

    from deflect.bench import default_settings, run_bench
    from deflect.config import make_config, preset_dataset
    from deflect.console import err_console, stdout_console, work_progress
    from deflect.train import resolve_device

    typed = typed_options(ctx)
    ttq_only = [name for name in ("dataset", "epochs", "fast_epochs", "limit", "clean_bar", "blackbox_bar", "data_dir")
                if name in typed]
    if ttq_only and not time_to_quality:
        fail(only_apply(ttq_only, "with --time-to-quality"))
    if time_to_quality:
        from deflect.bench import TTQ_WIDTH, QualityBar
        from deflect.bench import time_to_quality as ttq

        for name, bar in (("--clean-bar", clean_bar), ("--blackbox-bar", blackbox_bar)):
            if not (math.isfinite(bar) and 0 <= bar <= 100):  # a bar never met trains the whole schedule for nothing
                fail(f"{name} must be an accuracy in [0, 100], got {bar}")
        if epochs < 1:
            fail(f"--epochs must be at least 1, got {epochs}")
        if fast_epochs is not None and fast_epochs < 1:
            fail(f"--fast-epochs must be at least 1, got {fast_epochs}")
        from deflect.console import training_progress

        bars: dict[str, Callable[[Any], None]] = {}
        with training_progress(err_console) as progress:  # one bar per recipe, a line per epoch's check

            def on_batch(recipe: str, event: Any) -> None:
                bars.setdefault(recipe, _training_bar(progress, {}, recipe))(event)

            report = ttq(dataset, epochs=epochs, train_limit=limit, bar=QualityBar(clean_bar, blackbox_bar),
                         device=str(resolve_device(device)),
                         progress=lambda text: progress.console.print(text, highlight=False),
                         data_dir=str(data_dir) if data_dir else None, width=TTQ_WIDTH if width is None else width,
                         fast_epochs=fast_epochs, on_batch=on_batch)
        if as_json:
            typer.echo(json.dumps(report))
            return
        for name in ("faithful", "fast"):
            trace = report[name]
            when = (f"cleared the bar at epoch {trace['reached_epoch']} after {trace['reached_at']:.0f} s of training"
                    if trace["reached_at"] is not None else f"did not clear the bar in {len(trace['epochs'])} epochs")
            typer.echo(f"{name}: {when}")
        ratio = report["time_to_quality_ratio"]
        typer.echo(f"time_to_quality_ratio: {ratio:.2f}" if ratio is not None else "time_to_quality_ratio: -")
        return
    settings = default_settings(str(resolve_device(device)), preset)
    arch = make_config(3, preset_dataset(preset), preset).arch if preset is not None else "cnn"
    resnet_on_cpu = arch != "cnn" and str(resolve_device(device)) == "cpu"
    if quick:  # a preset keeps its own model and image shape; a ResNet's batch on a CPU (a smoke check, not a
        # figure) drops to 16: its step at batch 128 takes minutes there
        small = ({"width": 8, "batch_size": 64} if preset is None
                 else {"batch_size": min(settings.batch_size, 16)} if resnet_on_cpu else {})
        settings = dataclasses.replace(settings, ns=(3,), steps=1, matrix_images=32 if resnet_on_cpu else 128,
                                       matrix_repeats=1, **small)
    if width is not None:
        if preset is not None:
            fail("--width sets the small CNN's width; --preset times the preset's own model")
        if width < 1:
            fail(f"--width must be at least 1, got {width}")
        settings = dataclasses.replace(settings, width=width)
    if steps is not None:
        if steps < 1:
            fail(f"--steps must be at least 1, got {steps}")
        settings = dataclasses.replace(settings, steps=steps)
    if resnet_on_cpu:
        err_console.print(f"deflect: warning: --preset {preset} times a {arch} on the CPU: each of its "
                          "figures takes minutes here (--quick too); the preset's figures are meant for a GPU",
                          highlight=False, markup=False)
    phases = len(settings.ns) + 3
    progress = work_progress(err_console)
    with progress:
        task = progress.add_task("starting", total=phases, rate="")

        def on_phase(text: str) -> None:
            started = progress.tasks[0].description != "starting"
            progress.update(task, advance=1 if started else 0, description=text)
            if not err_console.is_terminal:  # a log file sees each phase begin, not nothing until the end
                err_console.print(f"bench: {text}", highlight=False, markup=False)

        result = run_bench(settings, on_phase)
        progress.update(task, completed=phases)
    if as_json:
        typer.echo(json.dumps(result.to_dict()))
        return
    model = (f"preset {settings.preset}" if settings.preset
             else f"batch {settings.batch_size}, width {settings.width}")
    table = Table(title=f"steps/s, and seconds per epoch in brackets ({result.device}, {result.threads} threads, "
                        f"{model})")
    table.add_column("n")
    recipes = list(next(iter(result.steps_per_s.values())))
    for name in recipes:
        table.add_column(name, justify="right")
    for n, rates in result.steps_per_s.items():
        epoch = result.epoch_seconds.get(n, {})
        table.add_row(n, *(f"{rates[r]:.2f} ({epoch[r]:.0f})" if r in epoch else f"{rates[r]:.2f}"
                           for r in recipes))
    console = stdout_console()
    console.print(table)
    grown = result.grow_steps_per_s.items()
    console.print("growing one model (steps/s): " + "  ".join(f"{k} {v:.2f}" for k, v in grown))
    console.print("reference step by phase (s): " + "  ".join(f"{k} {v:.3f}" for k, v in result.phases.items()))
    console.print("transfer matrix (images/s): " + "  ".join(f"{k} {v:.1f}" for k, v in result.matrix.items()))
    console.print("ratios: " + "  ".join(f"{k} {v:.2f}" for k, v in result.ratios.items()))
    console.print(f"peak memory: {result.peak_memory_mb:.0f} MiB")


def _reflow_help() -> None:
    """Join each help paragraph's source lines: Typer's rich help keeps a docstring's line breaks,
    so a long source line wrapped at the terminal's width left ragged lines under it."""
    for info in app.registered_commands:
        doc = inspect.getdoc(info.callback) if info.help is None and info.callback else None
        if doc:
            info.help = "\n\n".join(" ".join(p.split("\n")) for p in doc.split("\n\n"))


_reflow_help()


def main() -> None:
    """Console-script entry point. Command-line mistakes (an unknown option, a value that is not a
    number) are one line on stderr and exit code 2, like every other error, not a boxed panel."""
    try:  # Typer 0.29 carries its own copy of click
        from typer._click import exceptions as cx
    except ImportError:  # pragma: no cover - a Typer that uses click itself
        from click import exceptions as cx  # type: ignore[no-redef]

    try:
        code = app(standalone_mode=False)
    except cx.NoArgsIsHelpError as exc:  # `deflect` alone: its help
        typer.echo(exc.ctx.get_help() if exc.ctx else str(exc))
        sys.exit(2)
    except cx.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx else "deflect"
        typer.echo(f"deflect: error: {exc.format_message()} (see '{command} --help')", err=True)
        sys.exit(2)
    except typer.Abort:  # end of input at a prompt
        interrupted_line()
        sys.exit(INTERRUPTED)
    except DeflectError as exc:  # raised outside a command (e.g. while parsing)
        typer.echo(f"deflect: error: {exc}", err=True)
        sys.exit(2)
    if code == INTERRUPTED and not _interrupt_reported:
        interrupted_line()  # Typer ends a Ctrl-C that lands outside a command's body with a silent 130
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
