"""The dtypes the engine and the LoRA server compute in, by name (as flags and configs spell them),
and `auto`: the fastest one the hardware computes natively."""

from __future__ import annotations

from functools import cache
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")
CHOICES = ("auto", *DTYPES)
"""What --dtype accepts."""

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
"""/proc/cpuinfo flags of x86 CPUs with bf16 dot products (AVX512-BF16, AMX):
elsewhere bf16 is emulated, slower than fp32."""


def torch_dtype(name: str):
    """The torch dtype of a name in DTYPES (torch is imported here, not by the configs)."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {name!r}")
    return getattr(torch, name)


def check_dtype(name: str, what: str = "dtype") -> None:
    """Raise on a name --dtype does not accept (configs validate with this)."""
    if name not in CHOICES:
        raise ValueError(f"{what} must be auto, float32, bfloat16 or float16, got {name!r}")


def resolve_dtype(name: str, device: str) -> str:
    """`name` itself, or for `auto` what `device` computes fastest: bf16 on a GPU
    that has it (else fp16), bf16 on a CPU with native bf16, else fp32."""
    check_dtype(name)
    if name != "auto":
        return name
    if device.startswith("cuda"):
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if native_bf16_cpu() else "float32"


@cache
def _cpuinfo() -> dict[str, str]:
    """The first CPU's fields in /proc/cpuinfo (empty where it is not there)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


@cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (empty where /proc/cpuinfo is not there)."""
    return frozenset(_cpuinfo().get("flags", "").split())


def native_bf16_cpu() -> bool:
    return any(f in cpu_flags() for f in NATIVE_BF16_FLAGS)


def cpu_class() -> str:
    """How CPU benchmark results are filed: "avx512" or "avx2" (which matmul form or
    kernel wins differs between them)."""
    return "avx512" if "avx512f" in cpu_flags() else "avx2"


def cpu_line() -> str:
    """The head of a CPU benchmark's result: its class, the flags that decide speed, the threads."""
    import torch

    flags = sorted(f for f in cpu_flags() if f in ("avx2", "avx512f", *NATIVE_BF16_FLAGS))
    return f"{cpu_class()} machine, {cpu_model()} (flags: {', '.join(flags)}), {torch.get_num_threads()} threads"


def cpu_model() -> str:
    """The CPU's model name and family/model numbers ("unknown CPU" without /proc/cpuinfo): machines of
    one class differ (an AMD Zen 4 and an Intel Xeon both have AVX-512 with bf16)."""
    info = _cpuinfo()
    return f"{info.get('model name', 'unknown CPU')} family {info.get('cpu family', '?')} model {info.get('model', '?')}"
