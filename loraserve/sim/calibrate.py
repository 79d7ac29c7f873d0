"""Fit a hardware profile's efficiency factors to step times measured on a real engine.

Model: seconds = step_overhead + seq_overhead·seqs + token_overhead·tokens
+ max(FLOPs / (peak·flops_eff), bytes / (bandwidth·bw_eff)). For each pair
of efficiencies on a log grid, the overheads are a non-negative linear
least-squares fit; the pair with the smallest squared error wins. Absolute,
not relative error: a relative fit runs low on noisy steps, and TTFT and
TPOT are sums of step times, so getting the total right is what matters.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np

from loraserve.sim.cost import StepWork
from loraserve.sim.hardware import Hardware

GRID = np.geomspace(0.01, 1.0, 25)


def _nnls(a: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Least squares with x >= 0 by trying every support (3 unknowns: 8 subsets)."""
    best_x, best_err = np.zeros(a.shape[1]), float(np.sum(y**2))
    for k in range(1, a.shape[1] + 1):
        for cols in itertools.combinations(range(a.shape[1]), k):
            x_sub, *_ = np.linalg.lstsq(a[:, cols], y, rcond=None)
            if np.any(x_sub < 0):
                continue
            x = np.zeros(a.shape[1])
            x[list(cols)] = x_sub
            err = float(np.sum((a @ x - y) ** 2))
            if err < best_err:
                best_x, best_err = x, err
    return best_x, best_err


def fit(samples: list[tuple[StepWork, float]], hw: Hardware) -> tuple[Hardware, float]:
    """Returns the fitted profile and its mean absolute relative error per step (a
    report of how well the model fits; not what was minimized)."""
    if len(samples) < 4:
        raise ValueError(f"calibration needs at least 4 measured steps, got {len(samples)}")
    flops = np.array([w.flops for w, _ in samples])
    nbytes = np.array([w.bytes for w, _ in samples])
    seqs = np.array([w.num_seqs for w, _ in samples], dtype=float)
    toks = np.array([w.num_tokens for w, _ in samples], dtype=float)
    y = np.array([t for _, t in samples])
    base = np.stack([np.ones_like(y), seqs, toks], axis=1)
    best = (float("inf"), 1.0, 1.0, np.zeros(3))
    for span in (None, 1.25, 1.05, 1.01):  # a coarse grid, then finer ones around the best so far
        grid_f, grid_b = (GRID, GRID) if span is None else (
            np.clip(best[i] * np.geomspace(1 / span, span, 11), 1e-3, 1.0) for i in (1, 2))
        for fe, be in itertools.product(grid_f, grid_b):
            roof = np.maximum(flops / (hw.flops * fe), nbytes / (hw.mem_bw * be))
            x, err = _nnls(base, y - roof)
            if err < best[0]:
                best = (err, fe, be, x)
    _, fe, be, x = best
    fitted = replace(hw, name=f"{hw.name}-fit", flops_eff=float(fe), bw_eff=float(be),
                     step_overhead=float(x[0]), seq_overhead=float(x[1]), token_overhead=float(x[2]))
    pred = x[0] + x[1] * seqs + x[2] * toks + np.maximum(flops / (hw.flops * fe), nbytes / (hw.mem_bw * be))
    return fitted, float(np.mean(np.abs(pred - y) / y))



def measure(config, adapters: dict[str, str], workload, hw: Hardware):
    """Replay a workload on the real engine (wall clock) and keep each step's work and
    measured time (the whole engine step: scheduling, execution, bookkeeping). Returns (samples, finished requests, the StepCost that priced them)."""
    from loraserve.engine.llm_engine import LLMEngine
    from loraserve.sampling import SamplingParams
    from loraserve.sim.cost import StepCost
    from loraserve.sim.paced import RecordingExecutor
    from loraserve.sim.replay import replay

    engine = LLMEngine(config)
    try:
        for name, path in adapters.items():
            engine.add_adapter(name, path)
        engine.add_request(list(range(100, 164)), SamplingParams(max_tokens=8, ignore_eos=True))  # warm-up
        while engine.has_unfinished():
            engine.step()
        cost = StepCost(engine.spec, hw, engine.model.dtype.itemsize,
                        lora_bytes=lambda a: engine.adapters.get(a).num_bytes)
        recorder = engine.executor = RecordingExecutor(engine.executor, cost)
        seconds: list[float] = []
        requests = replay(engine, workload, step_times=seconds)
    finally:
        engine.close()
    samples = [(w, t) for w, t in zip(recorder.works, seconds, strict=True) if w.num_tokens]
    return samples, requests, cost
