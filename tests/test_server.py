"""The real server in a subprocess, driven by the official openai client."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import threading
import subprocess
import sys
import tempfile
import time

import httpx
import openai
import pytest

from loraserve import LLM, SamplingParams

API_KEY = "test-key"
SERVER_LOGS = tempfile.TemporaryDirectory(prefix="loraserve-test-servers-")
"""Where the servers' output goes (removed when the test process exits)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lora_dir(tiny, tmp_path_factory):
    """The only directory the server may load adapters from at runtime."""
    d = tmp_path_factory.mktemp("loras")
    shutil.copytree(tiny("llama") / "adapters" / "r8", d / "good")
    (d / "broken").mkdir()
    (d / "broken" / "adapter_config.json").write_text("{}")
    return d


def start_server(root, *extra, entry: tuple[str, ...] = ("-m", "loraserve.cli"),
                 env: dict[str, str] | None = None, timeout: float = 120) -> tuple[subprocess.Popen, str]:
    """`loraserve serve` (or another `entry` taking its arguments) on a free
    loopback port; returns the process and its URL. fp32 as the oracle, whatever
    --dtype auto would pick on this CPU (an `extra` --dtype wins)."""
    port = free_port()
    # its output goes to a file, never to a pipe nobody reads: a full pipe (64 KiB) would block the
    # server's next log line, and with it the event loop that serves every request
    with tempfile.NamedTemporaryFile("w", dir=SERVER_LOGS.name, suffix=".log", delete=False) as log:
        proc = subprocess.Popen([sys.executable, *entry, "serve", "--model", str(root / "model"), "--port", str(port),
                                 "--dtype", "float32", *extra], stdout=log, stderr=subprocess.STDOUT,
                                env=None if env is None else {**os.environ, **env})
    proc.log_path = log.name
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            httpx.get(url + "/health")
            return proc, url
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    proc.wait(timeout=30)
    pytest.fail("server did not start: " + server_output(proc))


def server_output(proc: subprocess.Popen, tail: int = 1 << 20) -> str:
    """What a server `start_server` started has printed so far (its last `tail` characters)."""
    with open(proc.log_path, errors="replace") as f:
        return f.read()[-tail:]



@pytest.fixture(scope="module")
def server(tiny, lora_dir):
    root = tiny("llama")
    args = ["--served-model-name", "base", "--api-key", API_KEY, "--lora-dir", str(lora_dir)]
    for name in ("r4", "r8", "r16"):
        args += ["--lora", f"{name}={root / 'adapters' / name}"]
    proc, url = start_server(root, *args)
    yield url, root
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def offline(server):
    root = server[1]
    return LLM(str(root / "model"), dtype="float32", adapters={n: str(root / "adapters" / n) for n in ("r4", "r8", "r16")})


def test_models_lists_base_and_adapters(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"base", "r4", "r8", "r16"}
    assert models["r8"].model_extra["parent"] == "base"


@pytest.mark.parametrize("model", ["base", "r4", "r16"])
def test_completion_equals_offline_engine(client, offline, model):
    resp = client.completions.create(model=model, prompt="The quick brown fox", max_tokens=12, temperature=0)
    expected = offline.generate("The quick brown fox", SamplingParams(max_tokens=12, temperature=0.0),
                                adapter=None if model == "base" else model)[0]
    assert resp.choices[0].text == expected.text
    assert resp.usage.completion_tokens == len(expected.token_ids)
    assert resp.usage.prompt_tokens == len(expected.prompt_token_ids)


