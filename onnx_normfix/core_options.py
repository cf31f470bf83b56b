"""Checks of the numeric options every run takes (seed, tolerances), shared by `optimize`
and the CLI, so a library call and a command line get the same one-line NormfixError.

A NaN tolerance makes every comparison false (the pass would be blamed), an infinite one
makes every comparison true (validation silently off), a negative one cannot be met.
"""

from __future__ import annotations

import math
import numbers

from .errors import NormfixError

SEED_MAX = 2**32 - 1


def check_seed(value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value <= SEED_MAX:
        raise NormfixError(f"seed must be an integer from 0 to {SEED_MAX}, got {value!r}")
    return int(value)


def check_tolerance(name: str, value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise NormfixError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if math.isnan(value) or math.isinf(value) or value < 0:
        why = "NaN would fail every comparison" if math.isnan(value) else (
            "infinity would pass every comparison (use --no-validate to skip validation)"
            if math.isinf(value) else "a negative tolerance cannot be met")
        raise NormfixError(f"{name} must be a finite number >= 0, got {value!r}: {why}")
    return value


def check_core_options(opts: dict) -> None:
    """Raise NormfixError for a bad seed or tolerance in `opts` (the pipeline's options)."""
    check_seed(opts.get("seed", 0))
    for name in ("rtol", "atol"):
        check_tolerance(name, opts.get(name))
