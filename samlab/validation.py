"""The boundary checks of samlab: config, tasks, sweeps, the toy problem and the optimizers.

Each raises ValueError whose message starts with the field's name and says the allowed range, so a
form can show it next to the widget and the CLI can print it as is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def check_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: must be one of {', '.join(allowed)} (got {value!r})")


def check_int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    """An integer (not a bool) in [lo, hi], or >= lo without hi."""
    ok = isinstance(value, int) and not isinstance(value, bool) and lo <= value and (hi is None or value <= hi)
    if not ok:
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name}: must be an integer {bound} (got {value!r})")
    return value


def check_optional_int(name: str, value: Any, lo: int, hi: int | None = None) -> int | None:
    return None if value is None else check_int(name, value, lo, hi)


def check_number(name: str, value: Any, *, lower: float, open_lower: bool = False) -> float:
    """A finite real number >= lower (> lower when open_lower); returned as float."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < lower or (open_lower and value == lower):
        bound = f"> {lower:g}" if open_lower else f">= {lower:g}"
        raise ValueError(f"{name}: must be a finite number {bound} (got {value!r})")
    return float(value)


def check_positive(name: str, value: Any) -> float:
    """A finite number > 0, as float."""
    return check_number(name, value, lower=0.0, open_lower=True)


def check_in_range(name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False,
                   hi_open: bool = False) -> None:
    """A real number (not NaN, not a bool) in the interval from lo to hi, each end open or closed."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{name}: must be in {left}{lo:g}, {hi:g}{right} (got {value!r})")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: must be true or false (got {value!r})")


def check_non_empty_list(name: str, values: Any) -> list:
    if not isinstance(values, (list, tuple)) or not values:
        raise ValueError(f"{name}: must be a non-empty list (got {values!r})")
    return list(values)


def check_known_fields(params: Any, known: Sequence[str] | set[str]) -> None:
    """A request is a mapping whose keys are all known; the first unknown one is named."""
    if not isinstance(params, dict):
        raise ValueError("params: expected a mapping")
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown field; known: {sorted(known)}")


def check_device_name(value: Any) -> None:
    if not isinstance(value, str):
        raise ValueError(f"device: must be a device name such as 'auto', 'cpu', 'cuda' (got {value!r})")


def check_checkpoint_file(name: str, path: Any) -> str:
    """The path of an existing checkpoint file, as a normalised string."""
    if not isinstance(path, str) or not Path(path).is_file():
        raise ValueError(f"{name}: no checkpoint file at {path!r}")
    return str(Path(path))


def check_rho_grid(name: str, rhos: Any) -> None:
    """A non-empty list of SAM radii, each a number > 0."""
    if not isinstance(rhos, (list, tuple)) or not rhos:
        raise ValueError(f"{name}: at least one radius ρ > 0")
    for rho in rhos:
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not rho > 0:
            raise ValueError(f"{name}: every ρ must be a number > 0 (got {rho!r})")
