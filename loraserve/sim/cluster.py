"""A cluster on virtual time: base-model instances behind a router, coupled
or disaggregated (InfiniLoRA).

- `coupled`: every instance is a `SimEngine` caching adapters beside its KV
  (cache policy `slora`, `elora`, or `vllm` with a static adapter share);
- `disagg`: instances are `SimEngine`s keeping KV only (adapters are remote:
  keyed, never stored or computed), and one `SimLoraServer` on G GPUs
  computes every delta. A step with adapter rows walks its layers position by
  position; each position's delta goes to the server, and the next position
  starts when its result is back.

Events (arrivals, step ends, deltas done, server turns, copies landing) run
in time order on one ManualClock. Requests go to the instance the `Router`
(`loraserve/router`) picks, the policy the Ray Serve router calls: each
instance reports its load, its resident adapters (coupled) and the sessions
it served (whose history KV it holds).
"""

from __future__ import annotations

import heapq
import itertools
import math
import statistics
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

from loraserve.bench.metrics import SLO, RequestRecord, summarize
from loraserve.clock import ManualClock
from loraserve.engine.plan import ScheduledSeq, StepPlan
from loraserve.model.spec import ModelSpec
from loraserve.request import Request
from loraserve.router import REASONS, InstanceLoad, Router
from loraserve.sampling import SamplingParams
from loraserve.sim.cost import StepCost
from loraserve.sim.engine import SimConfig, SimEngine
from loraserve.sim.exchange import LINKS, ExchangeModel
from loraserve.sim.hardware import Hardware
from loraserve.sim.lora_server import DisaggConfig, SimDelta, SimLoraServer
from loraserve.sim.run import to_records
from loraserve.workload import Workload, input_ids

DEPLOYMENTS = ("coupled", "disagg")


@dataclass(frozen=True)
class ClusterConfig:
    deployment: str = "disagg"
    total_gpus: int = 16
    instance_gpus: int = 2
    rank: int = 64
    router: str = "affinity"
    """A routing policy of `loraserve.router.POLICIES`."""

    sim: SimConfig = field(default_factory=SimConfig)
    """Each instance's engine (tp is set to instance_gpus)."""

    disagg: DisaggConfig = field(default_factory=DisaggConfig)

    def __post_init__(self) -> None:
        if self.deployment not in DEPLOYMENTS:
            raise ValueError(f"deployment must be one of {', '.join(DEPLOYMENTS)}, got {self.deployment!r}")
        if self.num_instances < 1:
            raise ValueError(f"{self.total_gpus} GPUs leave no room for an instance of {self.instance_gpus}")

    @property
    def num_instances(self) -> int:
        server = self.disagg.server_gpus if self.deployment == "disagg" else 0
        return (self.total_gpus - server) // self.instance_gpus


@dataclass
class ClusterResult:
    records: list[RequestRecord]
    """TTFT to the first token, prefill included."""

    queue_records: list[RequestRecord]
    """The same requests with TTFT excluding prefill (InfiniLoRA's definition, papers.md 2.7): arrival moved
    later by the request's prefill time alone on an idle instance (base model, cost model)."""

    summary: dict
    """Of queue_records: what the SLO is judged on."""

    summary_with_prefill: dict
    stats: dict
    wall_s: float = 0.0
    stopped_at: float | None = None
    """Set when the run ended early (`simulate_cluster(stop_on_miss=True)`): the virtual time at which
    enough judged requests had missed the TTFT bound that the P95 could no longer meet it. The
    summaries then cover only the requests done by then, and both say `meets_slo` False."""


