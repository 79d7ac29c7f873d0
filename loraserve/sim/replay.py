"""Replays a Workload through an engine on the engine's own clock.

The same loop drives the real LLMEngine (wall clock, or virtual time when
paced) and the SimEngine. On a ManualClock, time jumps to the next event
(an arrival, a copy ending, the swapper's next pass) whenever nothing runs;
on a wall clock it sleeps instead.
"""

from __future__ import annotations

import heapq
import time
from typing import Callable

from loraserve.clock import ManualClock
from loraserve.request import Request
from loraserve.sampling import SamplingParams
from loraserve.workload import Workload, input_ids


def replay(engine, workload: Workload, progress=None, monitor: Callable[[float], None] | None = None,
           every: float = 1.0, step_times: list[float] | None = None, max_steps: int = 100_000_000) -> list[Request]:
    """Run every turn; returns the finished requests (arrival = the turn's due time).
    `monitor(seconds since start)` is called about every `every` seconds; the wall
    time of each engine step (scheduling and bookkeeping included) is appended
    to `step_times` if given."""
    clock = engine.clock
    manual = isinstance(clock, ManualClock)
    t0 = clock.now()
    sessions = {s[0].session: s for s in workload.sessions()}
    events = [(t0 + s[0].time, s[0].session, 0, input_ids(workload.seed, s[0].session, 0, s[0].input_len))
              for s in sessions.values()]
    heapq.heapify(events)
    live: dict[str, tuple[int, int, Request]] = {}
    done: list[Request] = []
    interval = engine.cache.config.swap_interval or 0.1
    idle, next_look = 0, t0
    for _ in range(max_steps):
        if not events and not engine.has_unfinished():
            return done
        now = clock.now()
        if monitor is not None and now >= next_look:
            monitor(now - t0)
            next_look = now + every
        while events and events[0][0] <= now:
            due, s, k, prompt = heapq.heappop(events)
            turn = sessions[s][k]
            sp = SamplingParams(max_tokens=turn.output_len, temperature=0.0, ignore_eos=True)
            req = engine.add_request(prompt, sp, adapter=turn.adapter, request_id=turn.id)
            req.arrival_time = due
            live[req.request_id] = (s, k, req)
        if engine.has_unfinished():
            start = time.perf_counter()
            outs = engine.step()
            if step_times is not None:
                step_times.append(time.perf_counter() - start)
            for out in outs:
                if not out.finished:
                    continue
                s, k, req = live.pop(out.request_id)
                done.append(req)
                if progress is not None:
                    progress.update(1)
                if k + 1 < len(sessions[s]):
                    nxt = sessions[s][k + 1]
                    prompt = out.prompt_token_ids + out.token_ids + input_ids(workload.seed, s, k + 1, nxt.input_len)
                    heapq.heappush(events, (clock.now() + nxt.time, s, k + 1, prompt))
            if clock.now() > now or outs:
                idle = 0
                continue
        else:
            engine.idle_tick()
        # nothing ran: wait for the next arrival, copy or swapper pass
        due = [now + interval]
        if events:
            due.append(events[0][0])
        nxt = getattr(engine.mover, "next_finish", lambda: None)()
        if nxt is not None:
            due.append(nxt)
        idle = 0 if len(due) > 1 else idle + 1
        if manual and idle > 10_000:
            raise RuntimeError("replay stalled: requests wait for device memory that nothing frees")
        wake = max(now, min(due))
        if manual:
            clock.advance(wake - now)
        else:
            time.sleep(min(max(0.0, wake - clock.now()), 0.005))
    raise RuntimeError(f"replay did not finish in {max_steps} steps")