def test_streaming_concatenates_to_the_same_text(client):
    kw = dict(model="r8", prompt="Once upon a time", max_tokens=16, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == full
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert all(c.usage is None for c in chunks)
    # stream_options.include_usage: one last chunk with no choices and the exact counts (as vLLM and OpenAI do)
    counted = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert counted[-1].choices == [] and "".join(c.choices[0].text for c in counted[:-1]) == full
    assert counted[-1].usage.completion_tokens == client.completions.create(**kw).usage.completion_tokens


def test_chat_and_chat_streaming(client, offline):
    messages = [{"role": "user", "content": "Say hi"}]
    resp = client.chat.completions.create(model="r16", messages=messages, max_tokens=10, temperature=0)
    tok = offline.engine.tokenizer
    prompt = tok.chat_tokens(messages)
    expected = offline.generate(prompt, SamplingParams(max_tokens=10, temperature=0.0), adapter="r16")[0]
    assert resp.choices[0].message.content == expected.text
    stream = client.chat.completions.create(model="r16", messages=messages, max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == expected.text


def test_n_seed_and_logprobs(client, offline):
    resp = client.completions.create(model="r4", prompt="Hello", max_tokens=6, temperature=1.0, seed=5, n=2,
                                     logprobs=2)
    again = client.completions.create(model="r4", prompt="Hello", max_tokens=6, temperature=1.0, seed=5, n=2,
                                      logprobs=2)
    assert [c.text for c in resp.choices] == [c.text for c in again.choices]
    offline_first = offline.generate("Hello", SamplingParams(max_tokens=6, temperature=1.0, seed=5), adapter="r4")[0]
    assert resp.choices[0].text == offline_first.text  # choice i uses seed + i
    lp = resp.choices[0].logprobs
    assert len(lp.token_logprobs) == 6 and all(v <= 0 for v in lp.token_logprobs)
    assert all(len(top) == 2 for top in lp.top_logprobs)


def test_concurrent_requests_for_several_adapters(client, offline):
    from concurrent.futures import ThreadPoolExecutor

    names = ["base", "r4", "r8", "r16"] * 3
    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(lambda m: client.completions.create(
            model=m, prompt="Count: 1 2 3", max_tokens=8, temperature=0).choices[0].text, names))
    for name, text in zip(names, texts):
        expected = offline.generate("Count: 1 2 3", SamplingParams(max_tokens=8, temperature=0.0),
                                    adapter=None if name == "base" else name)[0].text
        assert text == expected, name


def test_errors(server, client):
    with pytest.raises(openai.NotFoundError, match="the model 'nope' does not exist"):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="base", prompt="x", max_tokens=2, temperature=-1)
    with pytest.raises(openai.BadRequestError, match="exceeds the context length"):
        client.completions.create(model="base", prompt="x", max_tokens=100_000)
    bad = openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="invalid or missing API key"):
        bad.models.list()
    r = httpx.post(server[0] + "/v1/completions", content=b"{not json", headers={
        "authorization": f"Bearer {API_KEY}", "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"]
    # the server still serves after all of that
    assert client.completions.create(model="base", prompt="x", max_tokens=2, temperature=0).choices[0].text is not None


def post(server, path, body):
    return httpx.post(server[0] + path, json=body, headers={"authorization": f"Bearer {API_KEY}"}, timeout=60)


def metric(server, name: str) -> float:
    text = httpx.get(server[0] + "/metrics", headers={"authorization": f"Bearer {API_KEY}"}).text
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_load_and_unload_at_runtime(server, client, offline, lora_dir):
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "fresh", "lora_path": str(lora_dir / "good")})
    assert r.status_code == 200, r.text
    assert "fresh" in {m.id for m in client.models.list().data}
    text = client.completions.create(model="fresh", prompt="abc", max_tokens=6, temperature=0).choices[0].text
    assert text == offline.generate("abc", SamplingParams(max_tokens=6, temperature=0.0), adapter="r8")[0].text
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "fresh"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="fresh", prompt="abc", max_tokens=2)


def test_load_refusals(server, lora_dir, tiny):
    outside = str(tiny("llama") / "adapters" / "r4")
    traversal = str(lora_dir / ".." / "elsewhere")
    for path, status, message in [
        (outside, 403, "outside the allowed --lora-dir"),
        (traversal, 403, "outside the allowed --lora-dir"),
        (str(lora_dir / "broken"), 400, "missing adapter_model.safetensors"),
    ]:
        r = post(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": path})
        assert r.status_code == status and message in r.json()["error"]["message"], r.text
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "r4", "lora_path": str(lora_dir / "good")})
    assert r.status_code == 400 and "already loaded" in r.json()["error"]["message"]
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "nope"}).status_code == 404


