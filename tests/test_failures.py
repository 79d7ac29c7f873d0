"""One bad request never takes the engine down: failures stay with the request
that causes them, and a dead engine loop says so and exits."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from fastapi.testclient import TestClient

from loraserve import LLM, SamplingParams
from loraserve.engine.async_engine import AsyncEngine
from loraserve.engine.sampler import sample
from loraserve.errors import InvalidRequest
from loraserve.server.app import build_app
from tests.test_server import server_output, start_server

PROMPTS = ["The quick brown fox", "Once upon a time", "POISON in the well", "Count: 1 2 3", "Hello there"]
ADAPTERS = ["r4", None, "r8", "r16", "r8"]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny):
    root = tiny("llama")
    return LLM(str(root / "model"), dtype="float32", adapters={n: str(root / "adapters" / n) for n in ("r4", "r8", "r16")})


@pytest.fixture(scope="module")
def expected(llm):
    return [o.token_ids for o in llm.generate(PROMPTS, GREEDY, adapter=ADAPTERS)]


def poison_ids(llm) -> list[int]:
    return llm.engine.tokenizer.encode(PROMPTS[2])


def inject(monkeypatch, obj, name: str, when, error: Exception) -> list[tuple]:
    """Make `obj.name` raise `error` whenever `when(*args)` holds (the real call
    otherwise); returns the arguments of every call that raised."""
    real, raised = getattr(obj, name), []

    def faulty(*args):
        if when(*args):
            raised.append(args)
            raise error
        return real(*args)

    monkeypatch.setattr(obj, name, faulty)
    return raised


def poisoned(engine, plan) -> list:
    """The plan's sequences of the poisoned prompt."""
    poison = engine.tokenizer.encode(PROMPTS[2])
    return [q for q in plan.seqs if engine.scheduler.requests[q.request_id].prompt_token_ids == poison]


def assert_others_unchanged(outs, expected, failed: int = 2) -> None:
    assert [o.token_ids for i, o in enumerate(outs) if i != failed] == [e for i, e in enumerate(expected) if i != failed]


def assert_clean(engine) -> None:
    """Nothing of a failed request is left behind: no request, no running KV, no pinned slot."""
    s = engine.scheduler
    assert not (s.running or s.waiting or s.pending or s.requests)
    assert engine.cache.stats()["device_bytes_running_kv"] == 0
    engine.cache.check()  # every invariant of the cache's books
    assert not any(engine.slots.pinned(a) for a in engine.slots.resident())


def test_an_executor_fault_fails_only_its_request(llm, expected, monkeypatch):
    """The step with the poisoned row raises; the engine reruns it in parts and
    fails the poisoned request alone, with the others' tokens unchanged."""
    engine = llm.engine
    calls = []

    def when(plan) -> bool:
        calls.append(len(plan.seqs))
        return bool(poisoned(engine, plan))

    inject(monkeypatch, engine.executor, "execute", when, RuntimeError("injected executor fault"))
    outs = llm.generate(PROMPTS, GREEDY, adapter=ADAPTERS)
    for i, out in enumerate(outs):
        if i == 2:
            assert out.finished and out.finish_reason == "error" and out.token_ids == []
            assert out.error == "RuntimeError: injected executor fault"
        else:
            assert out.finish_reason == "length" and out.token_ids == expected[i], i
    assert calls[0] == 5 and max(calls[1:]) < 5  # the batch ran whole first, then in parts
    assert_clean(engine)
    monkeypatch.undo()  # the engine serves on, the poisoned prompt included
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY, adapter=ADAPTERS)] == expected


def test_a_fault_mid_decode_keeps_the_tokens_so_far(llm, expected, monkeypatch):
    engine, started = llm.engine, len(poison_ids(llm)) + 2  # the step after its third token
    inject(monkeypatch, engine.executor, "execute",
           lambda plan: any(q.start >= started for q in poisoned(engine, plan)), RuntimeError("late fault"))
    outs = llm.generate(PROMPTS, GREEDY, adapter=ADAPTERS)
    assert outs[2].finish_reason == "error" and outs[2].token_ids == expected[2][:3]
    assert_others_unchanged(outs, expected)
    assert_clean(engine)


