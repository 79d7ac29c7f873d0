"""loraserve: one base LLM, many LoRA adapters, one engine.

The top-level names load lazily so that policy modules (scheduler, cache)
can be imported without pulling in torch.
"""

from __future__ import annotations

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
