"""Large CPU tensors on 2 MB pages (loraserve/__init__.py asks torch's allocator for them).

Checked in a fresh interpreter, as a process starts: torch reads the setting
once, at its first large allocation. What the kernel then does depends on its transparent
huge page mode: "madvise" (this project's machines) gives advised memory huge
pages and only that; "always" gives them to every large mapping; "never" to none.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent("""
    import json, os
    import loraserve  # first, as the CLI and the Ray actors import it
    import torch
    x = torch.ones(16 << 20)  # 64 MiB, touched
    address, huge_kb, inside = x.data_ptr(), 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if "-" in head[0] and len(head) >= 5:  # a mapping's first line: its address range
            start, end = (int(a, 16) for a in head[0].split("-"))
            inside = start <= address < end
        elif inside and head[0] == "AnonHugePages:":
            huge_kb = int(head[1])
    print(json.dumps({"setting": os.environ.get("THP_MEM_ALLOC_ENABLE"), "huge_kb": huge_kb}))
""")


def thp_mode() -> str:
    """The kernel's transparent huge page mode (the bracketed word)."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "never"
    return text.split("[")[1].split("]")[0]


def tensor_pages(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**clean, **env})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_loraserve_first_puts_a_large_tensor_on_huge_pages():
    got = tensor_pages()
    assert got["setting"] == "1"
    if thp_mode() == "never":
        assert got["huge_kb"] == 0  # none to be had
    else:
        assert got["huge_kb"] >= 32 << 10  # at least half of the 64 MiB (its 2 MB-aligned part)


def test_the_environment_opts_out():
    got = tensor_pages(THP_MEM_ALLOC_ENABLE="0")
    assert got["setting"] == "0"
    if thp_mode() == "madvise":  # nothing advised, so no huge pages ("always" gives them regardless)
        assert got["huge_kb"] == 0