def test_a_fault_that_depends_on_the_batch_fails_no_one(llm, expected, monkeypatch):
    """An out-of-memory at full batch size goes away in the halves."""
    raised = inject(monkeypatch, llm.engine.executor, "execute", lambda plan: len(plan.seqs) >= 4,
                    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    outs = llm.generate(PROMPTS, GREEDY, adapter=ADAPTERS)
    assert raised and [o.token_ids for o in outs] == expected and {o.finish_reason for o in outs} == {"length"}


def test_a_failed_requests_adapter_leaves_its_slot(llm, expected, monkeypatch):
    """Its load may have left the slot half written: the next request reloads it."""
    engine = llm.engine
    inject(monkeypatch, engine.executor, "execute", lambda plan: bool(poisoned(engine, plan)),
           RuntimeError("injected executor fault"))
    outs = llm.generate([PROMPTS[2], PROMPTS[1]], GREEDY, adapter=["r16", None])
    assert outs[0].finish_reason == "error" and outs[1].token_ids == expected[1]
    r16 = engine.adapters.by_name["r16"].id
    assert engine.slots.slot_of(r16) is None and r16 not in [a and a.id for a in engine.lora.bank.slots]
    monkeypatch.undo()
    assert llm.generate(PROMPTS[3], GREEDY, adapter="r16")[0].token_ids == expected[3]


def test_a_broken_device_stops_the_engine(llm, monkeypatch):
    """Every sequence fails and the probe fails too: not the requests' fault, so
    the step raises (the engine loop then dies and the server restarts)."""
    engine = llm.engine
    broken = RuntimeError("CUDA error: an illegal memory access was encountered")
    inject(monkeypatch, engine.executor, "execute", lambda *_: True, broken)
    inject(monkeypatch, engine.executor, "probe", lambda *_: True, broken)
    engine.add_request(PROMPTS[0], GREEDY)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        engine.step()
    monkeypatch.undo()
    for rid in list(engine.scheduler.requests):
        engine.abort(rid)
    assert_clean(engine)


def test_a_planning_fault_fails_only_its_request(llm, expected, monkeypatch):
    poison = poison_ids(llm)
    inject(monkeypatch, llm.engine.cache, "prepare", lambda req: req.prompt_token_ids == poison,
           KeyError("injected cache fault"))
    outs = llm.generate(PROMPTS, GREEDY, adapter=ADAPTERS)
    assert outs[2].finish_reason == "error" and "injected cache fault" in outs[2].error
    assert_others_unchanged(outs, expected)
    assert_clean(llm.engine)


def test_a_detokenizer_fault_fails_only_its_request(llm, expected, monkeypatch):
    poison = poison_ids(llm)
    inject(monkeypatch, llm.engine.detok, "update", lambda req: req.prompt_token_ids == poison,
           UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected"))
    outs = llm.generate(PROMPTS, GREEDY, adapter=ADAPTERS)
    assert outs[2].finish_reason == "error" and outs[2].error.startswith("UnicodeDecodeError")
    assert_others_unchanged(outs, expected)
    assert_clean(llm.engine)


def test_a_detokenizer_fault_on_the_last_token_is_still_an_error(llm, monkeypatch):
    poison = poison_ids(llm)
    inject(monkeypatch, llm.engine.detok, "update", lambda req: req.prompt_token_ids == poison and req.is_finished,
           ValueError("injected"))
    out = llm.generate(PROMPTS[2], GREEDY, adapter="r8")[0]
    assert out.finished and out.finish_reason == "error" and out.error == "ValueError: injected"
    assert_clean(llm.engine)


# -- sampling never raises -----------------------------------------------------

def test_degenerate_distributions_fall_back_to_the_most_likely_token():
    logits = torch.tensor([[0.0, 3.0, 1.0], [float("nan"), 2.0, 5.0], [float("-inf"), 7.0, float("inf")]])
    params = [SamplingParams(temperature=1.0, top_p=0.5), SamplingParams(temperature=1.0),
              SamplingParams(temperature=0.7, top_k=10**30)]
    gens = [torch.Generator().manual_seed(0) for _ in params]
    tokens = [t.token_id for t in sample(logits, params, gens)]
    assert tokens == [1, 2, 2]  # row 0 samples normally (top_p keeps only token 1); rows 1-2 fall back
    greedy = sample(torch.tensor([[float("nan"), 1.0, 4.0, float("nan")]]), [SamplingParams(temperature=0.0)],
                    [torch.Generator()])
    assert greedy[0].token_id == 2  # NaNs rank last for greedy rows too


def test_a_tiny_temperature_is_greedy(llm, expected):
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=8, temperature=1e-30, ignore_eos=True), adapter="r4")
    assert out[0].token_ids == expected[0]


