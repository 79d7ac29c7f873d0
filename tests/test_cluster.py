"""`loraserve serve --replicas 2`: two engine replicas on a local Ray Serve
instance behind one endpoint, in a subprocess, driven by the openai client.

Which replica served a request is read from the endpoint's own /metrics
(routing decisions and per-replica counters by replica id), so every check is
on values the endpoint reports, and every wait has a deadline. The endpoint
and everything Ray starts for it carry a marker in their environment; the
fixture kills whatever still carries it, so a failing test leaves nothing behind.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import shutil
import signal
import time
import uuid
from pathlib import Path

import httpx
import openai
import pytest

from loraserve import LLM, SamplingParams
from tests.test_server import server_output, start_server

ADAPTERS = ("r4", "r8", "r16")


def marked_pids(mark: str) -> list[int]:
    """Processes whose environment carries `mark` (the endpoint, Ray's daemons and workers)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if mark.encode() in (entry / "environ").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@contextlib.contextmanager
def running_cluster(root: Path, *extra: str):
    """`serve --replicas 2` with the test adapters and `extra` flags; yields (url, marker, process). However the
    tests end, the endpoint gets SIGINT and whatever still carries the marker (Ray's processes) SIGKILL."""
    mark = f"LORASERVE_TEST_CLUSTER={uuid.uuid4().hex}"
    args = ["--served-model-name", "base", "--replicas", "2", "--replica-cpus", "1", *extra]
    for name in ADAPTERS:
        args += ["--lora", f"{name}={root / 'adapters' / name}"]
    key, value = mark.split("=")
    proc = None
    try:
        proc, url = start_server(root, *args, env={key: value, "RAY_DEDUP_LOGS": "0"}, timeout=240)
        yield url, mark, proc
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except Exception:
                proc.kill()
        for pid in marked_pids(mark):  # whatever Ray left
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def cluster(tiny, tmp_path_factory):
    root = tiny("llama")
    lora_dir = tmp_path_factory.mktemp("cluster-loras")
    shutil.copytree(root / "adapters" / "r8", lora_dir / "late")
    with running_cluster(root, "--lora-dir", str(lora_dir)) as (url, _, proc):
        yield url, root, lora_dir, proc


@pytest.fixture()
def client(cluster):
    return openai.OpenAI(base_url=cluster[0] + "/v1", api_key="none", max_retries=0, timeout=120)


def scrape(url: str) -> dict[str, float]:
    """The endpoint's metrics as {series with labels: value}."""
    text = httpx.get(url + "/metrics", timeout=60).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\w+(?:\{[^}]*\})?) (\S+)$", text, re.M)}


def routed(url: str) -> dict[tuple[str, str], float]:
    """(replica, reason) → requests routed so far."""
    out = {}
    for series, value in scrape(url).items():
        m = re.fullmatch(r'loraserve_routed_requests_total\{reason="(\w+)",replica="(\w+)"\}', series)
        if m:
            out[m.group(2), m.group(1)] = value
    return out


def replica_series(url: str, name: str) -> dict[str, float]:
    return {m.group(1): v for s, v in scrape(url).items() if (m := re.fullmatch(name + r'\{replica="(\w+)"\}', s))}


def replica_pids(url: str, count: int = 2, within_s: float = 60.0) -> dict[str, float]:
    """Each replica's pid as /metrics reports it, once `count` replicas do (the endpoint asks a new
    replica who it is within a scrape's bound, so a busy one may be missing from a scrape or two)."""
    deadline = time.time() + within_s
    while len(pids := replica_series(url, "loraserve_replica_pid")) < count and time.time() < deadline:
        time.sleep(0.5)
    return pids


def served_by(url: str, before: dict) -> tuple[str, str]:
    """The one (replica, reason) whose count grew since `before`."""
    grown = [k for k, v in routed(url).items() if v > before.get(k, 0)]
    assert len(grown) == 1, grown
    return grown[0]


