"""OpenAI request bodies (the fields loraserve honours) and their mapping to SamplingParams."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from loraserve.sampling import SamplingParams
from loraserve.tokenizer import check_text

INT64 = (-(2**63), 2**63 - 1)


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields are accepted and ignored

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)
    n: int = Field(default=1, ge=1, le=16)
    seed: int | None = Field(default=None, ge=INT64[0], le=INT64[1])
    """64-bit, as vLLM takes it; choice i of n samples with seed + i."""
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: dict | None = None
    """{"include_usage": true}: a last chunk carries the token counts."""

    def sampling(self, default_max_tokens: int, logprobs: int | None, index: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=self.max_tokens or default_max_tokens,
            temperature=self.temperature, top_p=self.top_p, top_k=max(self.top_k, 0),
            seed=None if self.seed is None else self.seed + index,  # n > 1: distinct but reproducible
            stop=stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos, logprobs=logprobs)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: Literal[False] = False


class ChatMessage(BaseModel):
    """A message of a text-only model: what OpenAI refuses for one is refused
    here too (unknown roles, missing content, image or audio parts)."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict] | None = None
    """None only for an assistant message (one that made tool calls)."""

    @model_validator(mode="after")
    def _text_content(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"content: a {self.role} message needs content")
        for i, part in enumerate(self.content if isinstance(self.content, list) else []):
            if part.get("type") != "text":
                raise ValueError(f"content[{i}]: parts of type {part.get('type')!r} are not supported "
                                 f"(this model takes text only)")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"content[{i}]: a text part needs a 'text' string")
        check_text(self.text())
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part["text"] for part in self.content)
        return self.content or ""

    def for_template(self) -> dict:
        """The message as the chat template reads it: text parts joined into one
        string, and the fields a template may use besides (tool_calls, name,
        tool_call_id, reasoning_content, ...) passed as sent."""
        return {**(self.model_extra or {}), "role": self.role,
                "content": None if self.content is None else self.text()}


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict] | None = None
    """Passed to the chat template (which decides how the model sees them); tool calls are not parsed."""
    chat_template_kwargs: dict | None = None
    """The template's own switches, as vLLM takes them (e.g. {"enable_thinking": false})."""


class LoadLoraRequest(BaseModel):
    """Same body as vLLM's /v1/load_lora_adapter."""
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoraRequest(BaseModel):
    lora_name: str = Field(min_length=1)
