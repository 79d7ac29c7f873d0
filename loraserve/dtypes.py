"""The dtypes the engine and the LoRA server compute in, by name (as flags and configs spell them)."""

from __future__ import annotations

DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str):
    """The torch dtype of a name in DTYPES (torch is imported here, not by the configs)."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {name!r}")
    return getattr(torch, name)