def test_greedy_outputs_equal_the_single_process_engine_for_mixed_adapters(cluster, client):
    url, root, _, _ = cluster
    offline = LLM(str(root / "model"), dtype="float32", adapters={n: str(root / "adapters" / n) for n in ADAPTERS})
    prompts = ["The quick brown fox", "Once upon a time", "In a galaxy far away", "Hello there"]
    jobs = [(p, m) for p in prompts for m in ("base", *ADAPTERS)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # concurrent: both replicas serve, in mixed batches
        texts = list(pool.map(lambda job: client.completions.create(
            model=job[1], prompt=job[0], max_tokens=10, temperature=0).choices[0].text, jobs))
    for (prompt, model), text in zip(jobs, texts):
        expected = offline.generate(prompt, SamplingParams(max_tokens=10, temperature=0.0),
                                    adapter=None if model == "base" else model)[0]
        assert text == expected.text, (prompt, model)
    assert len({replica for replica, _ in routed(url)}) == 2  # the load spread over both


def test_repeated_requests_for_an_adapter_stay_on_its_replica(cluster, client):
    url = cluster[0]
    before = routed(url)
    client.completions.create(model="r16", prompt="Tell me a story", max_tokens=4, temperature=0)
    home, _ = served_by(url, before)
    for _ in range(3):
        before = routed(url)
        client.completions.create(model="r16", prompt="Tell me a story", max_tokens=4, temperature=0)
        assert served_by(url, before) == (home, "adapter")


def test_a_sessions_next_turn_lands_where_its_history_is_and_reuses_it(cluster, client):
    url = cluster[0]
    history = [{"role": "user", "content": "Remember the number 41 and the colour blue. " * 6}]
    before = routed(url)
    first = client.chat.completions.create(model="r4", messages=history, max_tokens=8, temperature=0, user="s-1")
    home, _ = served_by(url, before)
    # another conversation, then the session's second turn (its prompt starts with the whole first turn)
    client.chat.completions.create(model="r8", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                   temperature=0, extra_headers={"X-Session-Id": "s-2"})
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "Which colour?"}]
    hits_before = replica_series(url, "loraserve_replica_prefix_cache_hits_total")
    before = routed(url)
    second = client.chat.completions.create(model="r4", messages=history, max_tokens=8, temperature=0, user="s-1")
    assert served_by(url, before) == (home, "session")
    hits = replica_series(url, "loraserve_replica_prefix_cache_hits_total")
    reused = hits[home] - hits_before.get(home, 0)
    assert reused >= 16 * (first.usage.prompt_tokens // 16)  # at least every full block of the first turn's prompt
    assert second.usage.prompt_tokens_details.cached_tokens == reused


def test_a_runtime_load_makes_the_adapter_servable_on_every_replica(cluster, client):
    url, root, lora_dir, _ = cluster
    loaded = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": str(lora_dir / "late")},
                        timeout=120)
    assert loaded.status_code == 200, loaded.text
    assert "late" in {m.id for m in client.models.list().data}
    reference = client.completions.create(model="r8", prompt="Hello there", max_tokens=40, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].text
    before = routed(url)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:  # at once: past the imbalance bound, both replicas serve
        texts = list(pool.map(lambda _: client.completions.create(
            model="late", prompt="Hello there", max_tokens=40, temperature=0,
            extra_body={"ignore_eos": True}).choices[0].text, range(6)))
    assert texts == [reference] * 6  # the same weights as r8, on either replica
    assert {r for (r, _), n in routed(url).items() if n > before.get((r, _), 0)} == set(replica_pids(url))
    bad = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(lora_dir / "none")},
                     timeout=120)
    assert bad.status_code == 400 and "bad" not in {m.id for m in client.models.list().data}
    assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "late"}, timeout=120).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="late", prompt="Hello", max_tokens=2)


