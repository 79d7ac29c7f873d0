"""OpenAI request bodies (the fields loraserve honours) and their mapping to SamplingParams."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from loraserve.sampling import SamplingParams
from loraserve.server.limits import (MAX_CONTENT_PARTS, MAX_LOGPROBS, MAX_MESSAGES, MAX_N, MAX_PROMPTS, MAX_STOP,
                                     MAX_STOP_CHARS, MAX_STOP_TOKEN_IDS)
from loraserve.tokenizer import check_text

INT64 = (-(2**63), 2**63 - 1)


def at_most(value, limit: int, what: str):
    """A list's length checked before its items are validated (pydantic's
    max_length counts after validating every item: seconds for millions)."""
    if isinstance(value, list) and len(value) > limit:
        raise ValueError(f"at most {limit} {what}, not {len(value)}")
    return value


def _prompt_kind(value) -> str:
    """Which form a prompt has, from its first item: each form is then validated
    alone (a union tried form by form makes an error per item of a million-token
    prompt for each form it is not)."""
    if isinstance(value, list) and value:
        if isinstance(value[0], list):
            return "token_lists"
        if isinstance(value[0], int) and not isinstance(value[0], bool):
            return "tokens"
    return "text" if isinstance(value, str) else "texts"


Prompt = Annotated[Union[Annotated[str, Tag("text")], Annotated[list[str], Tag("texts")],
                         Annotated[list[int], Tag("tokens")], Annotated[list[list[int]], Tag("token_lists")]],
                   Discriminator(_prompt_kind)]


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields are accepted and ignored

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    seed: int | None = Field(default=None, ge=INT64[0], le=INT64[1])
    """64-bit, as vLLM takes it; choice i of n samples with seed + i."""
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: dict | None = None
    """{"include_usage": true}: a last chunk carries the token counts."""
    user: str | None = Field(default=None, max_length=256)
    """OpenAI's end-user id; the session key a scaled-out endpoint routes by (unless X-Session-Id says otherwise)."""

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_limits(cls, stop):
        at_most(stop, MAX_STOP, "stop strings")
        strings = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
        if any(isinstance(s, str) and len(s) > MAX_STOP_CHARS for s in strings):
            raise ValueError(f"a stop string may have at most {MAX_STOP_CHARS} characters")
        return stop  # its types are checked after this

    @field_validator("stop_token_ids", mode="before")
    @classmethod
    def _stop_token_ids_limit(cls, ids):
        return at_most(ids, MAX_STOP_TOKEN_IDS, "stop_token_ids")

    def sampling(self, default_max_tokens: int, logprobs: int | None, index: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=self.max_tokens or default_max_tokens,
            temperature=self.temperature, top_p=self.top_p, top_k=max(self.top_k, 0),
            seed=None if self.seed is None else self.seed + index,  # n > 1: distinct but reproducible
            stop=stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos, logprobs=logprobs)


class CompletionRequest(_Common):
    prompt: Prompt

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_count(cls, prompt):
        return prompt if _prompt_kind(prompt) == "tokens" else at_most(prompt, MAX_PROMPTS, "prompts")
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: Literal[False] = False


class ChatMessage(BaseModel):
    """A message of a text-only model: what OpenAI refuses for one is refused
    here too (unknown roles, missing content, image or audio parts)."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict] | None = None
    """None only for an assistant message (one that made tool calls)."""

    @field_validator("content", mode="before")
    @classmethod
    def _parts_limit(cls, content):
        return at_most(content, MAX_CONTENT_PARTS, "content parts")

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
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict] | None = None
    """Passed to the chat template (which decides how the model sees them); tool calls are not parsed."""
    chat_template_kwargs: dict | None = None
    """The template's own switches, as vLLM takes them (e.g. {"enable_thinking": false})."""

    @field_validator("messages", mode="before")
    @classmethod
    def _messages_limit(cls, messages):
        return at_most(messages, MAX_MESSAGES, "messages")


class LoadLoraRequest(BaseModel):
    """Same body as vLLM's /v1/load_lora_adapter."""
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoraRequest(BaseModel):
    lora_name: str = Field(min_length=1)
