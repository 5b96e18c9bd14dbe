"""The dashboard with Textual's Pilot at 80x24 on a database filled directly through Store (no training)."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from textual.pilot import Pilot
from textual.widgets import DataTable, Sparkline, Static
from typer.testing import CliRunner

from deflect.cli import app as cli_app
from deflect.store import EpochMetric, Evaluation, Run, Store
from deflect.tui.app import DeflectApp
from deflect.tui.screens.help import HelpScreen
from deflect.tui.screens.matrix import MatrixScreen
from deflect.tui.screens.runs import RunsScreen
from deflect.tui.screens.welcome import WelcomeScreen
from deflect.tui.widgets.heatmap import Heatmap, heatmap_table

SIZE = (80, 24)
POLL = 0.1


def add_run(store: Store, run_id: str, tmp_path: Path, status: str = "running", epochs: int = 0,
            total: int = 5, clean: list[float] | None = None) -> None:
    store.add_run(Run(id=run_id, method="disjoint", dataset="digits", arch="cnn-small", preset="digits", n=3,
                      run_dir=str(tmp_path / "runs" / run_id), epochs_total=total, status=status))
    for epoch in range(1, epochs + 1):
        add_epoch(store, run_id, epoch)
    if clean is not None:
        store.update_run(run_id, clean_acc=clean)


def add_epoch(store: Store, run_id: str, epoch: int) -> None:
    metric = EpochMetric(run_id=run_id, epoch=epoch, loss_total=1.0 / epoch, loss_class=0.5, loss_angle=0.25,
                         loss_transfer1=0.125, loss_transfer2=0.0625, val_loss=0.75,
                         clean_acc=[50.0 + 10 * epoch, 52.0 + 10 * epoch, 54.0 + 10 * epoch], lr=0.01, seconds=1.0)
    store.update_run(run_id, metric, epochs_done=epoch)


def add_transfer(store: Store, run_id: str, attack: str, diag: float, off: float, bb_mean: float) -> Evaluation:
    matrix = [[diag if r == c else off + r + c for c in range(3)] for r in range(3)]
    return store.add_evaluation(Evaluation(
        run_id=run_id, kind="transfer", attack=attack, matrix=matrix, clean_acc=[97.0, 96.5, 98.0],
        blackbox_mean=bb_mean, blackbox_std=1.5, whole_set_mean=60.0, whitebox_mean=diag, n_examples=200))


async def until(pilot: Pilot, condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Let the app poll until `condition` holds (fail after `timeout` seconds)."""
    for _ in range(int(timeout / 0.05)):
        await pilot.pause(0.05)
        if condition():
            return
    raise AssertionError("condition not met in time")


def text_of(widget: Static) -> str:
    console = Console(width=100, record=True, color_system=None, file=io.StringIO())
    console.print(widget.content)
    return console.export_text()


def table_text(table: DataTable, column: str) -> list[str]:
    return [str(table.get_cell(key, column)) for key in table.rows]


def test_heatmap_table_colours_and_marks_the_diagonal() -> None:
    table = heatmap_table([[5.0, 90.0], [60.0, 30.0]], clean=[98.0, 97.0])
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(table)
    text = console.export_text()
    assert "5.0*" in text and "30.0*" in text and "90.0" in text and "* white-box" in text and "clean" in text
    cells = [str(c) for c in table.columns[1]._cells]
    assert "bold red underline" in cells[0] and "yellow" in cells[1]