def test_a_killed_replica_is_restarted_and_its_streams_end_with_an_error(cluster, client):
    url = cluster[0]
    pids = {int(v): r for r, v in replica_pids(url).items()}
    assert len(pids) == 2
    # two long streams: the least loaded replica takes each, so one runs on each replica
    streams = [client.completions.create(model="base", prompt="Count:", max_tokens=400, temperature=0,
                                         extra_body={"ignore_eos": True}, stream=True) for _ in range(2)]
    for s in streams:
        next(iter(s))
    running = replica_series(url, "loraserve_replica_requests_running")
    assert sorted(running.values()) == [1.0, 1.0], running
    victim = next(iter(pids))
    os.kill(victim, signal.SIGKILL)
    # the endpoint still lists the victim until Serve's controller notices: a scrape now asks it for its
    # stats, a call pinned to a replica that is gone; it must not stop the endpoint (it once spun Serve's
    # routing loop without yielding, and nothing else ran until the test gave up)
    assert replica_series(url, "loraserve_replica_requests_running")

    def finish(stream) -> str:
        try:
            for _ in stream:
                pass
            return "done"
        except openai.APIError as e:
            return f"error: {e}"

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        endings = list(pool.map(finish, streams, timeout=120))
    assert sorted(e.split(":")[0] for e in endings) == ["done", "error"], endings
    assert "replica serving this request stopped" in next(e for e in endings if e != "done")
    # requests not yet started go to the live replica meanwhile; Serve starts a new one in its place
    for _ in range(3):
        assert client.completions.create(model="r8", prompt="Hi", max_tokens=3).choices[0].text
    deadline, now = time.time() + 180, {}
    while time.time() < deadline:
        now = replica_series(url, "loraserve_replica_pid")
        if len(now) == 2 and victim not in {int(v) for v in now.values()}:
            break
        time.sleep(1)
    else:
        pytest.fail(f"no replacement replica within 180 s (victim {victim}): {now}; the endpoint printed:\n"
                    f"{server_output(cluster[3], 20_000)}")
    assert client.completions.create(model="r16", prompt="Hi", max_tokens=3).choices[0].text


# -- the disaggregated layout: a LoRA server actor every replica calls ----------------

@pytest.fixture(scope="module")
def disagg(tiny):
    root = tiny("llama")
    with running_cluster(root, "--lora-server-ranks", "1x2") as (url, mark, _):
        yield url, root, mark


def test_replicas_get_their_deltas_from_the_lora_server_ranks_which_come_back_after_a_kill(disagg):
    """Two pipeline ranks, each its own Ray actor. Killing rank 1 breaks the group, so rank 0 exits and
    Ray restarts the whole server; killing rank 0 restarts it too; each time at the same address."""
    url, root, mark = disagg
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    offline = LLM(str(root / "model"), dtype="float32", adapters={n: str(root / "adapters" / n) for n in ADAPTERS})

    def expected(model: str) -> str:
        return offline.generate("The quick brown fox", SamplingParams(max_tokens=8, temperature=0.0),
                                adapter=model)[0].text

    def ask(model: str) -> str:
        return client.completions.create(model=model, prompt="The quick brown fox", max_tokens=8,
                                         temperature=0).choices[0].text

    def actors(kind: bytes) -> list[int]:
        return [pid for pid in marked_pids(mark) if kind in Path(f"/proc/{pid}/cmdline").read_bytes()]

    assert {m.id for m in client.models.list().data} == {"base", *ADAPTERS}
    for model in ADAPTERS:
        assert ask(model) == expected(model)
    m = scrape(url)
    assert m["loraserve_lora_bank_bytes"] == 0  # the instances hold no adapter weights
    assert m["loraserve_remote_lora_steps_total"] >= len(ADAPTERS)
    rank0, rank1 = actors(b"LoraServerActor"), actors(b"LoraRankActor")
    assert len(rank0) == len(rank1) == 1 and rank0 != rank1
    for kind in (b"LoraRankActor", b"LoraServerActor"):
        before = actors(kind)
        os.kill(before[0], signal.SIGKILL)
        deadline, answer = time.time() + 180, None
        while time.time() < deadline:  # Ray restarts the server, with the adapter set loaded
            try:
                answer = ask("r8")
                break
            except openai.APIError:  # 503 while it is down
                time.sleep(1)
        assert answer == expected("r8")
        assert len(actors(kind)) == 1 and actors(kind) != before
    assert ask("base") == offline.generate("The quick brown fox", SamplingParams(max_tokens=8, temperature=0.0))[0].text
