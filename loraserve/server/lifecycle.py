"""The server's life: start, drain on the first signal, exit at once on the
second, and exit (non-zero, via the CLI) when the engine loop has died."""

from __future__ import annotations

import threading
import time

import uvicorn

from loraserve.engine.async_engine import AsyncEngine


class DrainingServer(uvicorn.Server):
    """uvicorn whose first SIGTERM/SIGINT drains: requests in flight finish,
    new ones get 503, then it exits. A second signal exits at once. A dead
    engine makes it exit too, once its errors are out."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine) -> None:
        super().__init__(config)
        self.engine = engine
        engine.on_death = self._engine_died
        if engine.dead is not None:  # it died before it could tell us
            self.should_exit = True

    def _engine_died(self) -> None:
        """The engine's errors are on their way to every open request; uvicorn's
        graceful shutdown lets those responses finish, then `run` returns."""
        self.should_exit = True

    def handle_exit(self, sig, frame) -> None:
        if self.engine.draining:
            return super().handle_exit(sig, frame)
        self.engine.draining = True

        def exit_when_idle() -> None:
            while self.engine.num_unfinished() and self.engine.dead is None:
                time.sleep(0.05)
            super(DrainingServer, self).handle_exit(sig, frame)

        threading.Thread(target=exit_when_idle, name="loraserve-drain", daemon=True).start()
