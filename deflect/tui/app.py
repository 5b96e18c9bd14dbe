"""`deflect dashboard`: a read-only Textual view of the database, refreshed by polling."""

from __future__ import annotations

from dataclasses import dataclass

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.widgets import Static

from deflect.store import Store
from deflect.tui.screens.help import HelpScreen
from deflect.tui.screens.welcome import WelcomeScreen


def screen_bindings(screen: type) -> list[Binding | tuple[str, ...]]:
    """The key bindings deflect's screens declare, base classes included; Textual's own (focus, copy)
    are not the dashboard's keys, so `?` does not list them."""
    found: list[Binding | tuple[str, ...]] = []
    for cls in screen.__mro__:
        if cls.__module__.startswith("deflect.") and "BINDINGS" in vars(cls):
            found.extend(b for b in vars(cls)["BINDINGS"] if b not in found)
    return found


class DeflectApp(App):
    CSS_PATH = "deflect.tcss"
    TITLE = "deflect"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [
        # shown in the footer by the screens that declare it (runs, welcome); `?` lists it everywhere
        Binding("s", "replay", "Replay", show=False),
        Binding("q", "quit", "Quit"),
        Binding("question_mark", "help", "Help", key_display="?"),
    ]

    def __init__(self, store: Store, poll_interval: float = 1.0) -> None:
        super().__init__()
        self.store = store
        self.poll_interval = poll_interval

    @dataclass
    class FirstLook(Message):
        has_runs: bool

    def compose(self) -> ComposeResult:
        yield Static("Opening the database…", id="loading")

    def on_mount(self) -> None:
        self.first_look()

    @work(thread=True, exclusive=True, group="first-look")
    def first_look(self) -> None:
        """Welcome screen or runs table, decided before either is shown (no flash of the wrong one)."""
        try:
            has_runs = bool(self.store.runs_readonly())
        except Exception:  # the welcome screen's own polling shows the error
            has_runs = False
        self.post_message(self.FirstLook(has_runs))

    def on_deflect_app_first_look(self, message: FirstLook) -> None:
        from deflect.tui.screens.runs import RunsScreen

        self.push_screen(RunsScreen() if message.has_runs else WelcomeScreen())

    def action_replay(self) -> None:
        from deflect.tui.screens.replay import ReplayScreen

        if not isinstance(self.screen, ReplayScreen | HelpScreen):
            self.push_screen(ReplayScreen())

    def action_help(self) -> None:
        if isinstance(self.screen, HelpScreen):
            return
        from deflect.tui.screens.replay import ReplayScreen

        keys: list[tuple[str, str]] = []
        for binding in [*screen_bindings(type(self.screen)), *self.BINDINGS]:
            if not isinstance(binding, Binding) or not binding.description:
                continue
            if binding.action == "replay" and isinstance(self.screen, ReplayScreen):
                continue  # already there
            entry = (self.get_key_display(binding), binding.description)
            if entry not in keys:
                keys.append(entry)
        keys.extend(getattr(self.screen, "HELP_KEYS", []))
        keys.append(("↑ ↓", "move / scroll"))
        self.push_screen(HelpScreen(keys, title=f"Keys · {type(self.screen).__name__.removesuffix('Screen')}"))
