"""Every engine knob in one place, with its default and the reason for it."""

from __future__ import annotations

from dataclasses import dataclass

from loraserve.cache.config import CacheConfig
from loraserve.dtypes import DTYPES, check_dtype
from loraserve.remote.config import RemoteLoraConfig

__all__ = ["DTYPES", "CacheConfig", "EngineConfig", "SchedulerConfig"]



@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    """Most requests running at once (decode batch size)."""

    max_num_batched_tokens: int = 2048
    """Token budget of one step: decodes count 1, prefills their chunk. Long
    prompts are prefilled in chunks of at most this size."""

    max_loras: int = 8
    """Adapters resident in LoRA slots at once, hence the most distinct adapters
    one step can batch. Requests for other adapters wait for a free slot."""

    order: str = "fcfs"
    """Admission order of waiting requests: `fcfs` (arrival order), or `sjf`
    (shortest job first: fewest tokens left to compute, prompt and max_tokens;
    with ignore_eos replies, an idealised SJF that knows output lengths, the
    baseline InfiniLoRA compares with)."""

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_loras"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.order not in ("fcfs", "sjf"):
            raise ValueError(f"order must be fcfs or sjf, got {self.order!r}")


@dataclass(frozen=True)
class EngineConfig:
    model: str
    """Directory of an HF-format checkpoint (config.json, *.safetensors, tokenizer)."""

    dtype: str = "auto"
    """Compute and storage dtype: float32, bfloat16, float16, or auto: the
    fastest the device computes natively (`dtypes.resolve_dtype`: bf16 on a CPU
    with AVX512-BF16 or AMX and on GPUs that have it, else fp32 on CPU, fp16 on GPU)."""

    device: str = "cpu"
    """Torch device of the model and of the device tier: cpu, cuda."""

    lora_dtype: str = "auto"
    """What adapter weights are stored in: auto (the model's dtype, as vLLM does; fp32
    for an fp16 model on CPU), or float32 or bfloat16 on a CPU. A bf16 copy of fp32
    adapters halves the bytes a decode step reads for them and the cache blocks they
    take, and rounds their weights to bf16; an fp32 model's LoRA math stays fp32, as
    does any where bf16 is emulated (`lora/bank.py`)."""

    max_lora_rank: int = 64
    """Adapters above this rank are rejected at load."""

    max_model_len: int | None = None
    """Longest prompt + output; None takes the model's max_position_embeddings."""

    seed: int = 0
    """Seed of the engine's generator for requests that bring none."""

    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    lora_server: RemoteLoraConfig | None = None
    """Where adapters live when not in this process (`serve --lora-server`):
    then this instance holds no adapter weights and every LoRA delta is
    computed by the LoRA server."""

    def __post_init__(self) -> None:
        check_dtype(self.dtype)
        check_dtype(self.lora_dtype, "lora_dtype")
        if self.lora_server is not None and self.lora_dtype != "auto":
            raise ValueError("lora_dtype is for adapters held here: with a LoRA server, its --dtype decides theirs")
        if self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be >= 1, got {self.max_lora_rank}")
