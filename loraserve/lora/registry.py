"""Adapters the engine knows: user-facing names → content-hash identities."""

from __future__ import annotations

import dataclasses
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from loraserve.errors import UnknownModel
from loraserve.lora.adapter import AdapterError, LoraAdapter, load_adapter
from loraserve.lora.packing import pack
from loraserve.model.spec import ModelSpec


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-/:@+]{0,255}")
"""Adapter names are model ids in the API and labels in /metrics: letters,
digits and ._-/:@+ (so `org/name:v2` works), at most 256 characters."""


def check_name(name: str) -> None:
    """Raise AdapterError if `name` cannot be an adapter's name."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or {".", ".."} & set(name.split("/")):
        shown = repr(name) if len(str(name)) <= 60 else repr(str(name)[:57]) + "..."
        raise AdapterError(f"adapter name {shown} is not allowed: use 1-256 letters, digits and ._-/:@+, "
                           f"starting with a letter or digit, with no '.' or '..' path segment", "lora_name")


@dataclass(frozen=True)
class AdapterInfo:
    """What the API shows of an adapter."""

    name: str
    id: str
    path: str
    rank: int


class AdapterRegistry:
    """Names and identities, changed by the engine thread and read by request
    validation on other threads: changes hold a lock, and `listing` is an
    immutable snapshot rebuilt on each change."""

    def __init__(self, spec: ModelSpec, max_rank: int, dtype: torch.dtype) -> None:
        self.spec, self.max_rank, self.dtype = spec, max_rank, dtype
        self.by_name: dict[str, LoraAdapter] = {}
        self.by_id: dict[str, LoraAdapter] = {}
        self.listing: tuple[AdapterInfo, ...] = ()
        self._lock = threading.Lock()

    def load(self, name: str, path: str | Path, within: Sequence[Path] = ()) -> LoraAdapter:
        """Read and validate (slow, touches no registry state: any thread);
        `within`: the directories its files must lie in (see `load_adapter`)."""
        check_name(name)
        return load_adapter(path, self.spec, self.max_rank, name=name, dtype=self.dtype, within=within)

    def register(self, name: str, adapter: LoraAdapter) -> LoraAdapter:
        check_name(name)
        with self._lock:
            if name in self.by_name:
                raise AdapterError(f"an adapter named {name!r} is already loaded", "lora_name")
            adapter = self.by_id.setdefault(adapter.id, adapter)  # same bytes under two names: one adapter
            self.by_name[name] = adapter
            self._relist()
        return adapter

    def remove(self, name: str) -> LoraAdapter:
        """Forget a name. The weights (`by_id`) stay until the engine drops them,
        once no request uses them."""
        with self._lock:
            if name not in self.by_name:
                raise UnknownModel(name)
            adapter = self.by_name.pop(name)
            self._relist()
        return adapter

    def reload(self, adapter_id: str) -> LoraAdapter:
        """The disk tier: read a known adapter again from its directory (the mover thread)."""
        meta = self.get(adapter_id)
        adapter = self.load(meta.name, meta.path)
        if adapter.id != adapter_id:
            raise RuntimeError(f"adapter {meta.path} changed on disk since it was loaded")
        return adapter

    def add_cached(self, name: str, adapter: LoraAdapter, cache, memory) -> LoraAdapter:
        """Name a loaded adapter whose bytes the tiered `cache` keeps. A new one
        enters the cache: its packed weights go to host blocks of `memory` (or,
        if the host tier is full, stay on disk), and the registry keeps only its
        metadata. Raises ValueError if it can never fit the device."""
        if self.has(adapter.id):
            return self.register(name, adapter)
        check_name(name)
        blocks = cache.add_adapter(adapter.id, adapter.num_bytes)  # validates the size first
        if blocks:
            memory.write_blocks("host", blocks, pack(adapter))
        return self.register(name, dataclasses.replace(adapter, weights={}))

    def drop(self, adapter_id: str) -> None:
        """Forget an identity no name refers to any more."""
        with self._lock:
            del self.by_id[adapter_id]

    def get(self, adapter_id: str) -> LoraAdapter:
        """An adapter's metadata by identity (any thread: the mover reads adapters from disk)."""
        with self._lock:
            return self.by_id[adapter_id]

    def has(self, adapter_id: str) -> bool:
        """Whether the adapter's weights are still known (named or waiting to go)."""
        with self._lock:
            return adapter_id in self.by_id

    def is_named(self, adapter_id: str) -> bool:
        return any(a.id == adapter_id for a in self.listing)

    def resolve(self, name: str | None) -> LoraAdapter | None:
        if name is None:
            return None
        with self._lock:
            if name not in self.by_name:
                raise UnknownModel(name)
            return self.by_name[name]

    def _relist(self) -> None:
        self.listing = tuple(AdapterInfo(n, a.id, a.path, a.rank) for n, a in self.by_name.items())
