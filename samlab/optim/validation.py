"""Boundary checks shared by the optimizer entry points: ValueError naming the argument and its range."""

from __future__ import annotations

import math
from collections.abc import Sequence


def check_choice(name: str, value, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: must be one of {', '.join(allowed)} (got {value!r})")


def check_number(name: str, value, *, lower: float, open_lower: bool = False) -> float:
    """A finite real number >= lower (> lower when open_lower); returned as float."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < lower or (open_lower and value == lower):
        bound = f"> {lower:g}" if open_lower else f">= {lower:g}"
        raise ValueError(f"{name}: must be a finite number {bound} (got {value!r})")
    return float(value)
