"""Shown while the database has no runs; switches to the runs screen as soon as one appears."""

from __future__ import annotations

from dataclasses import dataclass

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.widgets import Footer, Static
from textual.worker import Worker, get_current_worker

from deflect.tui.screens.polling import PollingScreen
from deflect.tui.widgets.titlebar import TitleBar

WELCOME = """[b]Welcome to deflect[/b]

This database has no runs yet. Create a first one in another terminal:

  [b]deflect demo[/b]            the whole pipeline on digits (a few CPU minutes)
  [b]deflect train --n 3[/b]     train a disjoint set of 3 models

This screen switches to the runs table as soon as a run appears."""


class WelcomeScreen(PollingScreen):
    BINDINGS = [Binding("s", "app.replay", "Replay")]  # the app's own is hidden from the footer

    @dataclass
    class Checked(Message):
        has_runs: bool
        error: str | None = None

    def compose(self) -> ComposeResult:
        yield TitleBar(str(self.app.store.path))  # type: ignore[attr-defined]
        yield Static(WELCOME, id="welcome")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        # The app looked just before showing this screen: the first poll waits one interval.
        self.start_polling(now=False)

    def start_poll(self) -> Worker[None]:
        return self.poll()

    @work(thread=True, exclusive=True, group="welcome-poll")
    def poll(self) -> None:
        try:
            has_runs = bool(self.app.store.runs_readonly())  # type: ignore[attr-defined]
        except Exception as exc:  # a locked or broken database: say so, try again next tick
            if not get_current_worker().is_cancelled:
                self.post_message(self.Checked(False, str(exc).splitlines()[0]))
            return
        if not get_current_worker().is_cancelled:
            self.post_message(self.Checked(has_runs))

    def on_welcome_screen_checked(self, message: Checked) -> None:
        if message.has_runs:
            if self.is_current:
                from deflect.tui.screens.runs import RunsScreen

                self.app.switch_screen(RunsScreen())
            return
        self.query_one(TitleBar).show_error(message.error)
