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

MAX_MESSAGES = 65536
"""Messages in one chat request. Chat templates spend a few tokens on each
message's framing, so this many need a context of hundreds of thousands of
tokens before any content; the limit bounds the work of validating them."""

MAX_CONTENT_PARTS = 1024
"""Text parts in one message's content."""


@dataclass(frozen=True)
class ServerLimits:
    max_request_bytes: int = 16 * 2**20
    """Largest request body, in bytes; a larger one is answered 413 before it
    is parsed. A prompt filling the longest contexts served today (1M tokens)
    is about 4 MiB of English text (~4 bytes a token), up to ~9 MiB of CJK text
    sent as \\u escapes (6 bytes a character, ~1.5 characters a token), and at
    most 8 MiB as token ids ("151643," is 7 bytes): no client meets 16 MiB by
    accident. The limit also bounds what the event loop parses: the worst body
    under it (8M small numbers) parses in about half a second, under 64 MiB in 2.5."""

    keep_alive_s: float = 30.0
    """How long an idle HTTP connection is kept open. Longer than the clients'
    own idle expiry (httpx, and so the openai client, drops one after 5 s):
    with uvicorn's default of 5 s both ends time out together, and a request
    sent on a connection the server is closing fails with "Server disconnected
    without sending a response"."""
