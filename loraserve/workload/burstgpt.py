"""BurstGPT-like request lengths, without the trace.

InfiniLoRA samples input and output lengths from BurstGPT (Azure OpenAI
traffic, arXiv 2401.17644). This machine has no network and no copy of the
trace, so these are lognormals fitted (maximum likelihood on log lengths) to
the first 40 rows of BurstGPT_1.csv as its public dataset viewer shows them
(ChatGPT and GPT-4 conversation logs, zero-token failures left out):

- request tokens: median 601, log-mean 5.99, log-sd 1.47 (mean of the fit ≈ 1,180);
- response tokens: median 344, log-mean 5.60, log-sd 0.90 (mean of the fit ≈ 400).

Forty rows fix the body of the distributions, not their tails; lengths are
capped (4,096 in, 1,024 out) so one sample cannot dominate a short run.
"""

from __future__ import annotations

import math
from dataclasses import replace

from loraserve.workload.arrivals import ArrivalConfig
from loraserve.workload.popularity import PopularityConfig
from loraserve.workload.workload import Lengths, WorkloadConfig

INPUT_LOG_MEAN, INPUT_LOG_SD = 5.99, 1.47
OUTPUT_LOG_MEAN, OUTPUT_LOG_SD = 5.60, 0.90


def _lognormal(log_mean: float, log_sd: float, hi: int) -> Lengths:
    return Lengths(round(math.exp(log_mean + log_sd**2 / 2)), "lognormal", log_sd, lo=1, hi=hi)


BURSTGPT_INPUT = _lognormal(INPUT_LOG_MEAN, INPUT_LOG_SD, 4096)
BURSTGPT_OUTPUT = _lognormal(OUTPUT_LOG_MEAN, OUTPUT_LOG_SD, 1024)


def burstgpt_config(num_requests: int, num_adapters: int = 512, rate: float = 1.0, zipf_s: float = 1.2,
                    seed: int = 0, **overrides) -> WorkloadConfig:
    """InfiniLoRA's workload: Poisson arrivals, Zipf(s) adapter popularity,
    single-turn requests with BurstGPT-like lengths (overrides: any WorkloadConfig field)."""
    cfg = WorkloadConfig(num_sessions=num_requests, num_adapters=num_adapters,
                         arrival=ArrivalConfig("poisson", rate), popularity=PopularityConfig("zipf", s=zipf_s),
                         first_input=BURSTGPT_INPUT, input=BURSTGPT_INPUT, output=BURSTGPT_OUTPUT, seed=seed)
    return replace(cfg, **overrides)
