"""Hostile input (issue 17): adapter files that lie, requests past the documented
limits, bodies too large to parse. Each is refused with a 4xx naming the
problem, without allocating what it claims, and the server serves on."""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import zmq

from loraserve.lora.adapter import load_adapter
from loraserve.lora import files
from loraserve.lora.files import AdapterError, content_id
from loraserve.model.spec import ModelSpec
from loraserve.remote.protocol import PROTOCOL_VERSION
from loraserve.server.limits import (MAX_LOGPROBS, MAX_MESSAGES, MAX_N, MAX_PROMPTS, MAX_STOP, MAX_STOP_CHARS,
                                     MAX_STOP_TOKEN_IDS, ServerLimits)
from tests.test_remote import LoraServerProc, ask
from tests.test_server import start_server

API_KEY = "hostile-key"
AUTH = {"authorization": f"Bearer {API_KEY}"}
CLAIM = 1 << 42
"""What the lying header claims: 4 TiB, which no test machine could allocate."""


def lie_about_size(path: Path) -> None:
    """A weights file whose one tensor claims CLAIM bytes; the file holds 16."""
    header = json.dumps({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": {
        "dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, CLAIM]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))


def hostile_adapters(good: Path, outside: Path, into: Path) -> dict[str, str]:
    """Adapters in `into` (a --lora-dir), each wrong one way → what its refusal must say."""
    cases = {}
    for name in ("huge_claim", "header_len", "big_config", "weights_link", "config_link"):
        shutil.copytree(good, into / name)
    lie_about_size(into / "huge_claim" / files.WEIGHTS)
    cases["huge_claim"] = f"claims bytes 0..{CLAIM}, but the file holds only 16 bytes"
    (into / "header_len" / files.WEIGHTS).write_bytes(struct.pack("<Q", CLAIM) + b"{}")
    cases["header_len"] = f"the header length {CLAIM} is beyond the file's 10 bytes"
    os.truncate(into / "big_config" / files.CONFIG, 2 << 30)  # sparse: no disk used
    cases["big_config"] = f"adapter_config.json is {2 << 30} bytes, more than the {files.MAX_CONFIG_BYTES}"
    for name, f in (("weights_link", files.WEIGHTS), ("config_link", files.CONFIG)):
        (into / name / f).unlink()
        (into / name / f).symlink_to(outside / f)
        cases[name] = f"{f} is a link to {outside / f}, outside the allowed --lora-dir"
    return cases


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def hostile_dir(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile-loras")
    root = tiny("llama")
    return d, hostile_adapters(root / "adapters" / "r8", (root / "adapters" / "r4").resolve(), d)


@pytest.fixture(scope="module")
def server(tiny, hostile_dir):
    """The default body limit (the story's 64 MiB request meets it), a key, and a --lora-dir of hostile adapters."""
    proc, url = start_server(tiny("llama"), "--served-model-name", "base", "--api-key", API_KEY,
                             "--lora-dir", str(hostile_dir[0]))
    try:
        yield url, proc
    finally:
        proc.kill()
        proc.wait(timeout=30)


def post(url: str, path: str, body=None, timeout: float = 60, **kw) -> httpx.Response:
    return httpx.post(url + path, json=body, headers=AUTH, timeout=timeout, **kw)


def serves(url: str) -> None:
    """A normal request still gets its answer."""
    client = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    assert client.completions.create(model="base", prompt="x", max_tokens=2, temperature=0).choices[0].text


# -- adapter files --------------------------------------------------------------------


def test_hostile_adapter_files_get_400_naming_the_problem(server, hostile_dir):
    url, proc = server
    d, cases = hostile_dir
    before = rss_bytes(proc.pid)
    for name, says in cases.items():
        r = post(url, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(d / name)})
        assert r.status_code == 400 and says in r.json()["error"]["message"], (name, r.text)
        assert r.json()["error"]["param"] == "lora_path"
        serves(url)
    if not (d / "dir_link").exists():  # the adapter directory itself a link out: the path is resolved first
        (d / "dir_link").symlink_to(Path(cases["weights_link"].split(" is a link to ")[1].split(",")[0]).parent)
    r = post(url, "/v1/load_lora_adapter", {"lora_name": "dir_link", "lora_path": str(d / "dir_link")})
    assert r.status_code == 403 and "outside the allowed --lora-dir" in r.json()["error"]["message"], r.text
    assert rss_bytes(proc.pid) - before < 1 << 30  # nothing near the claimed 4 TiB or 2 GiB was allocated
    assert {m["id"] for m in httpx.get(url + "/v1/models", headers=AUTH).json()["data"]} == {"base"}


def test_a_directory_changing_under_loads_is_loaded_consistently_or_refused(server, hostile_dir, tiny):
    """A writer swaps two versions of each file while the server loads the
    directory again and again: each load is refused as changed, or its id is the
    hash of one config and one weights file as they were (never of bytes mixed
    from two writes)."""
    url, _ = server
    good = tiny("llama") / "adapters"
    d = hostile_dir[0] / "moving"
    shutil.copytree(good / "r8", d)
    versions = []
    for alpha, source in ((16, "r8"), (32, "r8")):
        config = json.loads((good / source / files.CONFIG).read_text()) | {"lora_alpha": alpha}
        versions.append((json.dumps(config).encode(), config))
    weights = [(good / "r8" / files.WEIGHTS).read_bytes()]
    weights.append(weights[0][:-4] + bytes(4))  # the last float of the last tensor zeroed: other bytes
    ids = {content_id(config, w) for _, config in versions for w in weights}
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            i += 1
            for name, data in ((files.CONFIG, versions[i % 2][0]), (files.WEIGHTS, weights[(i // 2) % 2])):
                tmp = d / (name + ".tmp")
                tmp.write_bytes(data)
                os.replace(tmp, d / name)
                with open(d / name, "r+b") as f:  # and rewritten in place, with its own bytes
                    f.write(data[:1])

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    outcomes = []
    try:
        for i in range(20):
            r = post(url, "/v1/load_lora_adapter", {"lora_name": f"moving{i}", "lora_path": str(d)})
            if r.status_code == 200:
                assert r.json()["id"] in ids, r.text
                assert post(url, "/v1/unload_lora_adapter", {"lora_name": f"moving{i}"}).status_code == 200
            else:
                assert r.status_code == 400 and "changed while it was read" in r.json()["error"]["message"], r.text
            outcomes.append(r.status_code)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert len(outcomes) == 20
    serves(url)


@pytest.fixture()
def adapter_copy(tiny, tmp_path):
    root = tiny("llama")
    shutil.copytree(root / "adapters" / "r8", tmp_path / "ad")
    return tmp_path / "ad", ModelSpec.from_dir(root / "model"), root


def test_a_file_replaced_between_reads_is_refused(adapter_copy, monkeypatch):
    """Deterministically, the case the concurrent test above may or may not hit:
    each file replaced after the other has been read."""
    path, spec, root = adapter_copy
    original = files._read_config
    for name in (files.CONFIG, files.WEIGHTS):
        def replace_after_config(p, f, size, name=name):
            config = original(p, f, size)
            data = (path / name).read_bytes()
            (path / "tmp").write_bytes(data)
            os.replace(path / "tmp", path / name)  # same bytes, another file
            return config

        monkeypatch.setattr(files, "_read_config", replace_after_config)
        with pytest.raises(AdapterError, match=f"{name} changed while it was read"):
            load_adapter(path, spec, max_rank=64)
    monkeypatch.setattr(files, "_read_config", original)
    adapter = load_adapter(path, spec, max_rank=64)  # left alone, it loads: its id is of the bytes read
    assert adapter.id == content_id(json.loads((path / files.CONFIG).read_text()),
                                    (path / files.WEIGHTS).read_bytes())


def test_adapter_files_are_checked_against_the_file_before_reading(adapter_copy, tmp_path):
    path, spec, root = adapter_copy
    lie_about_size(path / files.WEIGHTS)
    with pytest.raises(AdapterError, match=f"claims bytes 0..{CLAIM}"):
        load_adapter(path, spec, max_rank=64)
    header = json.dumps({"x.lora_A.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 60]}}).encode()
    (path / files.WEIGHTS).write_bytes(struct.pack("<Q", len(header)) + header + bytes(64))
    with pytest.raises(AdapterError, match=r"of shape \[4, 4\] needs 64 bytes, but its data_offsets span 60"):
        load_adapter(path, spec, max_rank=64)
    (path / files.CONFIG).write_text("[1, 2]")
    with pytest.raises(AdapterError, match="adapter_config.json is not a JSON object"):
        load_adapter(path, spec, max_rank=64)
    # a link out is fine for the operator's own paths, refused where the files must lie within a directory
    link = tmp_path / "linked"
    link.mkdir()
    for name in (files.CONFIG, files.WEIGHTS):
        (link / name).symlink_to(root / "adapters" / "r8" / name)
    assert load_adapter(link, spec, max_rank=64).rank == 8
    with pytest.raises(AdapterError, match=f"{files.CONFIG} is a link to .*outside the allowed --lora-dir"):
        load_adapter(link, spec, max_rank=64, within=[tmp_path.resolve()])


def test_the_lora_server_refuses_hostile_adapter_files(tiny, tmp_path):
    """The LoRA server reads adapters with the same code: the same refusals, and it serves on."""
    root = tiny("llama")
    outside, loras = tmp_path / "elsewhere", tmp_path / "loras"
    shutil.copytree(root / "adapters" / "r4", outside)  # not under the server's other --lora-dir (the tiny's adapters)
    loras.mkdir()
    cases = hostile_adapters(root / "adapters" / "r8", outside.resolve(), loras)
    server = LoraServerProc(root, "--lora-dir", str(loras))
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.endpoint)
    try:
        for i, (name, says) in enumerate(cases.items()):
            load = {"v": PROTOCOL_VERSION, "kind": "load", "id": i, "name": name, "path": str(loras / name)}
            reply = ask(sock, [json.dumps(load).encode()])
            assert reply["kind"] == "error" and reply["status"] == 400 and says in reply["message"], reply
        assert ask(sock, [json.dumps({"v": PROTOCOL_VERSION, "kind": "ping", "id": 99}).encode()])["kind"] == "ping"
    finally:
        sock.close(0)
        server.kill()


# -- requests ---------------------------------------------------------------------------


def test_the_body_limit_is_a_flag(tiny):
    proc, url = start_server(tiny("llama"), "--served-model-name", "base", "--api-key", API_KEY,
                             "--max-request-bytes", "1KiB")
    try:
        r = post(url, "/v1/completions", {"model": "base", "prompt": "x" * 1024, "max_tokens": 2})
        assert r.status_code == 413 and "limit of 1024 bytes" in r.json()["error"]["message"], r.text
        serves(url)
        metrics = httpx.get(url + "/metrics", headers=AUTH).text
        assert 'loraserve_request_errors_total{status="413"} 1.0' in metrics
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_fields_past_the_documented_limits_get_400_naming_them(server):
    url, _ = server
    for path, body, field, says in [
        ("/v1/completions", {"stop": ["s"] * (MAX_STOP + 1)}, "stop", f"at most {MAX_STOP} stop strings"),
        ("/v1/completions", {"stop": "s" * (MAX_STOP_CHARS + 1)}, "stop", f"at most {MAX_STOP_CHARS} characters"),
        ("/v1/completions", {"stop_token_ids": [1] * (MAX_STOP_TOKEN_IDS + 1)}, "stop_token_ids",
         f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids, not {MAX_STOP_TOKEN_IDS + 1}"),
        ("/v1/completions", {"n": MAX_N + 1}, "n", f"less than or equal to {MAX_N}"),
        ("/v1/completions", {"logprobs": MAX_LOGPROBS + 1}, "logprobs", f"less than or equal to {MAX_LOGPROBS}"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": MAX_LOGPROBS + 1}, "top_logprobs",
         f"less than or equal to {MAX_LOGPROBS}"),
        ("/v1/completions", {"max_tokens": 10**30}, "max_tokens", "exceeds the context length"),
        ("/v1/completions", {"prompt": ["x"] * (MAX_PROMPTS + 1)}, "prompt",
         f"at most {MAX_PROMPTS} prompts, not {MAX_PROMPTS + 1}"),
    ]:
        base = {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "x"}
        r = post(url, path, {"model": "base", "max_tokens": 2, **base, **body})
        assert r.status_code == 400, (field, r.text)
        assert r.json()["error"]["param"] == field and says in r.json()["error"]["message"], r.text
    # the limits themselves are accepted
    r = post(url, "/v1/completions", {"model": "base", "prompt": "x", "max_tokens": 2, "n": MAX_N,
                                       "logprobs": MAX_LOGPROBS, "stop": ["s" * MAX_STOP_CHARS] * MAX_STOP,
                                       "stop_token_ids": [1] * MAX_STOP_TOKEN_IDS})
    assert r.status_code == 200 and len(r.json()["choices"]) == MAX_N, r.text


def test_a_huge_request_neither_stalls_health_nor_balloons(server):
    """The issue's story: a 64 MiB prompt once left /health unanswered for minutes
    and the server at 13 GiB. Now: it is over the body limit and refused unread
    (413), as is a chunked body past the limit; the largest prompts under it
    (text, chat, token ids: the most JSON values a body can hold) are refused
    without tokenizing (400), and /health answers throughout."""
    url, proc = server
    limit = ServerLimits().max_request_bytes
    under = "x" * (limit - 1024)
    ids = [1] * ((limit - 1024) // 2)  # the most JSON values a body under the limit can hold
    cases = [  # (path, body, status, field, what the message says); built before the clock starts
        ("/v1/completions", {"prompt": "x" * (64 << 20)}, 413, None, "--max-request-bytes"),  # the prompt
        ("/v1/completions", {"prompt": under}, 400, "prompt", "cannot fit the context length"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": under}]}, 400, "messages",
         "cannot fit the context length"),
        ("/v1/completions", {"prompt": ids}, 400, "max_tokens", f"prompt ({len(ids)} tokens) plus max_tokens"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}] * (limit // 33)}, 400, "messages",
         f"at most {MAX_MESSAGES} messages"),  # 31 bytes a message
    ]
    bodies = [json.dumps({"model": "base", **body}, separators=(",", ":")).encode() for _, body, *_ in cases]
    assert [len(b) > limit for b in bodies] == [status == 413 for _, _, status, *_ in cases]

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"model": "base", "prompt": "'
        for _ in range(limit // (1 << 20) + 1):
            yield b"x" * (1 << 20)
        yield b'"}'

    before = rss_bytes(proc.pid)
    slowest, peak, statuses, stop = [0.0], [before], [], threading.Event()

    def poll_health():
        while not stop.is_set():
            start = time.monotonic()
            try:
                statuses.append(httpx.get(url + "/health", timeout=30).status_code)
            except httpx.HTTPError as e:
                statuses.append(repr(e))
            slowest[0] = max(slowest[0], time.monotonic() - start)
            peak[0] = max(peak[0], rss_bytes(proc.pid))
            time.sleep(0.05)

    poller = threading.Thread(target=poll_health, daemon=True)
    poller.start()
    headers = {**AUTH, "content-type": "application/json"}
    try:
        for (path, _, status, field, says), content in zip(cases, bodies):
            start = time.monotonic()
            r = httpx.post(url + path, content=content, headers=headers, timeout=120)
            assert r.status_code == status and r.json()["error"]["param"] == field and says in r.text, r.text
            print(f"{path} {len(content) >> 20} MiB: {status} in {time.monotonic() - start:.2f} s")
        r = httpx.post(url + "/v1/completions", content=chunks(), headers=headers, timeout=120)
        assert r.status_code == 413 and "--max-request-bytes" in r.text, r.text
        serves(url)
    finally:
        stop.set()
        poller.join(timeout=60)
    print(f"slowest /health {slowest[0]:.2f} s of {len(statuses)}; RSS {before >> 20} -> peak {peak[0] >> 20} MiB")
    assert statuses and set(statuses) == {200}, statuses
    # the server left /health unanswered for over two minutes; a 2-core box loaded by other work
    # (measured: 0.7 s at load 6, more under a benchmark at higher priority) answers well within this
    assert slowest[0] < 20.0, slowest
    assert peak[0] - before < 2 << 30, (before, peak)  # a few copies of the largest body, not gigabytes