def test_unload_waits_for_running_requests(server, client, lora_dir):
    assert post(server, "/v1/load_lora_adapter", {"lora_name": "busy", "lora_path": str(lora_dir / "good")}).status_code == 200
    results = []

    def ask():
        results.append(client.completions.create(model="busy", prompt="tell me", max_tokens=40, temperature=0,
                                                  extra_body={"ignore_eos": True}))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    deadline = time.time() + 30
    while metric(server, "loraserve_num_requests_running") < 1 and time.time() < deadline:
        time.sleep(0.02)
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "busy"}).status_code == 200
    for t in threads:
        t.join()
    assert len(results) == 4 and all(len(r.choices[0].text) > 0 and r.usage.completion_tokens == 40 for r in results)


def test_disconnect_frees_blocks_and_metrics_count(server, client):
    aborted = 'loraserve_requests_total{adapter="r16",finish_reason="abort"}'
    finished = 'loraserve_requests_total{adapter="r16",finish_reason="length"}'
    for _ in range(3):  # the tiny model can finish its 480 tokens before a loaded box reports the disconnect
        before = metric(server, aborted), metric(server, finished)
        stream = client.completions.create(model="r16", prompt="go on", max_tokens=480, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        next(iter(stream))
        stream.close()
        deadline = time.time() + 30  # the engine frees the blocks and the response counts the end, in either order
        while (metric(server, "loraserve_running_kv_blocks") > 0
               or (metric(server, aborted), metric(server, finished)) == before) and time.time() < deadline:
            time.sleep(0.05)
        assert metric(server, "loraserve_running_kv_blocks") == 0
        assert metric(server, "loraserve_num_requests_running") == 0
        if metric(server, finished) == before[1]:
            break
    assert metric(server, aborted) == before[0] + 1 and metric(server, finished) == before[1]
    assert metric(server, "loraserve_requests_total") > 0
    assert metric(server, "loraserve_time_to_first_token_seconds_count") > 0
    assert metric(server, "loraserve_lora_slot_hits_total") + metric(server, "loraserve_lora_slot_loads_total") > 0
    assert metric(server, "loraserve_swap_in_bytes_total") > 0
    info = 'loraserve_engine_info{device="cpu",dtype="float32",lora_dtype="float32",requested_dtype="float32"}'
    assert metric(server, info) == 1


def test_full_queue_answers_429(tiny):
    proc, url = start_server(tiny("llama"), "--max-num-seqs", "1", "--max-waiting", "1")
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    try:
        long = dict(model="model", prompt="hi", max_tokens=300, temperature=0, stream=True,
                    extra_body={"ignore_eos": True})
        running = iter(client.completions.create(**long))
        next(running)  # admitted: the only seat
        queued = []  # answers only once it runs, so it waits in a thread
        waiter = threading.Thread(target=lambda: queued.append(list(client.completions.create(**long))))
        waiter.start()
        deadline = time.time() + 30
        while metric((url,), "loraserve_num_requests_waiting") < 1 and time.time() < deadline:
            time.sleep(0.02)
        with pytest.raises(openai.RateLimitError, match="too many waiting requests") as refused:
            client.completions.create(model="model", prompt="x", max_tokens=2)
        assert refused.value.response.headers["retry-after"] == "1"
        running.close()
        waiter.join(timeout=120)
        assert queued[0][-1].choices[0].finish_reason == "length"  # nothing accepted was lost
    finally:
        proc.kill()
        proc.wait()


def test_sigterm_drains(tiny):
    """Running requests finish, new ones get 503, then the process exits (uvicorn
    re-raises the signal after its own shutdown, so the status is -SIGTERM)."""
    import signal

    proc, url = start_server(tiny("llama"))
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    # as long as the tiny model's 512 positions allow: the drain lasts while it runs (a few tenths of a
    # second on a fast CPU, so the refusal is asked for as soon as the signal is sent, not after a fixed sleep)
    stream = client.completions.create(model="model", prompt="hi", max_tokens=480, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    it = iter(stream)
    next(it)
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while True:  # a request that arrives before the signal is handled is served: ask again
        try:
            client.completions.create(model="model", prompt="new", max_tokens=1)
        except openai.APIStatusError as refused:
            assert refused.status_code == 503
            break
        assert time.monotonic() < deadline, "no 503 while draining"
    rest = list(it)
    assert rest[-1].choices[0].finish_reason == "length"
    assert proc.wait(timeout=60) in (0, -signal.SIGTERM)


def test_schema_fuzz_finds_no_server_errors(server):
    """schemathesis against the app's own OpenAPI spec, bounded in examples."""
    out = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", server[0] + "/openapi.json", "--checks", "not_a_server_error",
         "--max-examples", "25", "--phases", "examples,fuzzing", "--seed", "1",
         "-H", f"Authorization: Bearer {API_KEY}"],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:]
    assert re.search(r"\d+ generated, \d+ passed", out.stdout)