@pytest.mark.parametrize("field, value", [("seed", 2**64), ("seed", -(2**63) - 1), ("stop_token_ids", [-1])])
def test_out_of_range_fields_are_refused_naming_the_field(field, value):
    with pytest.raises(InvalidRequest, match=field) as refused:
        SamplingParams(**{field: value})
    assert refused.value.field == field


def test_extreme_seeds_sample(llm):
    for seed in (2**64 - 1, -(2**63), 0):
        sp = SamplingParams(max_tokens=4, temperature=1.0, seed=seed, ignore_eos=True)
        a, b = (llm.generate("Hello", sp)[0].token_ids for _ in range(2))
        assert len(a) == 4 and a == b


# -- a dead engine loop ----------------------------------------------------------

def test_a_dead_engine_loop_answers_503_everywhere(llm, monkeypatch):
    """In process: the loop dies on a step; the request waiting on it gets a 503
    (not a hang), /health turns 503, new requests and adapter calls get 503,
    and the server is told to exit."""
    engine = llm.engine

    def broken_step():
        raise RuntimeError("injected engine loop fault")

    monkeypatch.setattr(engine, "step", broken_step)
    died = threading.Event()
    async_engine = AsyncEngine(engine, on_death=died.set)
    app = build_app(async_engine, "base")
    try:
        with TestClient(app) as c:
            assert c.get("/health").json() == {"status": "ok"}
            r = c.post("/v1/completions", json={"model": "r8", "prompt": "hi", "max_tokens": 4})
            assert r.status_code == 503 and "injected engine loop fault" in r.json()["error"]["message"]
            assert died.wait(timeout=30)
            health = c.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "dead"
            assert health.json()["error"]["type"] == "server_error"
            assert c.post("/v1/completions", json={"model": "base", "prompt": "x"}).status_code == 503
            r = c.post("/v1/unload_lora_adapter", json={"lora_name": "r4"})
            assert r.status_code == 503 and r.json()["error"]["code"] == 503
    finally:
        async_engine.shutdown()
    for rid in list(engine.scheduler.requests):  # what the dead loop left behind
        engine.abort(rid)


def test_tokenizing_a_long_prompt_does_not_block_the_event_loop(llm, monkeypatch):
    """Validation runs on a worker thread: /health answers while a prompt is
    still being tokenized (here held until /health has answered)."""
    engine = llm.engine
    real = engine.tokenizer.encode
    entered, release = threading.Event(), threading.Event()

    def slow_encode(text, *args):
        if "slow" in text:
            entered.set()
            assert release.wait(timeout=60), "/health never answered while the prompt was tokenized"
        return real(text, *args)

    monkeypatch.setattr(engine.tokenizer, "encode", slow_encode)
    async_engine = AsyncEngine(engine)
    try:
        with TestClient(build_app(async_engine, "base")) as c:
            result = {}
            t = threading.Thread(target=lambda: result.update(r=c.post("/v1/completions", json={
                "model": "base", "prompt": "slow prompt", "max_tokens": 2, "temperature": 0})))
            t.start()
            assert entered.wait(timeout=60)  # the prompt is being tokenized now
            assert c.get("/health").status_code == 200
            release.set()
            t.join(timeout=90)
            assert result["r"].status_code == 200, result["r"].text
    finally:
        release.set()
        async_engine.shutdown()


# -- over HTTP, in a real server process ----------------------------------------------

def start_fault_server(root: Path, fault: str, *extra, env: dict[str, str] | None = None
                       ) -> tuple[subprocess.Popen, str]:
    """The real server with `fault` injected (see tests/fault_server.py)."""
    script = str(Path(__file__).with_name("fault_server.py"))
    return start_server(root, "--served-model-name", "base", *extra, entry=(script,),
                        env={"LORASERVE_FAULT": fault, **(env or {})})


