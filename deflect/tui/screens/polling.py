"""The polling mechanism shared by the dashboard's live screens."""

from __future__ import annotations

from typing import Any

from textual.screen import Screen
from textual.worker import Worker


class PollingScreen(Screen):
    """Re-reads the database every poll interval in a thread worker, one read at a time.

    A tick starts a read only when the previous one has finished, so a slow or busy database
    delays the screen instead of piling up (or cancelling) reads. Subclasses say how to start one.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._worker: Worker[None] | None = None

    def start_poll(self) -> Worker[None]:
        """Start one read of the database in a thread worker."""
        raise NotImplementedError

    def start_polling(self, now: bool = True) -> None:
        """Poll every interval from now on; `now=False` waits one interval for the first read."""
        if now:
            self.refresh_data()
        self.set_interval(self.app.poll_interval, self.tick)  # type: ignore[attr-defined]

    def refresh_data(self) -> None:
        self._worker = self.start_poll()

    def tick(self) -> None:
        if self._worker is None or self._worker.is_finished:
            self.refresh_data()