# -- hostile and odd input: a 4xx naming the field, the documented error shape, and the server serves on --

def test_out_of_range_fields_get_400_naming_the_field(server, client):
    big = "x" * 10_000_000  # refused before it is tokenized
    image = [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}]
    for path, body, field, says in [
        ("/v1/completions", {"seed": 2**64}, "seed", "less than or equal to 9223372036854775807"),
        ("/v1/completions", {"seed": 2**64 - 1, "n": 2}, "seed", "less than or equal"),
        ("/v1/completions", {"seed": -(2**63) - 1}, "seed", "greater than or equal"),
        ("/v1/completions", {"stop_token_ids": [10**9]}, "stop_token_ids", "must be in [0, "),
        ("/v1/completions", {"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ("/v1/completions", {"top_p": 0}, "top_p", "greater than 0"),
        ("/v1/completions", {"prompt": [[1, 2], [10**9]]}, "prompt", "token ids must be in"),
        ("/v1/completions", {"prompt": big}, "prompt", "(10000000 characters) cannot fit the context length"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role",
         "Input should be 'system'"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}, "messages.0",
         "a user message needs content"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": image}]}, "messages.0",
         "content[1]: parts of type 'image_url' are not supported"),
    ]:
        body = {"model": "base", "max_tokens": 2, **({} if "messages" in body else {"prompt": "x"}), **body}
        r = post(server, path, body)
        assert r.status_code == 400, (field, r.text)
        assert r.json()["error"]["param"] == field and says in r.json()["error"]["message"], r.text
    # a lone surrogate (JSON carries it as an unpaired escape) is named as such, not as a tokenizer error
    for path, raw in [("/v1/completions", b'{"model": "base", "prompt": "a\\ud800b"}'),
                      ("/v1/chat/completions", b'{"model": "base", "messages": [{"role": "user", "content": "\\udfff"}]}')]:
        r = httpx.post(server[0] + path, content=raw, headers={"authorization": f"Bearer {API_KEY}",
                                                               "content-type": "application/json"})
        assert r.status_code == 400 and "lone surrogate" in r.json()["error"]["message"], r.text
    # the edges that are valid sample: 64-bit seeds with n choices, a huge top_k, a tiny temperature
    edge = client.completions.create(model="base", prompt="x", max_tokens=3, n=2, seed=2**63 - 1, top_p=0.9,
                                     extra_body={"top_k": 10**30, "ignore_eos": True})
    assert [len(c.text) > 0 for c in edge.choices] == [True, True]
    greedy = client.completions.create(model="base", prompt="x", max_tokens=4, temperature=0)
    assert client.completions.create(model="base", prompt="x", max_tokens=4, temperature=1e-30,
                                     seed=-(2**63)).choices[0].text == greedy.choices[0].text
    assert httpx.get(server[0] + "/health").json() == {"status": "ok"}


def test_every_error_has_the_documented_shape(server):
    auth = {"authorization": f"Bearer {API_KEY}"}
    deep = b"[" * 100_000 + b"]" * 100_000
    for method, path, body, status, says in [
        ("POST", "/v1/completions", b'{"model": "base", "prompt": "\xff\xfe"}', 400, "UnicodeDecodeError"),
        ("POST", "/v1/completions", deep, 400, "RecursionError"),
        ("POST", "/v1/completions", b"{not json", 400, "JSON"),
        ("GET", "/v2/nothing", None, 404, "Not Found"),
        ("DELETE", "/v1/models", None, 405, "Method Not Allowed"),
    ]:
        r = httpx.request(method, server[0] + path, content=body, headers={**auth, "content-type": "application/json"})
        err = r.json()["error"]
        assert r.status_code == status and err["code"] == status and says in err["message"], r.text
        assert set(err) == {"message", "type", "param", "code"}


def test_the_api_key_guards_every_path_but_health(server):
    for path in ("/metrics", "/docs", "/redoc", "/openapi.json", "/v1/models"):
        r = httpx.get(server[0] + path)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", path
        assert httpx.get(server[0] + path, headers={"authorization": f"Bearer {API_KEY}"}).status_code == 200, path
    assert httpx.get(server[0] + "/health").status_code == 200


def test_public_metrics_flag(tiny):
    proc, url = start_server(tiny("llama"), "--api-key", API_KEY, "--public-metrics")
    try:
        assert httpx.get(url + "/metrics").status_code == 200
        assert httpx.get(url + "/openapi.json").status_code == 401
    finally:
        proc.kill()
        proc.wait()


def test_adapter_names_are_checked(server):
    for name in ("../x", "x" * 100_000, 'a"b', "a\nb", "a b", "a/./b", "-x"):
        r = post(server, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": "/nonexistent"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name", r.text
        assert "is not allowed" in r.json()["error"]["message"]
    assert "x" * 1000 not in httpx.get(server[0] + "/metrics", headers={"authorization": f"Bearer {API_KEY}"}).text


def test_an_adapter_whose_config_lies_about_its_rank_is_refused(server, lora_dir):
    lying = lora_dir / "lying"
    shutil.copytree(lora_dir / "good", lying)
    config = json.loads((lying / "adapter_config.json").read_text())
    (lying / "adapter_config.json").write_text(json.dumps({**config, "r": 16}))  # its tensors are rank 8
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "lying", "lora_path": str(lying)})
    assert r.status_code == 400 and "says rank 16" in r.json()["error"]["message"], r.text
    assert "rank 8" in r.json()["error"]["message"]


