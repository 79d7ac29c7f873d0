"""Sampling parameters do what they say, on the real engine."""

from __future__ import annotations

import pytest
import torch

from loraserve import LLM, SamplingParams

PROMPT = list(range(200, 230))


@pytest.fixture(scope="module")
def llm(tiny, device):
    root = tiny("llama")
    return LLM(str(root / "model"), dtype="float32", adapters={"r8": str(root / "adapters" / "r8")}, device=str(device))


def gen(llm, sp, n=1, adapter=None, prompt=PROMPT):
    return llm.generate([prompt] * n, sp, adapter=adapter)


def test_seed_reproduces_whatever_the_batch(llm):
    sp = SamplingParams(max_tokens=20, temperature=1.0, seed=7, ignore_eos=True)
    alone = gen(llm, sp)[0].token_ids
    # the same seeded request inside a batch of unseeded ones, and under preemption-free reruns
    others = SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True)
    batch = llm.generate([PROMPT, [1, 2, 3], PROMPT], [others, sp, others])
    assert gen(llm, sp)[0].token_ids == alone
    assert llm.generate([PROMPT, PROMPT], [others, sp])[1].token_ids == alone
    assert len(batch) == 3


def test_different_seeds_differ(llm):
    a = gen(llm, SamplingParams(max_tokens=20, temperature=1.0, seed=1, ignore_eos=True))[0].token_ids
    b = gen(llm, SamplingParams(max_tokens=20, temperature=1.0, seed=2, ignore_eos=True))[0].token_ids
    assert a != b


def test_top_k_one_and_tiny_top_p_are_greedy(llm):
    greedy = gen(llm, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))[0].token_ids
    assert gen(llm, SamplingParams(max_tokens=16, temperature=1.5, top_k=1, seed=3, ignore_eos=True))[0].token_ids == greedy
    assert gen(llm, SamplingParams(max_tokens=16, temperature=1.5, top_p=1e-6, seed=3, ignore_eos=True))[0].token_ids == greedy


def test_top_k_restricts_to_k_most_likely(llm):
    sp = SamplingParams(max_tokens=12, temperature=5.0, top_k=3, seed=11, ignore_eos=True, logprobs=3)
    out = gen(llm, sp)[0]
    for token, top in zip(out.token_ids, out.top_logprobs):
        assert token in top  # the chosen token is among the 3 most likely under the model


def test_max_tokens_and_finish_reason(llm):
    out = gen(llm, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_stop_token_ids(llm):
    greedy = gen(llm, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))[0].token_ids
    stop_at = greedy[4]
    first = greedy.index(stop_at)
    out = gen(llm, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_at]))[0]
    assert out.token_ids == greedy[:first + 1] and out.finish_reason == "stop"


def test_stop_string_truncates_text(llm):
    full = gen(llm, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))[0]
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 3]
    assert stop.strip(), full.text
    out = gen(llm, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[: full.text.find(stop)]
    assert len(out.token_ids) < 24


def test_logprobs_are_log_probabilities(llm):
    out = gen(llm, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=2), adapter="r8")[0]
    assert len(out.logprobs) == 6
    for token, lp, top in zip(out.token_ids, out.logprobs, out.top_logprobs):
        assert lp <= 0 and max(top.values()) == pytest.approx(lp)  # greedy: the chosen is the most likely
        assert list(top)[0] == token


def test_no_logprobs_unless_asked(llm):
    out = gen(llm, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))[0]
    assert out.logprobs == [] and out.top_logprobs == []


@pytest.mark.parametrize("field,value,message", [
    ("max_tokens", 0, "max_tokens must be >= 1"),
    ("temperature", -1.0, "temperature must be in"),
    ("top_p", 0.0, "top_p must be in"),
    ("top_k", -5, "top_k must be >= 0"),
    ("logprobs", 50, "logprobs must be in"),
])
def test_invalid_parameters_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})


def test_request_validation(llm):
    with pytest.raises(ValueError, match="exceeds the context length"):
        llm.engine.add_request(PROMPT, SamplingParams(max_tokens=10_000))
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.engine.add_request([], SamplingParams())
    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        llm.engine.add_request(PROMPT, SamplingParams(), adapter="nope")
    assert not llm.engine.has_unfinished()  # nothing half-queued


def test_unfiltered_rows_skip_the_sort_and_keep_the_distribution():
    """Plain temperature sampling is softmax(logits / T); with top-k/top-p in the
    batch every row goes through the filter, and a row without filters keeps its
    whole distribution there too."""
    from loraserve.engine.sampler import _filtered_probs

    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(0)) * 4
    plain = [SamplingParams(temperature=t) for t in (0.5, 1.0, 2.0)]
    expected = torch.softmax(logits / torch.tensor([0.5, 1.0, 2.0])[:, None], dim=-1)
    assert torch.equal(_filtered_probs(logits, plain), expected)
    mixed = _filtered_probs(logits, [plain[0], SamplingParams(temperature=1.0, top_k=5), plain[2]])
    torch.testing.assert_close(mixed[[0, 2]], expected[[0, 2]], atol=1e-6, rtol=0)
    assert (mixed[1] > 0).sum() == 5 and mixed[1].topk(5).indices.sort().values.equal(logits[1].topk(5).indices.sort().values)


# -- text: incremental decoding and stop strings ------------------------------------

def _feed(tokenizer, ids, stop=()):
    """Drive the Detokenizer one token at a time, as the engine does; returns
    (concatenated deltas, final text, stop hit, the longest window decoded)."""
    from loraserve.engine.output import Detokenizer
    from loraserve.request import FinishReason, Request, RequestStatus

    windows = []
    real = tokenizer.decode

    class Counting:
        def decode(self, window, **kw):
            windows.append(len(window))
            return real(window, **kw)

    detok = Detokenizer(Counting())
    req = Request("r", [1], SamplingParams(stop=list(stop)))
    deltas, hit = [], False
    for i, t in enumerate(ids):
        req.output_token_ids.append(t)
        if i + 1 == len(ids):
            req.status, req.finish_reason = RequestStatus.FINISHED, FinishReason.LENGTH
        delta, hit = detok.update(req)
        deltas.append(delta)
        if hit:
            break
    return "".join(deltas), detok.text("r"), hit, max(windows)


def test_incremental_text_equals_the_whole_decode_and_reads_a_small_window(llm):
    tok = llm.engine.tokenizer
    g = torch.Generator().manual_seed(0)
    text = "Hello wörld — ünïcödé 日本語のテキスト and emoji 🎉🚀 end."
    ids = tok.encode(text, add_special_tokens=False) * 3 + torch.randint(0, 49152, (4000,), generator=g).tolist()
    streamed, final, hit, window = _feed(tok, ids)
    assert streamed == final == tok.decode(ids) and not hit
    assert window <= 8  # a 4,000-token generation never decodes more than a few tokens at a time


def test_incremental_stop_strings_cut_where_the_whole_text_would(llm):
    tok = llm.engine.tokenizer
    ids = tok.encode("one two three four five six seven", add_special_tokens=False)
    whole = tok.decode(ids)
    for stop in (["three"], ["ee fo"], ["x", "six"], ["seven"], ["absent"]):
        streamed, final, hit, _ = _feed(tok, ids, stop)
        cut = min((whole.find(s) for s in stop if s in whole), default=-1)
        assert hit == (cut >= 0) and streamed == final == (whole[:cut] if cut >= 0 else whole), stop
