"""The synchronous engine: requests in, outputs out, one step at a time.

`step()` is schedule → execute → update; everything else is bookkeeping
around it (validation on the way in, text and stop strings on the way out).
A request that fails in any of these fails alone, finishing with the reason
"error" and a message (`engine/isolation.py`); an exception that escapes
`step()` means the engine itself is broken.
"""

from __future__ import annotations

import itertools
import logging
import time
from functools import partial
from pathlib import Path
from typing import Sequence

import torch


from loraserve.clock import Clock, MonotonicClock
from loraserve.config import CacheConfig, EngineConfig
from loraserve.engine.core import EngineCore
from loraserve.dtypes import resolve_dtype, torch_dtype
from loraserve.errors import InvalidRequest
from loraserve.engine.output import Detokenizer, RequestOutput, make_output
from loraserve.engine.memory_budget import sized_cache
from loraserve.engine.tier_memory import TierMemory
from loraserve.engine.torch_executor import TorchExecutor
from loraserve.engine.torch_mover import TorchMover
from loraserve.lora.adapter import LoraAdapter
from loraserve.lora.backend import LocalLoraBackend
from loraserve.lora.bank import lora_dtype
from loraserve.lora.registry import AdapterRegistry
from loraserve.model.loader import load_model, read_generation_eos
from loraserve.remote.backend import RemoteLoraBackend
from loraserve.remote.client import LoraServerClient, adapter_meta
from loraserve.request import FinishReason, Request
from loraserve.sampling import SamplingParams
from loraserve.tokenizer import Tokenizer

log = logging.getLogger(__name__)



