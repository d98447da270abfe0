"""Hyper-parameter checks shared by every configuration type, so every error reads the same way."""

from __future__ import annotations

import math

import numpy as np

from .errors import ConfigError


def integer(value, name: str, low: int | None = None) -> int:
    """`value` as an int (bools refused) of at least `low`, else "NAME must be a positive integer, got ..."."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (low is not None and value < low):
        kind = "an integer" if low is None else "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ConfigError(f"{name} must be {kind}, got {value!r}")
    return int(value)


def number(value, name: str, low: float = 0.0, high: float = math.inf, closed: str = "high") -> float:
    """`value` as a float within (low, high] (`closed` "high"), (low, high) ("none"), [low, high) ("low") or
    [low, high] ("both")."""
    ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool) and math.isfinite(value)
    above = ok and (value >= low if closed in ("low", "both") else value > low)
    below = ok and (value <= high if closed in ("high", "both") else value < high)
    if not (above and below):
        interval = f"{'[' if closed in ('low', 'both') else '('}{low}, {high}{']' if closed in ('high', 'both') else ')'}"
        raise ConfigError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


def choice(value, name: str, options: tuple[str, ...]) -> str:
    """`value` if it is one of `options`, else "NAME must be 'a', 'b' or 'c', got ..."."""
    if value not in options:
        listed = ", ".join(repr(o) for o in options[:-1]) + f" or {options[-1]!r}"
        raise ConfigError(f"{name} must be {listed}, got {value!r}")
    return value
