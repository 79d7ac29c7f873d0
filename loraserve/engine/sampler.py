"""Token sampling for a batch of rows, each with its own parameters.

Greedy rows take the argmax; the others go through temperature, top-k and
top-p, then draw from their own seeded generator or the engine's. Logprobs are
of the model's distribution (before temperature and filters), as vLLM and the
OpenAI API report them.

Sampling never raises on what the model produced: a row whose filtered
distribution is degenerate (NaN or infinite logits, no mass left) takes its
most likely token instead of failing the step.
"""

from __future__ import annotations

import torch

from loraserve.engine.plan import SampledToken
from loraserve.sampling import SamplingParams


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[SampledToken]:
    """logits: [N, V] float32; one params and one generator per row, on the
    logits' device (a GPU samples where its logits are: no vocabulary-wide copy)."""
    dev = logits.device
    tokens = logits.argmax(dim=-1)
    # argmax ranks NaN first, so it lands on one exactly when a row has one: checking the N chosen
    # values spares a pass over the vocabulary every step
    broken = logits.gather(1, tokens[:, None]).isnan().any()
    rows = [i for i, p in enumerate(params) if not p.greedy]
    fetched = None
    if not rows and dev.type != "cpu":  # greedy on a GPU: the tokens and the check in one wait for the device
        *fetched, broken = torch.cat([tokens, broken.view(1)]).tolist()
    if broken:  # a broken row: its NaNs rank last instead
        logits = logits.nan_to_num(nan=float("-inf"))
        tokens, fetched = logits.argmax(dim=-1), None
    if rows:
        idx = torch.tensor(rows, device=dev)
        probs = _filtered_probs(logits[idx], [params[i] for i in rows])
        sound = (torch.isfinite(probs).all(dim=-1) & (probs.sum(dim=-1) > 0)).tolist()
        for j, i in enumerate(rows):
            if sound[j]:
                tokens[i] = torch.multinomial(probs[j], 1, generator=generators[i])[0]
            else:  # the most likely token
                tokens[i] = logits[i].argmax()
    token_list = fetched if fetched is not None else tokens.tolist()
    out = [SampledToken(t, None, None) for t in token_list]
    want = [i for i, p in enumerate(params) if p.logprobs is not None]
    if want:  # the vocabulary-wide log-softmax only for the rows that asked
        idx = torch.tensor(want, device=dev)
        logprobs = torch.log_softmax(logits[idx], dim=-1)
        chosen = logprobs.gather(1, tokens[idx, None])[:, 0].tolist()
        for j, i in enumerate(want):
            top = None
            if params[i].logprobs:
                vals, ids = logprobs[j].topk(params[i].logprobs)
                top = dict(zip(ids.tolist(), vals.tolist()))
            out[i] = SampledToken(token_list[i], chosen[j], top)
    return out


def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    dev = logits.device
    temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=dev)
    logits = logits / temps[:, None]
    if all(p.top_k <= 0 and p.top_p >= 1.0 for p in params):
        return torch.softmax(logits, dim=-1)  # plain temperature (the API's default): no vocabulary sort
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    top_k = torch.tensor([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params], device=dev)
    ranks = torch.arange(vocab, device=dev)[None, :]
    drop = ranks >= top_k[:, None]
    top_p = torch.tensor([p.top_p for p in params], dtype=logits.dtype, device=dev)
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    before = probs.cumsum(-1) - probs  # mass strictly before each token
    drop |= before >= top_p[:, None]  # keeps at least the top token
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    filtered = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    return torch.softmax(filtered, dim=-1)
