"""What the HTTP API accepts at most: one place for every limit the README's
API section documents (a request past one gets a 4xx naming it).

Imports nothing of the web stack, so the CLI can take flag defaults from here
without loading the server.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_N = 16
"""Choices per prompt (`n`)."""

MAX_LOGPROBS = 20
"""`logprobs` (completions) and `top_logprobs` (chat), as OpenAI's API allows."""

MAX_STOP = 16
"""Stop strings per request (OpenAI allows 4; vLLM sets no limit). Each is
checked against the text of every generated token, so their number bounds
the work per token."""

MAX_STOP_CHARS = 1024
"""Characters per stop string."""

MAX_STOP_TOKEN_IDS = 256
"""Entries of `stop_token_ids`."""

MAX_PROMPTS = 2048
"""Prompts in one completions request (a list of strings or of token-id
lists), as OpenAI's API allows; each of them times `n` is queued at once."""


@dataclass(frozen=True)
class ServerLimits:
    max_request_bytes: int = 64 * 2**20
    """Largest request body, in bytes; a larger one is answered 413 before it
    is parsed. No client meets 64 MiB by accident: the longest contexts served
    today (1M tokens) are about 4 MiB of text at ~4 characters a token, 24 MiB
    if every character were a 6-byte JSON escape, and about 8 MiB as token ids."""
