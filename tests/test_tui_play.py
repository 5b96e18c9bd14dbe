"""The dashboard's replay and attacker-game screens, driven by key presses at 80x24."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from textual.pilot import Pilot
from textual.widgets import OptionList, Static

from deflect.data import load_dataset
from deflect.evaluate import select_subset, transfer_matrix
from deflect.pipeline import store_transfer
from deflect.sets import load_set
from deflect.simulate import DEFLECTED, SUCCEEDED, VOID
from deflect.store import Evaluation, Run, Simulation, Store
from deflect.train import train
from deflect.tui.app import DeflectApp
from deflect.tui.screens.game import GameScreen
from deflect.tui.screens.help import HelpScreen
from deflect.tui.screens.replay import ReplayScreen
from deflect.tui.widgets.clients import ClientGrid
from deflect.tui.widgets.gauge import DeflectionGauge
from tests.conftest import tiny_config
from tests.test_tui import SIZE, text_of, until

ROUNDS = [
    {"round": 1, "released": [0, 1], "sent": 4, "void": 1, "deflected": 1, "succeeded": 2, "hits": [2, 0, 0],
     "attacks": [[0, 0, SUCCEEDED], [1, 1, DEFLECTED], [2, 0, SUCCEEDED], [3, 1, VOID]],
     "rotations": [{"slot": 0, "retired": 0, "released": 2, "hits": 2}]},
    {"round": 2, "released": [2, 1], "sent": 2, "void": 0, "deflected": 2, "succeeded": 0, "hits": [0, 0, 0],
     "attacks": [[0, 2, DEFLECTED], [2, 2, DEFLECTED]], "rotations": []},
]


def add_simulation(store: Store, tmp_path: Path) -> int:
    store.add_run(Run(id="digits-disjoint-n3-aaaaaa", method="disjoint", dataset="digits", arch="cnn", preset="digits",
                      n=3, run_dir=str(tmp_path / "runs" / "r"), epochs_total=1, epochs_done=1, status="finished"))
    sim = store.add_simulation(Simulation(
        run_id="digits-disjoint-n3-aaaaaa", adversary="skilled", k=1, attack="pgd1", scenario="zero-day",
        params={"client_slots": [0, 1, 0, 1]}, rounds=ROUNDS, sent=6, counted=5, succeeded=2, deflected=3,
        deflection_rate=0.6, hits=[2, 0, 0]))
    assert sim.id is not None
    return sim.id


def test_replay_a_stored_simulation_step_by_step(tmp_path: Path) -> None:
    store = Store(tmp_path / "deflect.db")
    add_simulation(store, tmp_path)

    async def scenario() -> None:
        app = DeflectApp(store, poll_interval=0.1)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.screen.__class__.__name__ == "RunsScreen")
            await pilot.press("s")
            await until(pilot, lambda: isinstance(app.screen, ReplayScreen)
                        and app.screen.query_one(OptionList).option_count >= 2)
            screen = app.screen
            options = screen.query_one(OptionList)
            assert "simulation 1" in str(options.get_option_at_index(0).prompt)
            assert any("zero-day.toml" in str(options.get_option_at_index(i).prompt)
                       for i in range(options.option_count))
            screen.autoplay = False  # step by hand
            await pilot.press("enter")
            await until(pilot, lambda: screen.replay is not None)
            assert "paused" in text_of(screen.query_one("#replay-title", Static))
            await pilot.press("n")
            assert screen.replay.sent == 1 and screen.marks == {0: SUCCEEDED}
            grid = screen.query_one(ClientGrid)
            assert grid.models == [0, 1, 0, 1] and "✗✗" in text_of(grid)
            await pilot.press("r")  # the rest of round 1: model 0 is rotated out
            assert screen.replay.round_index == 1 and screen.replay.released == [2, 1]
            assert "model 0 retired after 2 hits, model 2 released" in text_of(screen.query_one("#replay-log", Static))
            assert grid.models == [2, 1, 2, 1]
            await pilot.press("r")
            assert screen.replay.done
            gauge = text_of(screen.query_one(DeflectionGauge))
            assert "60.0 %" in gauge and "of 5" in gauge
            assert "m0 2" in text_of(screen.query_one("#replay-hits", Static))
            assert "finished" in text_of(screen.query_one("#replay-title", Static))
            await pilot.press("space")
            assert screen.playing
            await pilot.press("space")
            assert not screen.playing
            await pilot.press("plus", "plus")
            assert screen.speed == 4
            await pilot.press("escape")  # back to the list, then out
            assert screen.query_one("#replay-pick").display
            await pilot.press("escape")
            assert app.screen.__class__.__name__ == "RunsScreen"

    asyncio.run(scenario())


def test_replay_runs_a_scenario_file_live(tmp_path: Path) -> None:
    store = Store(tmp_path / "deflect.db")
    train(tiny_config(n=3), store)
    (tmp_path / "scenarios").mkdir()
    (tmp_path / "scenarios" / "mini.toml").write_text(
        'adversary = "oracle"\nk = 2\nattack = "fgsm"\nclients = 40\nrounds = 3\nper_round = 20\nlimit = 60\n')

    async def scenario() -> None:
        app = DeflectApp(store, poll_interval=0.1)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.screen.__class__.__name__ == "RunsScreen")
            await pilot.press("s")
            await until(pilot, lambda: isinstance(app.screen, ReplayScreen) and app.screen.choices)
            screen = app.screen
            index = next(i for i, c in enumerate(screen.choices) if c.path and c.path.name == "mini.toml")
            screen.query_one(OptionList).highlighted = index
            await pilot.press("enter")
            await until(pilot, lambda: "stored as simulation" in screen.phase, timeout=120)
            screen.speed = 5
            await until(pilot, lambda: screen.replay is not None and screen.replay.done
                        and len(screen.replay.rounds) == 3)
            sims = store.simulations()
            assert len(sims) == 1 and screen.replay.sent == 60 == sims[0].sent
            assert screen.replay.deflected == sims[0].deflected and screen.replay.hits == sims[0].hits

    asyncio.run(scenario())


async def open_game(pilot: Pilot, app: DeflectApp, run_id: str) -> GameScreen:
    """The game for `run_id`, opened with "g" from the runs screen once its models are loaded."""
    # "g" opens the game for the run under the cursor: wait until the list has loaded one
    # (on a busy machine the screen shows before its first poll fills the table)
    await until(pilot, lambda: app.screen.__class__.__name__ == "RunsScreen" and app.screen._cursor_run() == run_id)
    await pilot.press("g")
    await until(pilot, lambda: isinstance(app.screen, GameScreen) and app.screen.game is not None)
    return app.screen


def test_attacker_game_round_with_real_models(tmp_path: Path) -> None:
    store = Store(tmp_path / "deflect.db")
    run_id = train(tiny_config(n=3, epochs=3), store)
    run = store.get_run(run_id)
    models = load_set(run_id, store)
    pool = select_subset(load_dataset("digits", "test"), 100, 0)
    store_transfer(store, run, transfer_matrix(models, pool, "pgd1", dataset="digits"))

    async def scenario() -> None:
        app = DeflectApp(store, poll_interval=0.1)
        async with app.run_test(size=SIZE) as pilot:
            screen = await open_game(pilot, app, run_id)
            game = screen.game
            await pilot.press("enter")  # nothing bought yet
            assert "buy a model first" in text_of(screen.query_one("#game-status", Static)) and not game.rounds
            await pilot.press("1")
            assert game.owned == [1] and game.budget_left == 90
            await pilot.press("1")
            assert "already yours" in text_of(screen.query_one("#game-status", Static))
            await pilot.press("plus", "enter")
            await until(pilot, lambda: len(game.rounds) == 1)
            played = game.rounds[0]
            assert len(played.results) == 7 and game.budget_left == 83
            reveal = text_of(screen.query_one("#game-reveal", Static))
            assert f"c{played.results[0].client}" in reveal
            assert "pgd1" in text_of(screen.query_one("#game-rounds", Static))
            for played_before in range(1, 5):
                await pilot.press("enter")
                await until(pilot, lambda n=played_before: len(game.rounds) == n + 1 or game.over)
            assert game.over
            end = text_of(screen.query_one("#game-end", Static))
            assert "game over" in end and "best play from the transfer matrices" in end
            await pilot.press("g")
            assert screen.game is not game and screen.game.rounds == []

    asyncio.run(scenario())
    assert len(store.evaluations()) == 1 and store.simulations() == []  # playing stores nothing


def test_game_without_evaluation_says_what_to_run(tmp_path: Path) -> None:
    store = Store(tmp_path / "deflect.db")
    run_id = train(tiny_config(epochs=1), store)

    async def scenario() -> None:
        app = DeflectApp(store, poll_interval=0.1)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.screen.__class__.__name__ == "RunsScreen")
            app.push_screen(GameScreen(run_id))
            await until(pilot, lambda: "deflect evaluate" in text_of(app.screen.query_one("#game-status", Static)))

    asyncio.run(scenario())


def _footer_keys(screen: object) -> tuple[list[str], list[str]]:
    """(keys the footer shows within 80 columns, keys it cuts off)."""
    shown, cut = [], []
    for key in screen.query("FooterKey"):  # type: ignore[attr-defined]
        (shown if key.region.width and key.region.right <= SIZE[0] else cut).append(key.key_display or key.key)
    return shown, cut


def test_every_screen_keeps_quit_and_help_in_the_footer_at_80_columns(tmp_path: Path) -> None:
    store = Store(tmp_path / "deflect.db")
    add_simulation(store, tmp_path)
    run_id = "digits-disjoint-n3-aaaaaa"
    store.add_evaluation(Evaluation(run_id=run_id, kind="transfer", attack="pgd1", n_examples=10,
                                    matrix=[[0.0, 80.0, 80.0], [80.0, 0.0, 80.0], [80.0, 80.0, 0.0]],
                                    success=[[100.0, 10.0, 10.0]] * 3, clean_acc=[90.0, 90.0, 90.0]))

    async def scenario() -> None:
        app = DeflectApp(store, poll_interval=0.1)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.screen.__class__.__name__ == "RunsScreen"
                        and app.screen._cursor_run() == run_id)
            seen = {}
            for keys, name in (((), "RunsScreen"), (("enter",), "MatrixScreen"), (("g",), "GameScreen")):
                await pilot.press(*keys)
                await until(pilot, lambda name=name: app.screen.__class__.__name__ == name)
                await pilot.pause(0.2)
                seen[name] = _footer_keys(app.screen)
            await pilot.press("question_mark")  # the game's help: one line for the ten buy keys, all on screen
            await until(pilot, lambda: isinstance(app.screen, HelpScreen))
            help_text = text_of(app.screen.query_one("#help-keys", Static))
            assert "0-9" in help_text and "Buy m5" not in help_text and "Quit" in help_text
            assert app.screen.query_one("#help-box").region.bottom <= SIZE[1]
            await pilot.press("escape", "escape", "escape")
            await until(pilot, lambda: app.screen.__class__.__name__ == "RunsScreen")
            await pilot.press("s")
            await until(pilot, lambda: isinstance(app.screen, ReplayScreen) and app.screen.choices)
            await pilot.pause(0.2)
            seen["ReplayScreen"] = _footer_keys(app.screen)
            for name, (shown, cut) in seen.items():
                assert not cut and {"q", "?"} <= set(shown), (name, shown, cut)
            assert "space" not in seen["ReplayScreen"][0]  # playback keys only once a replay is on screen
            assert "s" in seen["RunsScreen"][0]

    asyncio.run(scenario())


def test_keys_pressed_while_crafting_change_the_next_round_not_this_one(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import deflect.game

    store = Store(tmp_path / "deflect.db")
    run_id = train(tiny_config(n=3, epochs=1), store)
    run = store.get_run(run_id)
    pool = select_subset(load_dataset("digits", "test"), 40, 0)
    for attack in ("pgd1", "fgsm"):
        store_transfer(store, run, transfer_matrix(load_set(run_id, store), pool, attack))
    release = threading.Event()
    crafted = deflect.game.craft_outcomes

    def slow(*args: object, **kwargs: object) -> list[str]:
        release.wait(30)  # crafting takes as long as the test wants (a cw2 example takes seconds)
        return crafted(*args, **kwargs)

    monkeypatch.setattr(deflect.game, "craft_outcomes", slow)

    async def scenario() -> None:
        app = DeflectApp(store, poll_interval=0.1)
        async with app.run_test(size=SIZE) as pilot:
            screen = await open_game(pilot, app, run_id)
            game = screen.game
            await pilot.press("1", "enter")
            chosen = (game.table.attacks[screen.attack], screen.image, screen.count)
            await pilot.press("a", "i", "plus", "plus")  # while the example is still being crafted
            release.set()
            await until(pilot, lambda: len(game.rounds) == 1)
            played = game.rounds[0]
            assert (played.attack, played.image, len(played.results)) == chosen
            assert (game.table.attacks[screen.attack], screen.image) != chosen[:2]  # kept for the next round

    asyncio.run(scenario())


def test_a_scenario_left_while_crafting_stops_there(digits_runs: tuple[Store, dict[str, str]]) -> None:
    """`cancellable` callbacks stop a simulation in its crafting, not at the next round; nothing is stored."""
    from deflect.scenario import Scenario, with_overrides
    from deflect.simulate import SimCallbacks, simulate
    from deflect.tui.screens.replay import cancellable

    store, ids = digits_runs
    before = len(store.simulations())
    calls: list[int] = []
    left = {"screen": False}

    def progress(done: int, total: int) -> None:
        calls.append(done)
        left["screen"] = True  # the user leaves after the first batch

    callbacks = cancellable(SimCallbacks(on_progress=progress), lambda: left["screen"])
    scenario = with_overrides(Scenario(), adversary="ORACLE", k=2, run=ids["disjoint"], attack="fgsm", rounds=2)
    assert scenario.adversary == "oracle"  # names in any case, like --attack
    with pytest.raises(KeyboardInterrupt):
        simulate(store, scenario, callbacks=callbacks)
    assert calls == [1] and len(store.simulations()) == before
    with pytest.raises(KeyboardInterrupt):
        callbacks.training.on_batch(None)  # the static adversary's training stops at its next batch too
