"""The adapters every replica serves, in one named Ray actor (and what the
first replica said of its engine, which the endpoint reads before it serves).

The endpoint changes it (load, unload through the API); a replica reads it when
it starts and again with each routing report, so a replica started later, or
restarted by Serve after a crash, serves the current set without anyone
pushing it there. The version lets a replica tell cheaply that nothing changed.
"""

from __future__ import annotations


class AdapterSet:
    """name → path, in load order; each change bumps `version`."""

    def __init__(self, adapters: dict[str, str]) -> None:
        self.adapters = dict(adapters)
        self.version = 0
        self.engine: dict | None = None
        """What the first replica to start said of its engine (model, dtype, context length, adapters)."""
        self.lora_server: str | None = None
        """Where the LoRA server listens (disaggregated layout): it keeps that address across restarts."""

    def describe(self, engine: dict) -> None:
        if self.engine is None:
            self.engine = engine

    def described(self) -> dict | None:
        return self.engine

    def server_endpoint(self, endpoint: str | None = None) -> str | None:
        """Record the LoRA server's endpoint (when given); the one recorded."""
        if endpoint is not None:
            self.lora_server = endpoint
        return self.lora_server

    def current(self) -> tuple[int, dict[str, str]]:
        return self.version, dict(self.adapters)

    def version_now(self) -> int:
        return self.version

    def add(self, name: str, path: str) -> int:
        self.adapters[name] = path
        self.version += 1
        return self.version

    def remove(self, name: str) -> int:
        if self.adapters.pop(name, None) is not None:
            self.version += 1
        return self.version