class MissWatch:
    """Knows, as first tokens come in, when a run's TTFT percentile is sure to miss the SLO.

    A serviceable-rate search spends most of its time on rates that fail: an
    overloaded cluster's queue grows for the rest of the run. Once more of the
    judged requests have a TTFT (prefill excluded, as `ClusterResult.summary`
    judges it) over the bound than the percentile tolerates, the verdict cannot
    change, so the run may stop. Exact, not a heuristic: with n judged requests
    and linear interpolation between ranks, the percentile sits at or above
    rank floor((n - 1) q / 100), so n - that many misses decide it.
    Single-turn workloads only (every arrival, and so the judged set, is known
    up front)."""

    def __init__(self, workload: Workload, slo: SLO, warmup: float, prefill_s) -> None:
        turns = sorted(workload.turns, key=lambda t: (t.time, t.session))  # `Cluster.result`'s order
        judged = turns[int(len(turns) * warmup):]
        self.judged = {t.id for t in judged}
        self.bound = slo.ttft
        self.prefill_s = prefill_s
        """Input tokens → the prefill time a request's TTFT excludes."""

        n = len(judged)
        self.allowed = n - math.floor((n - 1) * slo.ttft_percentile / 100) - 1
        self.late = 0

    def first_token(self, req: Request) -> bool:
        """Count a request's first token; True once the percentile must miss."""
        if req.request_id in self.judged:
            ttft = req.first_token_time - (req.arrival_time + self.prefill_s(req.num_prompt_tokens))  # as result()
            if ttft > self.bound:
                self.late += 1
        return self.late > self.allowed


