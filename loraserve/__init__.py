"""loraserve: one base LLM, many LoRA adapters, one engine."""

from loraserve.llm import LLM
from loraserve.sampling import SamplingParams

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"
