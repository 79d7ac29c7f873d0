"""The throughput benchmark's loraserve workload alone, repeated in one process:
best and median output tokens/s of five runs, with adapters and without.

For A/B checks of one change (run it in each tree, alternating): repeating
in one process takes the machine's minute-to-minute swings out of the best.

    python benchmarks/repeat_generate.py --model tiny-moe --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import throughput as tp  # noqa: E402

from loraserve import LLM, SamplingParams  # noqa: E402
from loraserve.config import SchedulerConfig  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-moe", choices=["smollm2", "tiny-dense", "tiny-moe"])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    model_dir, adapters = tp.prepare(args.model)
    for use in (True, False):
        llm = LLM(str(model_dir), adapters=adapters, dtype=args.dtype,
                  scheduler=SchedulerConfig(max_num_seqs=tp.NUM_REQUESTS, max_num_batched_tokens=4096, max_loras=8))
        names = [f"a{i % tp.NUM_ADAPTERS}" if use else None for i in range(tp.NUM_REQUESTS)]
        sp = SamplingParams(max_tokens=tp.OUTPUT_LEN, temperature=0.0, ignore_eos=True)
        llm.generate(tp.prompts()[:4], SamplingParams(max_tokens=4, temperature=0.0), adapter=names[:4], use_tqdm=False)
        rates = []
        for _ in range(args.runs):
            t = time.perf_counter()
            llm.generate(tp.prompts(), sp, adapter=names, use_tqdm=False)
            rates.append(tp.NUM_REQUESTS * tp.OUTPUT_LEN / (time.perf_counter() - t))
        print(f"{'mixed adapters' if use else 'base model'}: best {max(rates):.0f} tok/s, "
              f"median {statistics.median(rates):.0f} tok/s")


if __name__ == "__main__":
    main()