def test_over_http_a_poisoned_request_fails_alone(tiny, llm, expected):
    root = tiny("llama")
    lora = [a for n in ("r4", "r8", "r16") for a in ("--lora", f"{n}={root / 'adapters' / n}")]
    proc, url = start_fault_server(root, "execute:POISON", *lora)
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    try:
        results: dict[int, object] = {}

        def ask(i: int) -> None:
            model = ADAPTERS[i] or "base"
            kw = dict(model=model, prompt=PROMPTS[i], max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
            try:
                if i % 2:  # half of them stream
                    results[i] = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))
                else:
                    results[i] = client.completions.create(**kw).choices[0].text
            except openai.APIError as e:
                results[i] = e

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))] + [
            threading.Thread(target=lambda: results.update(s=_stream_error(client)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        tok = llm.engine.tokenizer
        for i in (0, 1, 3, 4):
            assert results[i] == tok.decode(expected[i]), i
        assert isinstance(results[2], openai.InternalServerError) and results[2].status_code == 500
        assert "injected executor fault" in results[2].message
        assert isinstance(results["s"], openai.APIError) and "injected executor fault" in results["s"].message
        assert httpx.get(url + "/health").json() == {"status": "ok"}
        metrics = httpx.get(url + "/metrics").text
        assert 'loraserve_requests_total{adapter="r8",finish_reason="error"} 2.0' in metrics
        assert client.completions.create(model="base", prompt=PROMPTS[0], max_tokens=2, temperature=0).choices
    finally:
        proc.kill()
        proc.wait(timeout=30)


def _stream_error(client) -> Exception | None:
    """A streamed poisoned request: the stream ends with an error event (raised by the client)."""
    try:
        for _ in client.completions.create(model="r8", prompt="more POISON", max_tokens=8, stream=True):
            pass
    except openai.APIError as e:
        return e
    return None


def test_a_dead_engine_loop_ends_waiting_requests_and_exits_non_zero(tiny):
    root = tiny("llama")
    proc, url = start_fault_server(root, "loop:KILL")
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    try:
        stream = iter(client.completions.create(model="base", prompt="a long one", max_tokens=400, stream=True,
                                                temperature=0, extra_body={"ignore_eos": True}))
        next(stream)  # running
        with pytest.raises(openai.APIStatusError) as killed:
            client.completions.create(model="base", prompt="KILL", max_tokens=2)
        assert killed.value.status_code == 503 and "injected engine loop fault" in killed.value.message
        with pytest.raises(openai.APIError, match="the engine has stopped"):
            for _ in stream:  # the waiting stream ends with an error event, not a hang
                pass
        assert proc.wait(timeout=60) == 1
        out = server_output(proc)
        assert "RuntimeError: injected engine loop fault" in out and "loraserve: error: the engine stopped" in out
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)


def test_a_stream_whose_adapter_is_unloaded_after_validation_ends_with_an_error_event(tiny, tmp_path):
    """The unload lands between the request's validation and its queueing: the
    stream (already answered 200) ends with an OpenAI error object, not silently."""
    root = tiny("llama")
    mark = tmp_path / "held"
    proc, url = start_fault_server(root, "hold:HOLD", "--lora", f"r8={root / 'adapters' / 'r8'}",
                                   env={"LORASERVE_FAULT_MARK": str(mark)})
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    try:
        result: dict[str, object] = {}

        def ask() -> None:
            chunks = []
            try:
                for chunk in client.completions.create(model="r8", prompt="HOLD on", max_tokens=4, stream=True):
                    chunks.append(chunk)
            except openai.APIError as e:
                result["error"] = e
            result["chunks"] = chunks

        asker = threading.Thread(target=ask)
        asker.start()
        deadline = time.monotonic() + 60
        while not mark.exists():
            assert time.monotonic() < deadline and asker.is_alive(), "the request never reached validation"
            time.sleep(0.01)
        assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "r8"}, timeout=60).status_code == 200
        asker.join(timeout=60)
        assert not asker.is_alive()
        assert result["chunks"] == []
        error = result["error"]
        assert isinstance(error, openai.APIError) and "'r8' was unloaded" in error.message
        assert error.body["type"] == "not_found_error" and error.body["code"] == 404
        assert client.completions.create(model="base", prompt="still here", max_tokens=2).choices
    finally:
        proc.kill()
        proc.wait(timeout=30)
