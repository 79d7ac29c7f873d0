"""Sizes on the command line: '512MiB', '2GiB', '80GB', or a fraction like '0.3'."""

from __future__ import annotations

import re

UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9}


def split_size(text: str) -> tuple[float, str] | None:
    """(number, lower-case unit) of '512MiB', '2gib', '0.3', '0'; None if it is
    neither a byte count with a known unit nor a fraction without one."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m:
        return None
    value, unit = float(m.group(1)), m.group(2).lower()
    if unit not in UNITS or (value < 1 and unit):
        return None
    return value, unit


def parse_bytes(text: str) -> int:
    """A byte count with an optional unit (no fractions; 0 is 0)."""
    parsed = split_size(text)
    if parsed is None or 0 < parsed[0] < 1:
        raise ValueError(f"{text!r} is not a size like 512MiB or 80GiB")
    return int(parsed[0] * UNITS[parsed[1]])


def format_bytes(n: int) -> str:
    """`n` the way a person types it: the largest binary unit that divides it
    ('512MiB', '2GiB'), else plain bytes; `parse_bytes` reads it back."""
    for unit, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n and n % unit == 0:
            return f"{n // unit}{name}"
    return str(n)
