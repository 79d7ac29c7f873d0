"""A workload: sessions of turns, each turn one request.

A session's first turn arrives at an absolute time; each later turn arrives a
think time after the previous turn's reply, and its prompt is the whole
conversation so far (previous prompt + reply + the new input), so multi-turn
sessions reuse their history the way chat clients do. Single-turn traffic is
sessions of one turn. A workload is plain data: generated from a seeded
`WorkloadConfig`, read from a trace, saved to and replayed from a JSONL file.
"""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from loraserve.workload.arrivals import ArrivalConfig, arrival_times
from loraserve.workload.popularity import Popularity, PopularityConfig

FORMAT = "loraserve-workload"
LENGTHS = ("fixed", "uniform", "exponential", "lognormal")


@dataclass(frozen=True)
class Turn:
    session: int
    turn: int
    adapter: str | None
    """Adapter name (the OpenAI `model` field); None: the base model."""

    input_len: int
    """New input tokens this turn (the first turn: the whole first prompt)."""

    output_len: int
    time: float
    """Turn 0: seconds after the start. Later turns: think seconds after the previous reply."""

    @property
    def id(self) -> str:
        return f"s{self.session}-t{self.turn}"


@dataclass(frozen=True)
class Lengths:
    mean: int
    kind: str = "fixed"
    spread: float = 0.5
    """uniform: ±spread·mean; lognormal: sigma of the log."""

    lo: int = 1
    hi: int | None = None

    def sample(self, rng: random.Random) -> int:
        if self.kind not in LENGTHS:
            raise ValueError(f"unknown length distribution {self.kind!r}; choose from {', '.join(LENGTHS)}")
        if self.kind == "fixed":
            x = float(self.mean)
        elif self.kind == "uniform":
            x = rng.uniform(self.mean * (1 - self.spread), self.mean * (1 + self.spread))
        elif self.kind == "exponential":
            x = rng.expovariate(1.0 / self.mean)
        else:  # mean of a lognormal is exp(mu + sigma²/2)
            x = rng.lognormvariate(math.log(self.mean) - self.spread**2 / 2, self.spread)
        return max(self.lo, min(round(x), self.hi or 1 << 30))


@dataclass(frozen=True)
class WorkloadConfig:
    num_sessions: int = 100
    num_adapters: int = 50
    adapter_prefix: str = "lora-"
    base_fraction: float = 0.0
    """Share of sessions on the base model (no adapter)."""

    arrival: ArrivalConfig = field(default_factory=ArrivalConfig)
    popularity: PopularityConfig = field(default_factory=PopularityConfig)
    turns: float = 1.0
    """Mean turns per session; above 1 the count is geometric with this mean."""

    think_s: float = 5.0
    """Mean think time between a reply and the next turn (exponential)."""

    first_input: Lengths = Lengths(256)
    input: Lengths = Lengths(64)
    output: Lengths = Lengths(128)
    seed: int = 0


