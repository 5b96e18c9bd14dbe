"""Snapshot tests (pytest-textual-snapshot) of the runs screen, the matrix screen and a game round.

The database is filled with fixed ids and times, and the game's models, images and outcomes are
fixed, so that the pictures depend on the dashboard's rendering only. After an intended change of
the look: `pytest tests/test_snapshots.py --snapshot-update`, then review the SVGs in the diff.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch
from textual.pilot import Pilot
from torch import nn

from deflect.game import DEFLECTED, FOOLED, VOID, SuccessTable
from deflect.store import Evaluation, Store
from deflect.tui.app import DeflectApp
from deflect.tui.screens import game as game_screen
from deflect.tui.screens.game import GameScreen, GameSetup
from tests.test_tui import add_run, until

SIZE = (80, 24)
WHEN = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def filled_store(tmp_path: Path) -> Store:
    store = Store(Path("deflect.db"))  # relative: the title bar shows the same path on every machine
    add_run(store, "digits-disjoint-n3-aaaaaa", tmp_path, status="finished", epochs=3, total=3,
            clean=[96.0, 95.5, 97.0])
    add_run(store, "digits-independent-n3-bbbbbb", tmp_path, status="running", epochs=1, total=5)
    store.add_evaluation(Evaluation(
        run_id="digits-disjoint-n3-aaaaaa", kind="transfer", attack="pgd1", created=WHEN,
        matrix=[[4.0, 81.5, 77.0], [83.0, 6.5, 90.0], [70.5, 88.0, 3.0]], clean_acc=[96.0, 95.5, 97.0],
        blackbox_mean=81.7, blackbox_std=6.6, whole_set_mean=56.0, whitebox_mean=4.5, n_examples=360))
    return store


def _sized(pilot: Pilot) -> bool:
    """The runs table holds both runs and has measured its columns (a loaded machine can lag)."""
    from textual.widgets import DataTable

    screen = pilot.app.screen
    if screen.__class__.__name__ != "RunsScreen" or len(getattr(screen, "rows", {})) < 2:
        return False
    table = screen.query_one(DataTable)
    if table.columns["id"].get_render_width(table) <= len("digits-disjoint-n3-aaaaaa"):
        return False
    # the header as it will be painted, not only the measured width: a loaded machine has shown a
    # picture whose columns still had their labels' widths after the measurement was done
    return "run" + " " * 20 in table.render_line(0).text


async def settle(pilot: Pilot) -> None:
    from textual.widgets import DataTable

    await until(pilot, lambda: _sized(pilot))
    pilot.app.screen.query_one(DataTable).refresh()  # paint the measured widths before the picture
    await pilot.pause(0.3)
    await pilot.wait_for_scheduled_animations()


def test_runs_screen(snap_compare, tmp_path: Path) -> None:
    assert snap_compare(DeflectApp(filled_store(tmp_path), poll_interval=0.1), terminal_size=SIZE, run_before=settle)


def test_matrix_screen(snap_compare, tmp_path: Path) -> None:
    async def open_matrix(pilot: Pilot) -> None:
        await settle(pilot)
        await pilot.press("enter")
        await until(pilot, lambda: pilot.app.screen.__class__.__name__ == "MatrixScreen"
                    and pilot.app.screen.current is not None)
        await pilot.pause(0.3)

    assert snap_compare(DeflectApp(filled_store(tmp_path), poll_interval=0.1), terminal_size=SIZE,
                        run_before=open_matrix)


def fixed_setup(store: object, run_id: str) -> GameSetup:
    table = SuccessTable({"pgd1": [[0.95, 0.1, 0.2], [0.15, 0.9, 0.1], [0.2, 0.05, 0.97]]},
                         {"pgd1": [0.96, 0.95, 0.97]})
    images = torch.linspace(0, 1, 64).reshape(1, 1, 8, 8).repeat(4, 1, 1, 1)
    return GameSetup(run_id, "digits", table, [nn.Identity()] * 3, images, torch.tensor([3, 1, 4, 1]))


def test_game_round(snap_compare, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(game_screen, "load_setup", fixed_setup)
    monkeypatch.setattr("deflect.game.craft_outcomes", lambda *a, **k: [FOOLED, DEFLECTED, VOID])

    async def play(pilot: Pilot) -> None:
        await settle(pilot)
        pilot.app.push_screen(GameScreen("digits-disjoint-n3-aaaaaa"))
        await until(pilot, lambda: getattr(pilot.app.screen, "game", None) is not None)
        await pilot.press("0", "plus", "enter")
        await until(pilot, lambda: bool(pilot.app.screen.game.rounds))
        await pilot.pause(0.3)

    assert snap_compare(DeflectApp(filled_store(tmp_path), poll_interval=0.1), terminal_size=SIZE, run_before=play)
