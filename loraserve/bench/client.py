"""Replay a workload against any OpenAI-compatible server and time every token.

Each session runs as one asyncio task: its first turn is sent `turn.time`
seconds after the start, each later turn `turn.time` seconds after the
previous reply finished, with the whole conversation so far as its prompt
(previous prompt + reply + new input), the way a chat client resends
history. Streaming `/completions` with `ignore_eos` makes output lengths the
workload's, so every system under test does the same work. A failed turn ends
its session: later turns are recorded as skipped (failed), not sent.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import httpx
from tqdm import tqdm

from loraserve.bench.metrics import RequestRecord
from loraserve.bench.scrape import scrape
from loraserve.workload import Turn, Workload, input_text


class StreamError(Exception):
    """The server answered, but not with a complete stream."""


@dataclass
class BenchResult:
    records: list[RequestRecord]
    """One per turn, in (session, turn) order."""

    duration: float
    """Wall seconds from the start of the replay to the last reply."""

    metrics: list[dict] = field(default_factory=list)
    """Scraped /metrics samples: `{"t": s, "<name>{<labels>}": value}`."""

    def to_dict(self) -> dict:
        return {"duration_s": self.duration, "records": [asdict(r) for r in self.records], "metrics": self.metrics}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


@dataclass
class _Run:
    """What every session task shares."""

    http: httpx.AsyncClient
    clock: Callable[[], float]
    base_model: str
    seed: int
    bar: tqdm


async def run_workload(workload: Workload, base_url: str, base_model: str = "base", *, api_key: str | None = None,
                       metrics_url: str | None = None, scrape_interval: float = 1.0, progress: bool = True,
                       timeout: float = 600.0) -> BenchResult:
    """Replay `workload` against `base_url` (e.g. http://127.0.0.1:8000/v1); turns
    without an adapter go to `base_model`. `timeout` bounds the wait for each
    next chunk, not the whole request."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers, limits=limits,
                                 timeout=httpx.Timeout(timeout, connect=10.0)) as http:
        start = time.perf_counter()

        def clock() -> float:
            return time.perf_counter() - start

        series: list[dict] = []
        stop = asyncio.Event()
        scraper = asyncio.create_task(scrape(http, metrics_url, clock, scrape_interval, stop, series)) \
            if metrics_url else None
        with tqdm(total=workload.num_requests, disable=not progress, unit="req", desc="bench") as bar:
            run = _Run(http, clock, base_model, workload.seed, bar)
            per_session = await asyncio.gather(*(_session(run, turns) for turns in workload.sessions()))
        duration = clock()
        stop.set()
        if scraper is not None:
            await scraper
    return BenchResult([r for recs in per_session for r in recs], duration, series)


def run_workload_sync(workload: Workload, base_url: str, base_model: str = "base", **kw) -> BenchResult:
    """`run_workload` from synchronous code (not from inside a running event loop)."""
    return asyncio.run(run_workload(workload, base_url, base_model, **kw))


async def _session(run: _Run, turns: list[Turn]) -> list[RequestRecord]:
    records: list[RequestRecord] = []
    prompt, prompt_len, send_at = "", 0, turns[0].time
    for turn in turns:
        if records and not records[-1].ok:
            records.append(_record(turn, run.clock(), prompt_len, f"skipped: {records[-1].id} failed"))
            run.bar.update(1)
            continue
        await asyncio.sleep(max(0.0, send_at - run.clock()))
        prompt += input_text(run.seed, turn.session, turn.turn, turn.input_len)
        prompt_len += turn.input_len
        rec, reply = await _request(run, turn, prompt, prompt_len)
        records.append(rec)
        run.bar.update(1)
        if rec.ok and len(records) < len(turns):
            prompt += reply
            prompt_len = rec.input_len + rec.output_len
            send_at = rec.finish + turns[len(records)].time
    return records


def _record(turn: Turn, now: float, input_len: int, error: str | None = None) -> RequestRecord:
    return RequestRecord(turn.id, turn.session, turn.turn, turn.adapter, now, None, None, [], input_len, 0, error)


async def _request(run: _Run, turn: Turn, prompt: str, prompt_len: int) -> tuple[RequestRecord, str]:
    """Send one turn and time its stream; the record and the reply text.
    `prompt_len` (the workload's estimate) is replaced by the server's usage count when it sends one."""
    body = {"model": turn.adapter or run.base_model, "prompt": prompt, "max_tokens": turn.output_len,
            "temperature": 0, "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True},
            "user": f"session-{turn.session}"}  # OpenAI's end-user field: a session-aware router keeps turns together
    rec = _record(turn, run.clock(), prompt_len)
    parts: list[str] = []
    try:
        usage = await _stream(run, body, rec, parts)
    except (httpx.HTTPError, StreamError, ValueError, KeyError, TypeError) as e:
        rec.error = f"{type(e).__name__}: {e}"[:300]
        rec.output_len = len(rec.token_times)
        return rec, ""
    rec.finish = run.clock()
    rec.first_token = rec.token_times[0]
    rec.output_len = int(usage.get("completion_tokens") or len(rec.token_times))
    rec.input_len = int(usage.get("prompt_tokens") or prompt_len)
    return rec, "".join(parts)


async def _stream(run: _Run, body: dict, rec: RequestRecord, parts: list[str]) -> dict:
    """Read the SSE stream into `parts` and `rec.token_times`; the usage, if sent."""
    usage: dict = {}
    async with run.http.stream("POST", "/completions", json=body) as resp:
        if resp.status_code != 200:
            detail = (await resp.aread()).decode(errors="replace").strip()
            raise StreamError(f"HTTP {resp.status_code}: {detail[:200]}")
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                if not parts:
                    raise StreamError("the stream ended without any text")
                return usage
            chunk = json.loads(data)
            if chunk.get("error"):
                raise StreamError(str(chunk["error"])[:200])
            text = "".join(c.get("text") or "" for c in chunk.get("choices") or [])
            if text:
                rec.token_times.append(run.clock())
                parts.append(text)
            usage = chunk.get("usage") or usage
    raise StreamError("the stream ended before [DONE]")