class Cluster:
    def __init__(self, spec: ModelSpec, hw: Hardware, cfg: ClusterConfig, adapters: dict[str, int],
                 store=None, clock: ManualClock | None = None) -> None:
        """store: a real AdapterStore (built on `clock`) for the LoRA server's policies (see SimLoraServer)."""
        self.spec, self.cfg = spec, cfg
        self.clock = clock or ManualClock()
        self.sim_cfg = replace(cfg.sim, tp=cfg.instance_gpus)
        remote = cfg.deployment == "disagg"
        self.instances = [SimEngine(spec, hw, self.sim_cfg, adapters, self.clock, remote=remote)
                          for _ in range(cfg.num_instances)]
        self.busy = [False] * len(self.instances)
        self.wake_at: list[float | None] = [None] * len(self.instances)
        self.events: list[tuple] = []
        self._seq = itertools.count()
        self.server: SimLoraServer | None = None
        self._pumps: set[float] = set()
        if remote:
            d = cfg.disagg
            self.exchange = ExchangeModel(spec, cfg.rank, LINKS[d.link], hw, cfg.instance_gpus, d.ep, d.pp, d.push,
                                          d.overlap, d.kernel_eff, self.sim_cfg.dtype_bytes,
                                          self.sim_cfg.lora_dtype_bytes)
            self.server = SimLoraServer(spec, hw, d, adapters, self.clock, self.exchange, self._wake_server, store)
        self.done: list[Request] = []
        self.router = Router(cfg.router)
        self.home: dict[int, int] = {}
        """Session → the instance that served its last turn."""

        self.served: list[set[int]] = [set() for _ in self.instances]
        """Per instance, the sessions whose last turn it served."""

        self.reasons = dict.fromkeys(REASONS, 0)
        self.cold: set[str] = set()
        """Requests whose adapter was not on the LoRA server's device tier when they arrived, or was
        still being copied there: the first tokens that wait for a copy (what layer-wise loading shortens)."""

        self.watch: MissWatch | None = None
        self.stopped_at: float | None = None
        self.loads: list[InstanceLoad | None] = [None] * len(self.instances)
        """Each instance's last report, None once its state changed (it stepped, planned, or got
        or lost a request): summing every held request's tokens of every instance on every
        arrival cost O(instances × requests) per arrival, most of a 64-instance run."""

    # -- events ------------------------------------------------------------------

    def at(self, t: float, fn, *args) -> None:
        heapq.heappush(self.events, (max(t, self.clock.now()), next(self._seq), fn, args))

    def _wake_server(self, t: float) -> None:
        if t not in self._pumps:
            self._pumps.add(t)
            self.at(t, self._pump, t)

    def _pump(self, t: float) -> None:
        self._pumps.discard(t)
        self.server.pump()

    def run(self, workload: Workload, lead_in: float = 0.0, max_events: int = 50_000_000) -> list[Request]:
        """lead_in: idle seconds before the first arrival, in which the LoRA server's
        swapper runs every swap_interval (a server that was up before the traffic came;
        coupled instances have no idle work to do)."""
        self.workload = workload
        self.sessions = {s[0].session: s for s in workload.sessions()}
        for s, turns in self.sessions.items():
            self.at(lead_in + turns[0].time, self._arrive, s, 0, input_ids(workload.seed, s, 0, turns[0].input_len))
        if self.server is not None and lead_in > 0:
            step = self.server.cache.config.swap_interval or 0.1
            for k in range(int(lead_in / step) + 1):
                self._wake_server(k * step)
        for _ in range(max_events):
            if not self.events or self.stopped_at is not None:
                return self.done
            t, _, fn, args = heapq.heappop(self.events)
            # a cache that must wait for a copy (LinkMover.wait) moves the shared clock itself: what fell due
            # meanwhile runs late, at once
            self.clock.advance(max(0.0, t - self.clock.now()))
            fn(*args)
        raise RuntimeError(f"the cluster did not finish in {max_events} events")

    # -- requests ------------------------------------------------------------------

    def _arrive(self, session: int, k: int, prompt: list[int]) -> None:
        turn = self.sessions[session][k]
        loads = self.loads
        for j, load in enumerate(loads):
            if load is None:
                loads[j] = _load(self.instances[j], self.served[j])
        choice = self.router.pick(loads, turn.adapter, session if k else None)
        i = choice.index
        loads[i] = None
        self.reasons[choice.reason] += 1
        if session in self.home:
            self.served[self.home[session]].discard(session)
        self.home[session] = i
        self.served[i].add(session)
        sp = SamplingParams(max_tokens=turn.output_len, temperature=0.0, ignore_eos=True)
        req = self.instances[i].add_request(prompt, sp, adapter=turn.adapter, request_id=turn.id)
        req.arrival_time = self.clock.now()
        if self.server is not None and turn.adapter is not None:
            tree = self.server.cache.tree
            if turn.adapter not in tree.resident or tree.adapters[turn.adapter].in_transfer:
                self.cold.add(turn.id)
            self.server.hint(turn.adapter)
        self._kick(i)

    def _finished(self, i: int, req: Request) -> None:
        self.instances[i].forget(req)
        self.loads[i] = None
        self.done.append(req)
        session, k = (int(x[1:]) for x in req.request_id.split("-"))
        if k + 1 < len(self.sessions[session]):
            nxt = self.sessions[session][k + 1]
            prompt = req.prompt_token_ids + req.output_token_ids + input_ids(self.workload.seed, session, k + 1,
                                                                             nxt.input_len)
            self.at(self.clock.now() + nxt.time, self._arrive, session, k + 1, prompt)

    # -- instance steps ------------------------------------------------------------

    def _kick(self, i: int) -> None:
        eng = self.instances[i]
        if self.busy[i] or not eng.has_unfinished():
            return
        now = self.clock.now()
        plan = eng.scheduler.schedule()
        self.loads[i] = None  # admissions and preemptions change its tokens
        if plan.failed:
            raise RuntimeError(f"planning failed in the simulator: {plan.failed}")
        if not plan.seqs:  # waiting for copies or memory: look again when a copy lands or the swapper runs
            nxt = eng.mover.next_finish()
            t = nxt if nxt is not None and nxt > now else now + (eng.cache.config.swap_interval or 0.01)
            if self.wake_at[i] is None or self.wake_at[i] <= now or t < self.wake_at[i]:
                self.wake_at[i] = t
                self.at(t, self._kick, i)
            return
        result = eng.executor.inner.execute(plan)
        base = eng.step_time(plan)
        self.busy[i] = True
        rows = [(q.adapter, q.num_new_tokens) for q in plan.seqs if q.adapter is not None]
        if self.server is None or not rows:
            self.at(now + base, self._step_done, i, plan, result)
            return
        adapters = tuple(dict.fromkeys(a for a, _ in rows))
        tokens = sum(n for _, n in rows)
        self._send(i, 0, adapters, tokens, base / self.spec.num_layers, plan, result)

    def _send(self, i: int, position: int, adapters: tuple[str, ...], tokens: int, layer_s: float,
              plan: StepPlan, result) -> None:
        last = position + 1 == self.server.num_positions

        def done(t: float) -> None:
            if last:
                self.at(t, self._step_done, i, plan, result)
            else:
                self.at(t, self._send, i, position + 1, adapters, tokens, layer_s, plan, result)

        self.server.submit(SimDelta(i, position, self.clock.now(), adapters, tokens, layer_s, done,
                                    frozenset(range(self.server.num_positions))))

    def _step_done(self, i: int, plan: StepPlan, result) -> None:
        eng = self.instances[i]
        if isinstance(result, Future):  # a real instance's forward pass, run beside the loop (sim/served.py)
            result = eng.executor.inner.finish(result)
        self.loads[i] = None
        for req in eng.scheduler.update(plan, result):
            if self.watch is not None and req.num_output_tokens == 1 and self.watch.first_token(req):
                self.stopped_at = self.clock.now()
            if req.is_finished:
                self._finished(i, req)
        self.busy[i] = False
        self._kick(i)

    # -- results -----------------------------------------------------------------

    def result(self, slo: SLO | None = None, wall_s: float = 0.0, warmup: float = 0.0) -> ClusterResult:
        """Summaries over the requests that arrived after the first `warmup` share
        of arrivals (caches start cold; a short run would otherwise measure mostly that)."""
        # ties (arrivals due while a copy moved the clock land at one time) go by session: its start order
        records = sorted(to_records(self.done), key=lambda r: (r.arrival, r.session, r.turn))
        records = records[int(len(records) * warmup):]
        queue = [replace(r, arrival=r.arrival + self.prefill_s(r.input_len)) for r in records]
        stats = {"instances": len(self.instances),
                 "preemptions": sum(e.scheduler.num_preemptions for e in self.instances),
                 "routed": dict(self.reasons)}
        for key in ("adapter_hit_rate", "kv_hit_rate"):
            values = [e.cache.stats().get(key) for e in self.instances]
            values = [v for v in values if v is not None]
            stats[key] = sum(values) / len(values) if values else None
        if self.server is not None:
            stats["server"] = {k: v for k, v in self.server.stats().items() if isinstance(v, (int, float))}
            cold = [r.ttft for r in queue if r.id in self.cold and r.ttft is not None]
            # what layer-wise loading can shorten: the first token of a request that waited for its adapter's copy
            stats["cold"] = {"requests": len(cold), "median_ttft_s": statistics.median(cold) if cold else None}
        summary, with_prefill = summarize(queue, slo), summarize(records, slo)
        if self.stopped_at is not None:
            summary["meets_slo"] = with_prefill["meets_slo"] = False
        return ClusterResult(records, queue, summary, with_prefill, stats, wall_s, self.stopped_at)

    def prefill_s(self, tokens: int) -> float:
        """What a request's TTFT excludes: its prompt's prefill alone on an idle instance."""
        return prefill_time(self.instances[0].cost, tokens, self.sim_cfg.scheduler.max_num_batched_tokens)