class LLMEngine(EngineCore):
    """The engine core plus what serving text needs: the model and its
    tokenizer, adapters by name, validation on the way in and text on the way out."""

    def __init__(self, config: EngineConfig, clock: Clock | None = None) -> None:
        self.config = config
        clock = clock or MonotonicClock()
        self.dtype = resolve_dtype(config.dtype, config.device)
        """The dtype the model computes in (`auto` resolved)."""
        if config.dtype == "auto":
            log.info("dtype auto: %s on %s", self.dtype, config.device)
        dtype = torch_dtype(self.dtype)
        self.lora_dtype = lora_dtype(dtype, torch.device(config.device), config.lora_dtype)
        """What adapter weights are stored in here (`--lora-dtype`, auto resolved), checked before the weights load."""
        self.model = load_model(config.model, dtype, config.device)
        self.spec = self.model.spec
        max_model_len = min(config.max_model_len or self.spec.max_position_embeddings,
                            self.spec.max_position_embeddings)
        self.tokenizer = Tokenizer(config.model)
        eos = set(self.spec.eos_token_ids) | set(read_generation_eos(config.model))
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        cc = self._sized(config, dtype)
        block_size = cc.block_size
        block_bytes = block_size * self.spec.kv_bytes_per_token(dtype.itemsize)
        self.num_blocks = cc.device_bytes // block_bytes
        self.num_host_blocks = cc.host_bytes // block_bytes
        if self.num_blocks < 2:
            raise ValueError(f"device_bytes {cc.device_bytes} holds fewer than 2 blocks of {block_bytes} bytes")
        if self.num_blocks * block_size < max_model_len:
            log.warning("the device pool holds %d tokens of KV, less than max_model_len %d",
                        self.num_blocks * block_size, max_model_len)
        device = self.model.device
        self.adapters = AdapterRegistry(self.spec, config.max_lora_rank, self.lora_dtype)
        self.memory = TierMemory(self.spec, self.num_blocks, block_size, dtype, device, self.num_host_blocks)
        assert self.memory.block_bytes == block_bytes
        self.remote: LoraServerClient | None = None
        """The LoRA server, when adapters live there (`serve --lora-server`)."""
        catalogue: list[dict] = []
        if config.lora_server is None:
            self.lora = LocalLoraBackend(self.spec, config.scheduler.max_loras, self.lora_dtype, device,
                                         self.adapters.by_id, partial(self.memory.read_blocks, "device"), dtype)
        else:
            self.remote = LoraServerClient(config.lora_server)
            catalogue = self.remote.connect()  # Unavailable if it is not there
            self.lora = RemoteLoraBackend(self.spec, self.remote, self.adapters.by_id)
        self.slots = self.lora.slots
        super().__init__(cc, config.scheduler, self.num_blocks, self.num_host_blocks, block_bytes, max_model_len,
                         clock, TorchMover(self.memory, self.adapters.reload),
                         TorchExecutor(self.model, self.memory, self.lora, config.seed), self.slots)
        self.cache_stats: dict = self.cache.stats()
        self._stats_time = self.clock.now()
        self.detok = Detokenizer(self.tokenizer)
        self._ids = itertools.count()
        self._retiring: set[str] = set()
        """Ids of unloaded adapters whose weights wait for their last request."""
        self._unloading: set[tuple[str, str]] = set()
        """(name, id) unloaded here that the LoRA server's catalogue may still show."""
        if self.remote is not None:
            self._apply_catalogue(catalogue)
            self.remote.start()

    def _sized(self, config: EngineConfig, dtype: torch.dtype) -> CacheConfig:
        """The cache config with a fractional CUDA device tier turned into bytes,
        now that the weights are loaded (see engine/memory_budget.py)."""
        if config.cache.device_fraction <= 0 or self.model.device.type != "cuda":
            return config.cache
        free = torch.cuda.mem_get_info(self.model.device)[0]
        cache = sized_cache(config, self.spec, dtype.itemsize, free)
        log.info("device tier: %.2f GiB, %.0f%% of the %.2f GiB free after the weights, less the LoRA bank and "
                 "a step", cache.device_bytes / 2**30, 100 * config.cache.device_fraction, free / 2**30)
        return cache

    # -- adapters ----------------------------------------------------------

    def add_adapter(self, name: str, path: str) -> LoraAdapter:
        return self.register_adapter(name, self.read_adapter(name, path))

    def read_adapter(self, name: str, path: str | Path, within: Sequence[Path] = ()) -> LoraAdapter:
        """Read and validate an adapter (any thread): here, or, with a LoRA
        server, there (the path is the server's, and so are the directories its
        files may lie in), returning its metadata. `within`: see `load_adapter`."""
        if self.remote is not None:
            return self.remote.load(name, str(path))
        return self.adapters.load(name, path, within)

    def register_adapter(self, name: str, adapter: LoraAdapter) -> LoraAdapter:
        """Name a read adapter. Its weights go to the cache's host tier (see
        `AdapterRegistry.add_cached`); with a LoRA server only its identity
        enters the cache, as the namespace of its history KV."""
        if self.remote is None:
            return self.adapters.add_cached(name, adapter, self.cache, self.memory)
        if any(a.name == name and a.id == adapter.id for a in self.adapters.listing):
            return adapter  # the catalogue brought it first
        if adapter.id not in self.cache.tree.adapters:
            self.cache.add_remote_adapter(adapter.id)
        return self.adapters.register(name, adapter)

    def unload_remote(self, name: str) -> None:
        """Forward an unload to the LoRA server (any thread), once this instance is done with it."""
        if self.remote is not None:
            self.remote.unload(name)

    def _apply_catalogue(self, entries: list[dict]) -> None:
        """Make the adapters by name those of the LoRA server's catalogue (engine thread)."""
        served = {e["name"]: e for e in entries}
        self._unloading = {(n, i) for n, i in self._unloading if n in served and served[n]["id"] == i}
        for info in self.adapters.listing:
            if info.name not in served or served[info.name]["id"] != info.id:
                self._retire(info.name)
        named = {a.name for a in self.adapters.listing}
        for name, entry in served.items():
            if name not in named and (name, entry["id"]) not in self._unloading:
                self.register_adapter(name, adapter_meta(entry))

    def remove_adapter(self, name: str) -> None:
        """Unload by name. New requests for it are refused at once; requests
        already accepted finish with its weights, which go when the last one ends."""
        adapter = self._retire(name)
        if self.remote is not None:
            self._unloading.add((name, adapter.id))

    def _retire(self, name: str) -> LoraAdapter:
        """Forget a name; its weights (or its KV namespace) go with its last request."""
        adapter = self.adapters.remove(name)
        self._retiring.add(adapter.id)
        self._drop_retired()
        return adapter

    def adapter_loaded(self, adapter_id: str) -> bool:
        return self.adapters.has(adapter_id)

    def _drop_retired(self) -> None:
        in_use = {r.adapter for r in self.scheduler.requests.values() if not r.is_finished}
        for adapter_id in list(self._retiring):
            if self.adapters.is_named(adapter_id):  # re-registered under a name meanwhile
                self._retiring.discard(adapter_id)
            elif adapter_id not in in_use:
                self.lora.forget(adapter_id)
                self.cache.remove_adapter(adapter_id)
                self.adapters.drop(adapter_id)
                self._retiring.discard(adapter_id)

    # -- requests ----------------------------------------------------------

    def make_request(self, prompt: str | list[int], sampling: SamplingParams | None = None,
                     adapter: str | None = None, request_id: str | None = None) -> Request:
        """Validate and build a request without queueing it (callable from any
        thread; tokenizing a long prompt takes a while, so the server calls it
        off its event loop). Raises InvalidRequest (bad input, naming the field) or
        UnknownModel (no adapter of that name). What passes can be scheduled,
        computed and sampled without raising."""
        sampling = sampling or SamplingParams()  # validated when it was made
        vocab = self.spec.vocab_size
        if any(t >= vocab for t in sampling.stop_token_ids):
            raise InvalidRequest("stop_token_ids", f"stop_token_ids must be in [0, {vocab})")
        if (sampling.logprobs or 0) > vocab:
            raise InvalidRequest("logprobs", f"logprobs must be at most the vocabulary size {vocab}")
        if isinstance(prompt, str):
            self.check_prompt_chars(len(prompt), "prompt")
            try:
                ids = self.tokenizer.encode(prompt)
            except ValueError as e:
                raise InvalidRequest("prompt", f"prompt: {e}") from None
        else:
            ids = list(prompt)
        if not ids:
            raise InvalidRequest("prompt", "prompt is empty")
        if len(ids) + sampling.max_tokens > self.max_model_len:  # before a look at each of millions of ids
            raise InvalidRequest("max_tokens", f"prompt ({len(ids)} tokens) plus max_tokens ({sampling.max_tokens}) "
                                           f"exceeds the context length {self.max_model_len}")
        if any(not 0 <= t < vocab for t in ids):
            raise InvalidRequest("prompt", f"prompt token ids must be in [0, {vocab})")
        try:
            self.cache.check_request_size(len(ids) + sampling.max_tokens)
        except ValueError as e:
            raise InvalidRequest("max_tokens", str(e)) from None
        lora = self.adapters.resolve(adapter)
        stop_ids = set(sampling.stop_token_ids) | (set() if sampling.ignore_eos else set(self.eos_token_ids))
        return Request(
            request_id=request_id or f"req-{next(self._ids)}",
            prompt_token_ids=ids,
            sampling=sampling,
            adapter=lora.id if lora else None,
            adapter_name=adapter,
            arrival_time=self.clock.now(),
            stop_token_ids=frozenset(stop_ids),
        )

    def check_prompt_chars(self, chars: int, field: str) -> None:
        self.tokenizer.check_prompt_chars(chars, field, self.max_model_len)

    def add_request(self, prompt: str | list[int], sampling: SamplingParams | None = None,
                    adapter: str | None = None, request_id: str | None = None) -> Request:
        """Validate and queue a request; nothing is queued if validation fails."""
        req = self.make_request(prompt, sampling, adapter, request_id)
        self.queue(req)
        return req

    def queue(self, req: Request) -> None:
        """Queue a validated request (engine thread). With a LoRA server, tell
        it the adapter is coming, so it can load it before the first delta."""
        self.scheduler.add(req)
        if self.remote is not None and req.adapter is not None:
            self.lora.hint([req.adapter])

    def idle_tick(self) -> None:
        super().idle_tick()
        self._sync_remote()
        self.snapshot_stats()

    def _sync_remote(self) -> None:
        if self.remote is not None and (catalogue := self.remote.take_catalogue()) is not None:
            self._apply_catalogue(catalogue)

    def snapshot_stats(self, period: float = 1.0) -> None:
        """Snapshot cache stats for other threads (metrics) at most once a period
        (0: now, as a scrape asks for)."""
        now = self.clock.now()
        if now - self._stats_time >= period:
            self._stats_time = now
            self.cache_stats = self.cache.stats()

    def close(self) -> None:
        self.mover.close()
        if self.remote is not None:
            self.remote.close()
            self.lora.close()

    # -- the loop ----------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        self._sync_remote()
        out = self.run_step()
        if self.remote is not None:
            self.lora.end_step()
        if out.plan.is_empty and self.scheduler.pending:
            time.sleep(0.0005)  # everything waits on copies: do not spin
        for req in out.failed:
            if req.adapter is not None:  # a load that raised may have left its slot half written
                self.lora.forget(req.adapter)
        self.snapshot_stats()
        return [self._output(req) for req in out.failed + out.touched]

    def _output(self, req: Request) -> RequestOutput:
        try:
            delta, stop_hit = self.detok.update(req)
        except Exception as e:  # e.g. a tokenizer that cannot decode what was sampled
            log.exception("detokenizing request %s failed", req.request_id)
            self.scheduler.fail(req.request_id, f"{type(e).__name__}: {e}")
            delta, stop_hit = "", False
        if stop_hit:
            self.scheduler.finish(req.request_id, FinishReason.STOP)
        since = self.detok.mark_sent(req.request_id, req.num_output_tokens)
        out = make_output(req, delta, since, self.detok.text(req.request_id) if req.is_finished else "")
        if req.is_finished:
            self.forget(req)
        return out

    def forget(self, req: Request) -> None:
        super().forget(req)
        self.detok.forget(req.request_id)
        if self._retiring:  # every finish and abort passes here: an unloaded adapter may now go
            self._drop_retired()