def test_welcome_then_runs_table_live_epochs_and_help(tmp_path: Path) -> None:
    store = Store(tmp_path / "deflect.db")

    async def scenario() -> None:
        app = DeflectApp(store, poll_interval=POLL)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: "deflect demo" in text_of(app.screen.query_one("#welcome", Static)))
            assert isinstance(app.screen, WelcomeScreen)
            assert "deflect train --n 3" in text_of(app.screen.query_one("#welcome", Static))

            add_run(store, "digits-disjoint-n3-aaaaaa", tmp_path, status="finished", epochs=2, total=2,
                    clean=[91.0, 92.0, 93.0])
            add_run(store, "digits-independent-n3-bbbbbb", tmp_path, epochs=1)
            add_transfer(store, "digits-disjoint-n3-aaaaaa", "pgd1", 2.0, 70.0, 73.5)
            await until(pilot, lambda: isinstance(app.screen, RunsScreen))
            table = app.screen.query_one("#runs", DataTable)
            await until(pilot, lambda: table.row_count == 2)
            assert [str(k.value) for k in table.rows] == ["digits-disjoint-n3-aaaaaa", "digits-independent-n3-bbbbbb"]
            assert ["finished" in s for s in table_text(table, "status")] == [True, False]
            assert "running" in table_text(table, "status")[1]
            # clean: the finished run's stored accuracies, the running one's latest epoch (60, 62, 64)
            assert table_text(table, "clean") == ["92.0", "62.0"]
            assert table_text(table, "bb") == ["73.5", "-"]
            assert table_text(table, "epoch") == ["2/2", "1/5"]

            # the highlighted run (first row): its curve and latest losses
            await until(pilot, lambda: list(app.screen.query_one("#curve", Sparkline).data or []) == [62.0, 72.0])
            assert "epoch 2" in text_of(app.screen.query_one("#losses", Static))

            # an epoch written by another thread (as `deflect train` would) shows up without restarting
            await pilot.press("down")
            writer = threading.Thread(target=add_epoch, args=(store, "digits-independent-n3-bbbbbb", 2))
            writer.start()
            writer.join()
            await until(pilot, lambda: table_text(table, "epoch")[1] == "2/5")
            assert table_text(table, "clean")[1] == "72.0"
            await until(pilot, lambda: list(app.screen.query_one("#curve", Sparkline).data or []) == [62.0, 72.0]
                        and "bbbbbb" in text_of(app.screen.query_one("#detail-title", Static)))

            await pilot.press("question_mark")
            await until(pilot, lambda: isinstance(app.screen, HelpScreen))
            keys = text_of(app.screen.query_one("#help-keys", Static))
            assert "Matrix" in keys and "Quit" in keys and "Help" in keys
            await pilot.press("escape")
            await until(pilot, lambda: isinstance(app.screen, RunsScreen))
            await pilot.press("q")
        assert app.return_code == 0

    asyncio.run(scenario())


def test_matrix_screen_attacks_live_fill_and_png_export(tmp_path: Path) -> None:
    store = Store(tmp_path / "deflect.db")
    run_id = "digits-disjoint-n3-cccccc"
    add_run(store, run_id, tmp_path, status="finished", epochs=1, total=1, clean=[97.0, 96.5, 98.0])
    add_transfer(store, run_id, "pgd1", 1.0, 40.0, 11.1)  # superseded by the next pgd1 evaluation
    add_transfer(store, run_id, "pgd1", 3.0, 80.0, 82.25)

    async def scenario() -> None:
        app = DeflectApp(store, poll_interval=POLL)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: isinstance(app.screen, RunsScreen)
                        and app.screen.query_one("#runs", DataTable).row_count == 1)
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, MatrixScreen))
            screen = app.screen
            assert isinstance(screen, MatrixScreen)
            heatmap = screen.query_one("#heatmap", Heatmap)
            await until(pilot, lambda: heatmap.matrix is not None)
            assert heatmap.matrix == [[3.0, 81.0, 82.0], [81.0, 3.0, 83.0], [82.0, 83.0, 3.0]]
            shown = text_of(heatmap)
            assert "3.0*" in shown and "83.0" in shown and "96.5" in shown
            summary = text_of(screen.query_one("#matrix-summary", Static))
            assert "82.2 ± 1.5" in summary and "whole set 60.0" in summary and "clean 97.0 96.5 98.0" in summary

            # a second attack stored while the screen is open (as `deflect evaluate --all` does)
            add_transfer(store, run_id, "fgsm", 20.0, 50.0, 55.0)
            await until(pilot, lambda: list(screen.evaluations) == ["pgd1", "fgsm"])
            assert screen.attack == "pgd1"
            await pilot.press("right_square_bracket")
            assert screen.attack == "fgsm" and heatmap.matrix is not None and heatmap.matrix[0][0] == 20.0
            assert "55.0 ± 1.5" in text_of(screen.query_one("#matrix-summary", Static))
            await pilot.press("a")
            assert screen.attack == "pgd1"
            await pilot.press("left_square_bracket")
            assert screen.attack == "fgsm"

            await pilot.press("e")
            figures = tmp_path / "runs" / run_id / "figures"
            await until(pilot, lambda: any(figures.glob("*.png")), timeout=15)
            png = next(figures.glob("*.png"))
            assert png.name.startswith(f"{run_id}-transfer-fgsm-") and png.read_bytes()[:4] == b"\x89PNG"
            await until(pilot, lambda: any(str(png) in str(n.message) for n in app._notifications))

            await pilot.press("question_mark")
            await until(pilot, lambda: isinstance(app.screen, HelpScreen))
            keys = text_of(app.screen.query_one("#help-keys", Static))
            assert "Export PNG" in keys and "Next attack" in keys and "Back" in keys
            await pilot.press("escape")
            await until(pilot, lambda: isinstance(app.screen, MatrixScreen))
            await pilot.press("escape")
            await until(pilot, lambda: isinstance(app.screen, RunsScreen))

    asyncio.run(scenario())