def _load(eng: SimEngine, sessions: set[int]) -> InstanceLoad:
    """What a replica reports: its load, its resident adapters (none when they are
    remote) and the sessions it served (live sets, read and not copied)."""
    s = eng.scheduler
    held = [*s.running, *s.waiting, *s.pending]
    return InstanceLoad(len(held), sum(r.num_tokens - r.num_computed_tokens + r.sampling.max_tokens
                                       - r.num_output_tokens for r in held), eng.cache.tree.resident, sessions)


def prefill_time(cost: StepCost, tokens: int, chunk: int) -> float:
    """A prompt's prefill alone on an idle instance (base model; chunked as the scheduler would)."""
    total, done = 0.0, 0
    while done < tokens:
        n = min(chunk, tokens - done)
        last = done + n == tokens
        seq = ScheduledSeq("p", [0] * n, done, [], None, SamplingParams() if last else None)
        total += cost.step_time(StepPlan([seq]))
        done += n
    return total


def simulate_cluster(workload: Workload, spec: ModelSpec, hw: Hardware, cfg: ClusterConfig,
                     adapters: dict[str, int], slo: SLO | None = None, warmup: float = 0.0,
                     lead_in: float = 0.0, stop_on_miss: bool = False) -> ClusterResult:
    """stop_on_miss: end the run once the SLO's TTFT percentile is sure to miss (`MissWatch`;
    single-turn workloads), for searches that only need the verdict."""
    start = time.perf_counter()
    cluster = Cluster(spec, hw, cfg, adapters)
    if stop_on_miss:
        if slo is None or any(t.turn for t in workload.turns):
            raise ValueError("stop_on_miss needs an SLO and a single-turn workload")
        cluster.watch = MissWatch(workload, slo, warmup, cluster.prefill_s)
    cluster.run(workload, lead_in)
    return cluster.result(slo, time.perf_counter() - start, warmup)
