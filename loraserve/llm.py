"""Offline API: `LLM(model_dir, adapters={...}).generate(prompts, sampling, adapter=...)`."""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from tqdm import tqdm

from loraserve.config import EngineConfig
from loraserve.engine.llm_engine import LLMEngine
from loraserve.engine.output import RequestOutput
from loraserve.sampling import SamplingParams


class LLM:
    def __init__(self, model: str, adapters: dict[str, str] | None = None, **config) -> None:
        self.engine = LLMEngine(EngineConfig(model=str(model), **config))
        for name, path in (adapters or {}).items():
            self.engine.add_adapter(name, path)

    def generate(
        self,
        prompts: str | list[int] | Sequence[str | list[int]],
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        adapter: str | None | Sequence[str | None] = None,
        use_tqdm: bool | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in prompt order.

        `sampling` and `adapter` are one for all prompts or one per prompt.
        A progress bar shows for more than 8 prompts unless use_tqdm=False.
        """
        single = isinstance(prompts, str) or (prompts and isinstance(prompts[0], int))
        batch = [prompts] if single else list(prompts)
        samplings = _per_prompt(sampling or SamplingParams(), len(batch), "sampling")
        adapters = _per_prompt(adapter, len(batch), "adapter")
        ids = [self.engine.add_request(p, replace(s), a).request_id
               for p, s, a in zip(batch, samplings, adapters)]
        done: dict[str, RequestOutput] = {}
        show = use_tqdm if use_tqdm is not None else len(batch) > 8
        with tqdm(total=len(batch), disable=not show, desc="generate", unit="req") as bar:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        return [done[i] for i in ids]


def _per_prompt(value, n: int, what: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{what}: {len(value)} values for {n} prompts")
        return list(value)
    return [value] * n
