"""The throughput workload on the vLLM CPU build, run by `benchmarks/throughput.py`
inside vLLM's own virtualenv (`VLLM_PYTHON=VENV/bin/python`, see PEERS.md).

Reads one JSON argument file (model dir, adapters, dtype, token-id prompts,
output length, the warm-up's prompts and length) and prints one JSON line:
output tokens/s with the request's adapters (round robin, as loraserve's run)
and with none. Imports only vLLM: loraserve is not installed in that
virtualenv.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    spec = json.load(open(sys.argv[1]))
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    names = list(spec["adapters"])
    llm = LLM(model=spec["model"], dtype=spec["dtype"], enable_lora=True, max_loras=len(names),
              max_lora_rank=spec["rank"], max_num_seqs=len(spec["prompts"]), max_model_len=512,
              gpu_memory_utilization=0.12, enforce_eager=True, seed=0)
    loras = [LoRARequest(n, i + 1, spec["adapters"][n]) for i, n in enumerate(names)]
    prompts = [{"prompt_token_ids": ids} for ids in spec["prompts"]]
    sp = SamplingParams(max_tokens=spec["output_len"], temperature=0.0, ignore_eos=True)
    out = {}
    for label, lora in (("mixed", [loras[i % len(loras)] for i in range(len(prompts))]), ("base", None)):
        warm = [{"prompt_token_ids": ids} for ids in spec["warmup_prompts"]]  # as every system's warm-up
        llm.generate(warm, SamplingParams(max_tokens=spec["warmup_tokens"], temperature=0.0, ignore_eos=True),
                     lora_request=lora, use_tqdm=False)
        t = time.perf_counter()
        res = llm.generate(prompts, sp, lora_request=lora, use_tqdm=False)
        elapsed = time.perf_counter() - t
        assert all(len(r.outputs[0].token_ids) == spec["output_len"] for r in res)
        out[label] = len(prompts) * spec["output_len"] / elapsed
    print(json.dumps(out), flush=True)


if __name__ == "__main__":  # vLLM starts worker processes
    main()
