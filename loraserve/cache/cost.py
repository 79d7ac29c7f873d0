"""ELORA's cost model: how much a node is worth keeping on the device.

    Low_lora     = Σ_i 1 − (1 − prob_i)^BS            (Eq. 3)
    LoRA_Eval_i  = max(1, Low_lora / NowLoRA_i)        (Eq. 4)
    Retain_Eval_i = cost_i × visit_i × (1 − sigmoid(t_i / τ))   (Eq. 5)
    Eval_i       = LoRA_Eval_i × Retain_Eval_i         (Eq. 6)

prob_i is adapter i's share of the admissions in the last `window` seconds and
BS the mean running batch size over the same window (the paper's "recent
inference batch size"); so Low_lora estimates how many distinct adapters a
batch will want. NowLoRA_i is the number of adapters on the device after
moving node i: one fewer when scoring an adapter for eviction, one more when
scoring it for prefetch, unchanged for a KV node. cost_i is the node's transfer
time over the host link, visit_i its visit count, t_i the time since its last
use. Evict the lowest Eval, prefetch the highest.

The ablations drop one factor (WOL: LoRA_Eval, WOC: cost, WOV: visit, WOU: the
recency term); WOS replaces Eval with plain recency (LRU).
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass

from loraserve.cache.tree import Kind, Node


@dataclass(frozen=True)
class CostTerms:
    lora: bool = True
    cost: bool = True
    visit: bool = True
    recency: bool = True
    lru: bool = False
    """Score by last use alone (elora-wos and the baselines)."""


class CostModel:
    def __init__(self, terms: CostTerms, window: float, tau: float, link_bytes_per_s: float) -> None:
        self.terms = terms
        self.window = window
        self.tau = tau
        self.link = link_bytes_per_s
        self._admissions: deque[tuple[float, object]] = deque()
        self._counts: Counter = Counter()
        self._batches: deque[tuple[float, int]] = deque()
        self._batch_sum = 0

    # -- what happened -----------------------------------------------------

    def record_admission(self, adapter: object, now: float) -> None:
        self._admissions.append((now, adapter))
        self._counts[adapter] += 1
        self._expire(now)

    def record_batch(self, batch_size: int, now: float) -> None:
        self._batches.append((now, batch_size))
        self._batch_sum += batch_size
        self._expire(now)

    def _expire(self, now: float) -> None:
        horizon = now - self.window
        while self._admissions and self._admissions[0][0] < horizon:
            _, adapter = self._admissions.popleft()
            self._counts[adapter] -= 1
            if not self._counts[adapter]:
                del self._counts[adapter]
        while self._batches and self._batches[0][0] < horizon:
            self._batch_sum -= self._batches.popleft()[1]

    # -- scores ------------------------------------------------------------

    def low_lora(self, now: float) -> float:
        self._expire(now)
        total = len(self._admissions)
        if not total:
            return 0.0
        bs = self._batch_sum / len(self._batches) if self._batches else 1.0
        return sum(1.0 - (1.0 - c / total) ** bs for c in self._counts.values())

    def score(self, node: Node, now: float, low_lora: float, now_lora: int) -> float:
        """Eval_i. `now_lora`: adapters on the device after the move being scored."""
        t = self.terms
        if t.lru:
            return node.last_use
        lora_eval = max(1.0, low_lora / max(now_lora, 1)) if t.lora else 1.0
        cost = node.num_bytes / self.link if t.cost else 1.0
        visit = node.visits if t.visit else 1.0
        recency = 1.0 - _sigmoid((now - node.last_use) / self.tau) if t.recency else 1.0
        return lora_eval * cost * visit * recency

    def lora_flat(self, low_lora: float, now_lora: int) -> bool:
        """Whether LoRA_Eval is 1 for a NowLoRA of `now_lora` and any more: then an adapter
        more or less on the device, down to that count, changes no score (the swapper need
        not score every node again after moving one)."""
        return self.terms.lru or not self.terms.lora or low_lora <= max(now_lora, 1)

    def eviction_key(self, node: Node, now: float, low_lora: float, device_loras: int) -> tuple:
        """Sort key, lowest evicted first; ties go to the older, less visited, deeper node (E-CODE)."""
        after = device_loras - 1 if node.kind is Kind.LORA else device_loras
        return (self.score(node, now, low_lora, after), node.last_use, node.visits, -node.depth)

    def prefetch_key(self, node: Node, now: float, low_lora: float, device_loras: int) -> tuple:
        """Sort key, highest prefetched first."""
        after = device_loras + 1 if node.kind is Kind.LORA else device_loras
        return (self.score(node, now, low_lora, after), node.last_use, node.visits, -node.depth)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x > -60 else 0.0