@dataclass
class Workload:
    turns: list[Turn]
    adapters: list[str]
    """Every adapter name the workload may use (the server must serve them all)."""

    rate: float
    """Sessions started per second that the first turns' times follow."""

    seed: int = 0
    meta: dict = field(default_factory=dict)

    def sessions(self) -> list[list[Turn]]:
        by: dict[int, list[Turn]] = {}
        for t in self.turns:
            by.setdefault(t.session, []).append(t)
        return [sorted(v, key=lambda t: t.turn) for _, v in sorted(by.items())]

    @property
    def num_requests(self) -> int:
        return len(self.turns)

    def at_rate(self, rate: float) -> Workload:
        """The same sessions, their starts compressed or stretched to `rate` sessions/s
        (think times unchanged): the knob of a serviceable-rate search."""
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        k = self.rate / rate
        turns = [replace(t, time=t.time * k) if t.turn == 0 else t for t in self.turns]
        return replace(self, turns=turns, rate=rate, meta=dict(self.meta))

    def renamed(self, names: list[str]) -> Workload:
        """The same workload over other adapter names: the i-th of `self.adapters`
        becomes names[i] (to run a generated workload on the adapters at hand)."""
        if len(names) != len(self.adapters):
            raise ValueError(f"need {len(self.adapters)} adapter names, got {len(names)}")
        to = dict(zip(self.adapters, names))
        turns = [replace(t, adapter=to[t.adapter]) if t.adapter else t for t in self.turns]
        return replace(self, turns=turns, adapters=list(names), meta=dict(self.meta))

    # -- files -------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        head = {"format": FORMAT, "version": 1, "rate": self.rate, "seed": self.seed,
                "adapters": self.adapters, "meta": self.meta}
        lines = [json.dumps(head)] + [json.dumps(asdict(t)) for t in self.turns]
        Path(path).write_text("\n".join(lines) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Workload:
        lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
        if not lines:
            raise ValueError(f"{path}: empty workload file")
        head = json.loads(lines[0])
        if head.get("format") != FORMAT:
            raise ValueError(f"{path}: not a loraserve workload file (first line lacks format={FORMAT!r}); "
                             "for a trace use `loraserve workload --trace`")
        turns = []
        for i, ln in enumerate(lines[1:], 2):
            try:
                turns.append(Turn(**json.loads(ln)))
            except (TypeError, json.JSONDecodeError) as e:
                raise ValueError(f"{path}:{i}: bad turn: {e}") from None
        return cls(turns, head["adapters"], head["rate"], head.get("seed", 0), head.get("meta", {}))


def generate(cfg: WorkloadConfig) -> Workload:
    """Seeded and reproducible: the same config gives the same workload."""
    if cfg.num_sessions < 1 or cfg.num_adapters < 0 or not 0 <= cfg.base_fraction <= 1 or cfg.turns < 1:
        raise ValueError("a workload needs num_sessions >= 1, num_adapters >= 0, base_fraction in [0, 1], turns >= 1")
    if cfg.num_adapters == 0 and cfg.base_fraction < 1:
        cfg = replace(cfg, base_fraction=1.0)
    rng = random.Random(cfg.seed)
    names = [f"{cfg.adapter_prefix}{i}" for i in range(cfg.num_adapters)]
    pop = Popularity(cfg.popularity, cfg.num_adapters) if names else None
    turns = []
    for s, start in enumerate(arrival_times(cfg.arrival, cfg.num_sessions, rng)):
        base = pop is None or rng.random() < cfg.base_fraction
        adapter = None if base else names[pop.sample(rng, start)]
        n_turns = 1 if cfg.turns == 1 else 1 + _geometric(rng, 1.0 / cfg.turns)
        for k in range(n_turns):
            turns.append(Turn(s, k, adapter, (cfg.first_input if k == 0 else cfg.input).sample(rng),
                              cfg.output.sample(rng), start if k == 0 else rng.expovariate(1.0 / cfg.think_s)))
    meta = {"config": _plain(asdict(cfg))}
    return Workload(turns, names, cfg.arrival.rate, cfg.seed, meta)


def _geometric(rng: random.Random, p: float) -> int:
    """Failures before the first success: mean (1-p)/p."""
    return int(math.log(1.0 - rng.random()) / math.log(1.0 - p)) if p < 1 else 0


def _plain(d: dict) -> dict:
    return json.loads(json.dumps(d))


def from_trace(path: str | Path) -> Workload:
    """A CSV or JSONL trace: one request per row with `timestamp` (s), `adapter`
    (empty: base model), `input_len`, `output_len`, and optionally `session`
    and `turn`. Within a session, a later turn's think time is the gap between
    its timestamp and the previous turn's (the reply time is not in a trace)."""
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
    else:
        rows = [json.loads(ln) for ln in text.splitlines() if ln.strip()]
    if not rows:
        raise ValueError(f"{path}: the trace has no rows")
    parsed = []
    for i, r in enumerate(rows):
        try:
            sess = r.get("session")
            parsed.append((float(r["timestamp"]), str(r.get("adapter") or "") or None, int(r["input_len"]),
                           int(r["output_len"]), str(sess) if sess not in (None, "") else f"row{i}",
                           int(r.get("turn") or 0)))
        except (KeyError, ValueError) as e:
            raise ValueError(f"{path}: row {i + 1} needs timestamp, adapter, input_len, output_len: {e}") from None
    parsed.sort(key=lambda r: (r[0], r[5]))  # sessions numbered by their first arrival
    t0 = min(r[0] for r in parsed)
    ids: dict[str, int] = {}
    last: dict[str, float] = {}
    count: dict[str, int] = {}
    turns = []
    for ts, adapter, n_in, n_out, sess, _ in parsed:
        s = ids.setdefault(sess, len(ids))
        k = count[sess] = count.get(sess, -1) + 1
        turns.append(Turn(s, k, adapter, n_in, n_out, ts - t0 if k == 0 else ts - last[sess]))
        last[sess] = ts
    turns.sort(key=lambda t: (t.session, t.turn))
    starts = [t.time for t in turns if t.turn == 0]
    span = max(starts) or 1.0
    adapters = sorted({t.adapter for t in turns if t.adapter})
    return Workload(turns, adapters, len(starts) / span, 0, {"trace": str(path)})
