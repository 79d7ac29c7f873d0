"""Per-request sampling parameters (plain data, no tensors)."""

from __future__ import annotations

from dataclasses import dataclass, field

from loraserve.errors import InvalidRequest

SEED_RANGE = (-(2**63), 2**64 - 1)
"""Seeds are 64-bit: signed (as vLLM takes them) or unsigned (as torch's generators do)."""

MIN_TEMPERATURE = 1e-5
"""Below this a temperature divides logits into infinities: treated as greedy (as vLLM does)."""


@dataclass
class SamplingParams:
    """How to pick tokens for one request; field names follow the OpenAI API.

    `temperature == 0` (or below MIN_TEMPERATURE) means greedy. `top_k <= 0`
    and `top_p == 1` disable those filters; a `top_k` past the vocabulary keeps
    all of it. `logprobs` is the number of alternatives to return beside the
    chosen token's own log-probability (None: return no logprobs at all).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        """Raise InvalidRequest naming the first bad field: whatever passes here can
        be sampled from without raising on the engine thread."""
        checks = [
            ("max_tokens", self.max_tokens >= 1, "must be >= 1"),
            ("temperature", 0.0 <= self.temperature <= 100.0, "must be in [0, 100]"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0 or self.top_k == -1, "must be >= 0 (or -1 for all)"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "must be in [0, 20]"),
            ("seed", self.seed is None or SEED_RANGE[0] <= self.seed <= SEED_RANGE[1],
             f"must be a 64-bit integer, in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
            ("stop_token_ids", all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
             "must be token ids (integers >= 0)"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise InvalidRequest(name, f"{name} {why}, got {_short(getattr(self, name))}")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