def test_matrix_screen_without_evaluations_says_how_to_make_one(tmp_path: Path) -> None:
    store = Store(tmp_path / "deflect.db")
    add_run(store, "digits-disjoint-n3-dddddd", tmp_path)

    async def scenario() -> None:
        app = DeflectApp(store, poll_interval=POLL)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: isinstance(app.screen, RunsScreen)
                        and app.screen.query_one("#runs", DataTable).row_count == 1)
            await pilot.press("enter")
            # the whole command, wrapped at 80 columns, in the title (the heatmap is as wide as its table)
            await until(pilot, lambda: isinstance(app.screen, MatrixScreen)
                        and "deflect evaluate digits-disjoint-n3-dddddd --attack pgd1"
                        in " ".join(text_of(app.screen.query_one("#matrix-title", Static)).split()))
            await pilot.press("e")  # nothing to export: a warning, no file
            await pilot.pause(0.2)
            assert not (tmp_path / "runs").exists()

    asyncio.run(scenario())


def test_dashboard_is_read_only(tmp_path: Path) -> None:
    """A run left 'running' by a dead process is shown interrupted, but the database is not changed."""
    store = Store(tmp_path / "deflect.db")
    add_run(store, "digits-disjoint-n3-eeeeee", tmp_path)
    with store.session() as s:
        run = s.get(Run, "digits-disjoint-n3-eeeeee")
        assert run is not None
        run.pid = 2**22 + 12345  # beyond pid_max on Linux: no such process
        s.add(run)
        s.commit()

    async def scenario() -> None:
        app = DeflectApp(store, poll_interval=POLL)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: isinstance(app.screen, RunsScreen)
                        and app.screen.query_one("#runs", DataTable).row_count == 1)
            table = app.screen.query_one("#runs", DataTable)
            assert "interrupted" in table_text(table, "status")[0]

    asyncio.run(scenario())
    with store.session() as s:
        assert s.get(Run, "digits-disjoint-n3-eeeeee").status == "running"  # type: ignore[union-attr]


def test_dashboard_command_bad_database_is_one_line_exit_2(tmp_path: Path) -> None:
    (tmp_path / "junk.db").write_bytes(b"this is not sqlite" * 100)
    result = CliRunner().invoke(cli_app, ["dashboard", "--db", str(tmp_path / "junk.db")])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a deflect database" in lines[0]


def test_help_lists_the_dashboards_own_keys_only(tmp_path: Path) -> None:
    """`?` lists what the screen's keys do: not Textual's focus/copy keys, not Replay on the replay screen."""
    from deflect.tui.screens.replay import ReplayScreen

    app = DeflectApp(Store(tmp_path / "deflect.db"), poll_interval=0.05)

    async def keys_of(pilot: Pilot) -> str:
        await pilot.press("question_mark")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen))
        keys = text_of(app.screen.query_one("#help-keys", Static))
        await pilot.press("escape")
        return keys

    async def scenario() -> None:
        async with app.run_test(size=(100, 40)) as pilot:
            await until(pilot, lambda: isinstance(app.screen, WelcomeScreen))
            welcome = await keys_of(pilot)
            assert "Replay" in welcome and "Quit" in welcome
            assert "Focus" not in welcome and "Copy" not in welcome
            await until(pilot, lambda: isinstance(app.screen, WelcomeScreen))
            await pilot.press("s")
            await until(pilot, lambda: isinstance(app.screen, ReplayScreen))
            replay = await keys_of(pilot)
            rows = replay.splitlines()[1:]  # below the title, "Keys · Replay"
            assert any("Play/pause" in r for r in rows) and not any("Replay" in r for r in rows)

    asyncio.run(scenario())
