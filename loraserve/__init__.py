"""loraserve: one base LLM, many LoRA adapters, one engine.

The top-level names load lazily so that policy modules (scheduler, cache)
can be imported without pulling in torch.
"""

from __future__ import annotations

import os

# Large CPU tensors (weights, KV cache, LoRA banks) on 2 MB pages where the kernel allows it (transparent huge
# pages "madvise" or "always"): torch's CPU allocator advises allocations of 2 MB or more when this is set. It reads
# it once, at its first such allocation, so it takes effect where loraserve is imported before then (the CLI, the
# Ray replicas, the LoRA server, a script that imports torch first). A decode step streams every weight, which on 4 KB pages read 11-13% slower (SmolLM2's
# bf16 projections at one row on an AMD Zen 4); a batch-1 token 11.6 -> 10.9 ms, a batch-32 step 2-5% faster.
# THP_MEM_ALLOC_ENABLE=0 in the environment opts out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    if name == "LLM":
        from loraserve.llm import LLM

        return LLM
    if name == "SamplingParams":
        from loraserve.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'loraserve' has no attribute {name!r}")
