"""Scenario replay: pick a stored simulation (or run a scenario file), then watch it attack by attack.

The client grid shows who holds which model, each attack lands on its client as fooled (✗),
deflected (✓) or void (·); the gauge keeps the running deflection rate with its Wilson interval;
per-model hit counts and the staged-release log show when the defender rotates a model out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.markup import escape
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, OptionList, Static
from textual.widgets.option_list import Option
from textual.worker import get_current_worker

from deflect.replay import Replay
from deflect.tui.widgets.clients import ClientGrid, legend
from deflect.tui.widgets.gauge import DeflectionGauge
from deflect.tui.widgets.titlebar import TitleBar

SPEEDS = (1, 2, 5, 10, 25, 50)  # attacks per tick
TICK = 0.1  # seconds
GRID_COLUMNS, GRID_ROWS = 36, 6


@dataclass(frozen=True)
class Choice:
    """Something to replay: a stored simulation or a scenario file to run now."""

    label: str
    simulation_id: int | None = None
    path: Path | None = None


def scenario_files() -> list[Path]:
    """Scenario files in ./scenarios and the shipped ones, each once."""
    from deflect.scenario import SHIPPED

    seen: dict[Path, Path] = {}
    for folder in (Path.cwd() / "scenarios", SHIPPED):
        if folder.is_dir():
            for path in sorted(folder.glob("*.toml")):
                seen.setdefault(path.resolve(), path)
    return list(seen.values())


def cancellable(callbacks: Any, cancelled: Callable[[], bool]) -> Any:
    """`callbacks` (a `SimCallbacks`) that stop the simulation once `cancelled()` holds.

    A simulation spends its time crafting (and, on first use, training the static adversary's
    model), not between rounds: checking only at each round would let a screen that was left, or
    a dashboard that was quit, go on working for minutes. Crafting progress and every training
    batch check too, and raise KeyboardInterrupt, which the simulation and training treat as Ctrl-C.
    """
    from deflect.train.runner import Callbacks

    def check() -> None:
        if cancelled():
            raise KeyboardInterrupt

    def wrap(hook: Callable[..., None] | None) -> Callable[..., None]:
        def checked(*args: Any) -> None:
            check()
            if hook is not None:
                hook(*args)
        return checked

    training = callbacks.training or Callbacks()
    return dataclasses.replace(
        callbacks, on_round=wrap(callbacks.on_round), on_progress=wrap(callbacks.on_progress),
        training=dataclasses.replace(training, on_batch=wrap(training.on_batch)))


def load_choices(store: Any) -> list[Choice]:
    choices = []
    for sim in reversed(store.simulations()):
        rate = f"{100 * sim.deflection_rate:.1f} %" if sim.deflection_rate is not None else "-"
        name = f" · {sim.scenario}" if sim.scenario else ""
        choices.append(Choice(f"simulation {sim.id} · {sim.run_id} · {sim.adversary} k={sim.k}{name} · "
                              f"{sim.attack} · deflected {rate}", simulation_id=sim.id))
    for path in scenario_files():
        choices.append(Choice(f"run scenario {path.name} (stores a new simulation)", path=path))
    return choices


class ReplayScreen(Screen):
    BINDINGS = [
        Binding("escape", "back", "Back"),
        Binding("space", "toggle", "Play/pause"),
        Binding("n", "step", "Step"),
        Binding("r", "round", "Next round"),
        Binding("plus,equals_sign", "speed(1)", "Faster", key_display="+"),
        Binding("minus", "speed(-1)", "Slower", key_display="-"),
    ]

    @dataclass
    class Choices(Message):
        choices: list[Choice]
        error: str | None = None

    @dataclass
    class Loaded(Message):
        """A stored simulation, or the first (or next) round of a scenario being run."""

        title: str
        n_models: int
        rounds: list[dict[str, Any]]
        params: dict[str, Any]
        append: bool = False

    @dataclass
    class Phase(Message):
        text: str
        error: bool = False

    def __init__(self, simulation_id: int | None = None) -> None:
        super().__init__()
        self.initial = simulation_id
        self.choices: list[Choice] = []
        self.replay: Replay | None = None
        self.autoplay = True  # a chosen replay starts playing at once
        self.playing = True
        self.speed = 2
        self.marks: dict[int, int] = {}
        self.marks_round = 0
        self.title_text = ""
        self.phase = ""
        self.rounds_total: int | None = None  # a scenario being run: its rounds, before they arrive

    def compose(self) -> ComposeResult:
        yield TitleBar(str(self.app.store.path))  # type: ignore[attr-defined]
        with Vertical(id="replay-pick"):
            yield Static("[b]Replay a simulation[/] · choose one (enter); scenario files run first", id="pick-title")
            yield OptionList(id="replay-choices")
        with VerticalScroll(id="replay-view"):  # scrolls on a terminal too short for grid and gauge
            yield Static("", id="replay-title")
            yield Static("", id="replay-legend")
            yield ClientGrid(GRID_COLUMNS, id="replay-grid")
            yield DeflectionGauge("", id="replay-gauge")
            yield Static("", id="replay-hits")
            yield Static("", id="replay-log")
        yield Footer(compact=True)

    PLAYBACK = ("toggle", "step", "round", "speed")

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """The playback keys only while a replay is on screen (the footer hides them in the list)."""
        return self.replay is not None if action in self.PLAYBACK else True

    def on_mount(self) -> None:
        self.query_one("#replay-view").display = False
        self.load_list()
        self.set_interval(TICK, self.tick)

    # choosing ---------------------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="replay-list")
    def load_list(self) -> None:
        try:
            choices = load_choices(self.app.store)  # type: ignore[attr-defined]
        except Exception as exc:  # a locked or broken database
            self.post_message(self.Choices([], str(exc).splitlines()[0]))
            return
        self.post_message(self.Choices(choices))

    def on_replay_screen_choices(self, message: Choices) -> None:
        self.query_one(TitleBar).show_error(message.error)
        self.choices = message.choices
        options = self.query_one("#replay-choices", OptionList)
        options.clear_options()
        if not self.choices:
            options.add_option(Option("nothing to replay: run 'deflect simulate' first", disabled=True))
        for i, choice in enumerate(self.choices):
            options.add_option(Option(escape(choice.label), id=str(i)))
        if self.choices:
            options.highlighted = 0
            options.focus()
        if self.initial is not None:
            wanted = next((c for c in self.choices if c.simulation_id == self.initial), None)
            self.initial = None
            if wanted:
                self.start(wanted)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        if event.option.id is not None:
            self.start(self.choices[int(event.option.id)])

    def start(self, choice: Choice) -> None:
        self.replay, self.marks, self.marks_round, self.playing, self.phase = None, {}, 0, self.autoplay, ""
        self.rounds_total = None
        self.refresh_bindings()
        self.query_one("#replay-pick").display = False
        self.query_one("#replay-view").display = True
        self.query_one("#replay-title", Static).update(f"loading {escape(choice.label)} …")
        if choice.simulation_id is not None:
            self.load_simulation(choice.simulation_id)
        else:
            assert choice.path is not None
            self.run_scenario(choice.path)

    @work(thread=True, exclusive=True, group="replay-load")
    def load_simulation(self, simulation_id: int) -> None:
        store = self.app.store  # type: ignore[attr-defined]
        try:
            sim = next(s for s in store.simulations() if s.id == simulation_id)
            run = store.run_readonly(sim.run_id)
        except Exception as exc:
            self.post_message(self.Phase(f"cannot read simulation {simulation_id}: {exc}", error=True))
            return
        n = run.n if run else len((sim.rounds or [{}])[0].get("hits") or [])
        title = (f"simulation {sim.id} · {sim.run_id} · {sim.adversary} adversary, k={sim.k} · {sim.attack}"
                 f"{' · ' + sim.scenario if sim.scenario else ''}")
        self.post_message(self.Loaded(title, n, list(sim.rounds or []), dict(sim.params or {})))

    @work(thread=True, exclusive=True, group="replay-run")
    def run_scenario(self, path: Path) -> None:
        """Play the scenario now (as `deflect simulate --scenario` would) and stream its rounds in."""
        from deflect.scenario import load_scenario
        from deflect.simulate import SimCallbacks, simulate

        worker = get_current_worker()
        first = {"sent": False}
        total: dict[str, int] = {}

        def on_round(rnd: Any, result: Any) -> None:
            title = f"{path.name} · {result.run_id} · {result.adversary} adversary, k={result.k} · {result.attack}"
            self.post_message(self.Loaded(title, result.n_models, [rnd.to_dict()],
                                          {"client_slots": result.client_slots, "rounds_total": total["rounds"]},
                                          append=first["sent"]))
            first["sent"] = True

        def on_phase(text: str) -> None:
            self.post_message(self.Phase(text))

        try:
            scenario = load_scenario(path)
            total["rounds"] = scenario.rounds
            result = simulate(self.app.store, scenario,  # type: ignore[attr-defined]
                              callbacks=cancellable(SimCallbacks(on_phase=on_phase, on_round=on_round),
                                                    lambda: worker.is_cancelled))
        except KeyboardInterrupt:
            return
        except Exception as exc:  # a bad scenario or no run to play against: say so on the screen
            self.post_message(self.Phase(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, error=True))
            return
        self.post_message(self.Phase(f"stored as simulation {result.simulation_id}"))

    def on_replay_screen_phase(self, message: Phase) -> None:
        self.phase = f"[red]{escape(message.text)}[/]" if message.error else escape(message.text)
        self.render_replay()

    def on_replay_screen_loaded(self, message: Loaded) -> None:
        if message.append and self.replay is not None:
            for rnd in message.rounds:
                self.replay.add_round(rnd)
        else:
            self.replay = Replay.from_simulation(message.n_models, message.rounds, message.params)
            self.title_text = message.title
            self.rounds_total = message.params.get("rounds_total")
            self.refresh_bindings()
        self.render_replay()

    # playing ------------------------------------------------------------------------------------
    def tick(self) -> None:
        if self.replay is None or not self.playing or self.replay.done:
            return
        for _ in range(SPEEDS[self.speed]):
            if not self.advance():
                break
        self.render_replay()

    def advance(self) -> bool:
        """One attack; a round's marks stay on the grid until the next round starts."""
        assert self.replay is not None
        event = self.replay.step()
        if event is None:
            return False
        if event.round != self.marks_round:
            self.marks, self.marks_round = {}, event.round
        if event.client is not None and event.outcome is not None:
            self.marks[event.client] = event.outcome
        return True

    def action_toggle(self) -> None:
        self.playing = not self.playing
        self.render_replay()

    def action_step(self) -> None:
        if self.replay is not None:
            self.playing = False
            self.advance()
            self.render_replay()

    def action_round(self) -> None:
        if self.replay is None:
            return
        self.playing = False
        start = self.replay.round_index
        while not self.replay.done and self.replay.round_index == start:
            self.advance()
        self.render_replay()

    def action_speed(self, step: int) -> None:
        self.speed = max(0, min(len(SPEEDS) - 1, self.speed + step))
        self.render_replay()

    def action_back(self) -> None:
        if self.query_one("#replay-view").display and self.choices:
            self.workers.cancel_group(self, "replay-run")
            self.replay = None
            self.refresh_bindings()
            self.query_one("#replay-view").display = False
            self.query_one("#replay-pick").display = True
            self.load_list()
            return
        self.workers.cancel_group(self, "replay-run")
        self.app.pop_screen()

    def render_replay(self) -> None:
        replay = self.replay
        title = self.query_one("#replay-title", Static)
        if replay is None:
            title.update(self.phase or "waiting for the first round …")
            return
        state = "playing" if self.playing and not replay.done else "paused" if not replay.done else "finished"
        rounds = f"round {replay.round_number}/{self.rounds_total or len(replay.rounds)}"
        title.update(f"[b]{escape(self.title_text)}[/]\n{rounds} · {replay.sent} sent · {state} · "
                     f"{SPEEDS[self.speed]} attacks/tick" + (f" · {self.phase}" if self.phase else ""))
        shown = min(len(replay.client_slots), GRID_COLUMNS * GRID_ROWS)
        models = [replay.client_model(c) for c in range(shown)]
        self.query_one("#replay-legend", Static).update(legend(replay.n_models, sorted(set(replay.released))))
        grid = self.query_one("#replay-grid", ClientGrid)
        if shown:
            grid.show(models, {c: o for c, o in self.marks.items() if c < shown})
        else:
            grid.update("[dim]no per-client record in this simulation: replaying round totals[/]")
        lo, hi = replay.interval
        self.query_one("#replay-gauge", DeflectionGauge).show(replay.rate, lo, hi, replay.counted)
        hits = "  ".join(f"m{v} {h}" for v, h in enumerate(replay.hits))
        self.query_one("#replay-hits", Static).update(
            f"successful attacks per model: {hits}   · void {replay.void}   · released {replay.released}")
        log = replay.log[-2:] or ["no model rotated yet"]
        self.query_one("#replay-log", Static).update("\n".join(f"[yellow]staged release[/] {escape(line)}"
                                                               if "retired" in line else line for line in log))
