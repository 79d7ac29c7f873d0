"""What the prompts say: deterministic filler, as token ids or as text.

A workload fixes lengths, not words. The engine and the simulator take token
ids (exact lengths); HTTP clients send text made of common English words that
most BPE vocabularies encode as one token each, so lengths are close but not
exact across tokenizers. Both are a pure function of (seed, session, turn), so
every system under test sees the same prompts.
"""

from __future__ import annotations

import random

WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there one all we can their has been if more when will would who so no time out up "
    "about into than its some could them only other new these then two may first any like now my such make "
    "over our even most after also many did way well back just where how people year work state world life"
).split()


def _rng(seed: int, session: int, turn: int) -> random.Random:
    return random.Random(f"{seed}:{session}:{turn}")


def input_ids(seed: int, session: int, turn: int, n: int, lo: int = 1000, hi: int = 30000) -> list[int]:
    """n token ids in [lo, hi): away from special tokens in the vocabularies we serve."""
    rng = _rng(seed, session, turn)
    return [rng.randrange(lo, hi) for _ in range(n)]


def input_text(seed: int, session: int, turn: int, n: int) -> str:
    """About n tokens of words, each with its leading space."""
    rng = _rng(seed, session, turn)
    return "".join(" " + rng.choice(WORDS) for _ in range(n))
