"""Decode steps with the CPU kernels of a git revision against the working tree's, alternating in one process.

The kernels (`model/cpu_*.py`) are C++ the engine builds on first use. Whether
a change to them made a step faster is this comparison: both builds loaded in
one process, the throughput workload's decode steps (`decode_ab.py`) switching
between them every few steps, so both see the same contexts and the same
moments of this shared machine. With `--march haswell` both are built for an
AVX2 CPU and fp32 weights take the form an AVX2 machine picks ("plain", MKL):
an AVX2 machine's kernels on this one (its memory, and torch's and MKL's own
kernels, stay this machine's).

    python benchmarks/kernel_builds.py --base REV [--dtype bfloat16] [--march haswell]
        # appends to benchmarks/results/kernel_builds-<machine class>.txt
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import decode_ab  # noqa: E402
from loraserve.dtypes import cpu_line  # noqa: E402
from loraserve.model import cpu_kernels, linear  # noqa: E402

STEPS_PER_SWITCH, SWITCHES = 3, 12
CASES = [(32, True), (32, False), (1, False), (1, True)]


def source_at(rev: str) -> str:
    """The kernels' C++ as revision `rev` assembles it (its own modules, imported in a subprocess)."""
    with tempfile.TemporaryDirectory() as tree:
        archive = subprocess.run(["git", "archive", rev, "loraserve"], cwd=decode_ab.ROOT, capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
        code = f"import sys, json; sys.path.insert(0, {tree!r}); from loraserve.model import cpu_kernels; " \
               "print(json.dumps(cpu_kernels.SOURCE))"
        return json.loads(subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True,
                                         check=True).stdout)


def build(source: str, march: str | None):
    tag = hashlib.sha1(f"{source}{march}".encode()).hexdigest()[:12]
    return cpu_kernels.build(f"loraserve_kernel_builds_{tag}", source, march)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the git revision whose kernels are the baseline")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--march", help="build both for this -march (e.g. haswell) instead of this CPU")
    args = p.parse_args()
    if args.march:
        linear.TRANSPOSED_FORM = True  # fp32 weights as an AVX2 machine keeps them
    base = build(source_at(args.base), args.march)
    new = build(cpu_kernels.SOURCE, args.march) if args.march else cpu_kernels.kernels()
    assert new is not None, "the kernels could not be built here"
    cpu_kernels._built[:] = [new]  # what the engine's kernels() returns

    @contextlib.contextmanager
    def using(module):
        cpu_kernels._built[0] = module
        try:
            yield
        finally:
            cpu_kernels._built[0] = new

    llm = decode_ab.engine(args.dtype)
    forms = sorted({layer.qkv.form for layer in llm.engine.model.layers})
    lines = [f"# {cpu_line()}; SmolLM2-135M {args.dtype}, kernels built for {args.march or 'this CPU'}, "
             f"projections {'/'.join(forms)}; {STEPS_PER_SWITCH} steps per switch x {SWITCHES} switches",
             f"| batch | adapters | {args.base} ms (median) | working tree ms | ratio |", "|---|---|---|---|---|"]
    print(lines[0])
    for batch, adapters in CASES:
        times = decode_ab.decode_steps(llm, batch, adapters, {"base": lambda: using(base), "new": lambda: using(new)},
                                       STEPS_PER_SWITCH, SWITCHES)
        a, b = statistics.median(times["base"]), statistics.median(times["new"])
        lines.append(f"| {batch} | {'8 rank-16' if adapters else 'none'} | {a * 1e3:.1f} | {b * 1e3:.1f} "
                     f"| {b / a:.2f} |")
        print(lines[-1], flush=True)
    decode_ab.record("kernel_builds", lines)


if __name__ == "__main__":
    main()