def test_concurrent_unloads_of_one_adapter(server, lora_dir):
    """Both race past the name check; the one that loses gets a JSON 404, not a 500."""
    from concurrent.futures import ThreadPoolExecutor

    for _ in range(3):
        load = post(server, "/v1/load_lora_adapter", {"lora_name": "twice", "lora_path": str(lora_dir / "good")})
        assert load.status_code == 200, load.text
        with ThreadPoolExecutor(2) as pool:
            replies = list(pool.map(lambda _: post(server, "/v1/unload_lora_adapter", {"lora_name": "twice"}),
                                    range(2)))
        assert sorted(r.status_code for r in replies) == [200, 404], [r.text for r in replies]
        missing = next(r for r in replies if r.status_code == 404).json()["error"]
        assert missing["type"] == "not_found_error" and "no adapter named 'twice'" in missing["message"]


def test_cached_tokens_in_usage_and_prefix_cache_counters(server, client):
    """The second ask of a prompt reports the tokens served from cached KV, in
    the response, the stream's usage chunk and chat alike; /metrics counts the
    same tokens at once (the scrape snapshots the engine, busy or idle)."""
    queries, hits = "loraserve_prefix_cache_queries_total", "loraserve_prefix_cache_hits_total"
    q0, h0 = metric(server, queries), metric(server, hits)
    prompt = "A prompt seen twice, long enough to fill several KV blocks: " + "one two three four " * 8
    first = client.completions.create(model="r4", prompt=prompt, max_tokens=2, temperature=0)
    n = first.usage.prompt_tokens
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert metric(server, queries) - q0 == n and metric(server, hits) == h0
    second = client.completions.create(model="r4", prompt=prompt, max_tokens=2, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < n and cached % 16 == 0  # whole blocks, never the last prompt token
    assert metric(server, queries) - q0 == 2 * n and metric(server, hits) - h0 == cached
    # another adapter's KV is never matched
    other = client.completions.create(model="r8", prompt=prompt, max_tokens=2, temperature=0)
    assert other.usage.prompt_tokens_details.cached_tokens == 0
    chunks = list(client.completions.create(model="r4", prompt=prompt, max_tokens=2, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == cached
    messages = [{"role": "user", "content": prompt}]
    client.chat.completions.create(model="r4", messages=messages, max_tokens=2, temperature=0)
    chat = client.chat.completions.create(model="r4", messages=messages, max_tokens=2, temperature=0)
    assert chat.usage.prompt_tokens_details.cached_tokens >= cached
    assert metric(server, "loraserve_adapter_cache_hits_total") + metric(
        server, "loraserve_adapter_cache_misses_total") >= 6
