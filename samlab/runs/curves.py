"""Downsampled curves kept at write time: the store folds every metric point into fixed-width step
buckets at a few widths (LEVEL_WIDTHS), each bucket holding its first, last, smallest and largest
point. A read of a long curve picks the finest width whose buckets fit the asked number of points, so
no read ever scans or aggregates the raw rows of a long curve, and the shape of the curve survives:
the curve's first and last points and every bucket's extremes are kept (spikes do not average away).

Pure functions and a small record; `samlab.runs.store` does the SQL.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields

LEVEL_WIDTHS = (8, 64, 512, 4096, 32768, 262144)  # steps per bucket at level 0, 1, …
POINTS_PER_BUCKET = 4  # first, min, max, last


@dataclass
class Bucket:
    """The extremes of one step range of one curve (None values are never folded in)."""

    n: int
    first_step: int
    first_value: float
    last_step: int
    last_value: float
    min_step: int
    min_value: float
    max_step: int
    max_value: float

    @classmethod
    def from_row(cls, row: Mapping[str, object]) -> Bucket:
        return cls(**{f.name: row[f.name] for f in fields(cls)})  # type: ignore[arg-type]

    def as_row(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def merge(self, other: Bucket) -> Bucket:
        """The bucket of both point sets; the same whatever the order (ties go to the earlier step)."""
        first = min((self.first_step, self.first_value), (other.first_step, other.first_value),
                    key=lambda p: p[0])
        last = max((self.last_step, self.last_value), (other.last_step, other.last_value), key=lambda p: p[0])
        low = min((self.min_value, self.min_step), (other.min_value, other.min_step))
        high = max((self.max_value, -self.max_step), (other.max_value, -other.max_step))
        return Bucket(self.n + other.n, first[0], first[1], last[0], last[1], low[1], low[0], -high[1], high[0])

    def points(self) -> list[tuple[int, float]]:
        """The bucket's distinct points in step order: first, min and max in the order they came, last."""
        return edge_points(self.first_step, self.first_value, self.last_step, self.last_value,
                           self.min_step, self.min_value, self.max_step, self.max_value)


@dataclass
class OpenCurve:
    """What a writer knows of one curve after its own last write: the store's version of the curve
    then, and at every level the last bucket (its index and extremes; None: no bucket yet). Valid only
    while the store's version is still that one (nobody else wrote or cut the curve since)."""

    version: int
    last: list[tuple[int, Bucket] | None]


def edge_points(first_step: int, first_value: float, last_step: int, last_value: float, min_step: int,
                min_value: float, max_step: int, max_value: float) -> list[tuple[int, float]]:
    """A bucket's distinct points in step order, from its stored columns (no Bucket built: reads
    turn thousands of rows into points)."""
    low, high = (min_step, min_value), (max_step, max_value)
    if high[0] < low[0]:
        low, high = high, low
    out = [(first_step, first_value)]
    for point in (low, high, (last_step, last_value)):  # steps in order within [first, last]: a repeat
        if point[0] != out[-1][0]:  # is the same point as the one before it
            out.append(point)
    return out


def fold(points: Iterable[tuple[int, float | None]], width: int) -> dict[int, Bucket]:
    """Buckets (index step // width) of these points; points without a value are skipped."""
    groups: dict[int, list[tuple[int, float]]] = {}
    for step, value in points:
        if value is None or value != value:
            continue
        groups.setdefault(step // width, []).append((int(step), float(value)))
    return {index: _bucket_of(group) for index, group in groups.items()}


def _bucket_of(points: list[tuple[int, float]]) -> Bucket:
    """The bucket of these points in one pass (what merging them one by one gives: ties go to the
    earlier step, and between equal steps to the earlier point)."""
    first = min(points, key=lambda p: p[0])
    last = max(points, key=lambda p: p[0])
    low = min(points, key=lambda p: (p[1], p[0]))
    high = max(points, key=lambda p: (p[1], -p[0]))
    return Bucket(len(points), *first, *last, *low, *high)


def choose_level(n_points: int, buckets_per_level: Mapping[int, int], max_points: int) -> int | None:
    """The finest level whose buckets give at most `max_points` points (None: the raw curve fits);
    the coarsest level when none does."""
    if n_points <= max_points or not buckets_per_level:
        return None
    for level in sorted(buckets_per_level):
        if buckets_per_level[level] * POINTS_PER_BUCKET <= max_points:
            return level
    return max(buckets_per_level)


def curve_points(buckets: Iterable[Bucket]) -> list[tuple[int, float]]:
    """The downsampled curve of a curve's buckets: every bucket's points, in step order."""
    return [p for b in sorted(buckets, key=lambda b: b.first_step) for p in b.points()]


def downsample(points: list[tuple[int, float | None]], max_points: int) -> list[tuple[int, float]]:
    """A curve held in memory, downsampled as the store does it: the points as they are when they
    fit, else the buckets of the finest width that fits (each its first, min, max and last point).
    `downsample_arrays` gives the same points for a long curve held as arrays."""
    if len(points) <= max_points:
        return [(step, value) for step, value in points]
    return curve_points(fold(points, fitting_width(points[0][0], points[-1][0], max_points)).values())


def fitting_width(first_step: int, last_step: int, max_points: int) -> int:
    """The finest bucket width whose buckets over [first_step, last_step] give at most `max_points`
    points (the widest when none does)."""
    return next((w for w in LEVEL_WIDTHS if (last_step // w - first_step // w + 1) * POINTS_PER_BUCKET <= max_points),
                LEVEL_WIDTHS[-1])


def downsample_arrays(steps, values, max_points: int):
    """`downsample` for a curve held as arrays (steps increasing, NaN for a missing value), vectorised:
    the same points, in a few array passes instead of a bucket object per point. Returns (steps, values)."""
    import numpy as np

    steps, values = np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=float)
    if len(steps) <= max_points:
        return steps, values
    width = fitting_width(int(steps[0]), int(steps[-1]), max_points)
    kept = ~np.isnan(values)
    steps, values = steps[kept], values[kept]
    if not len(steps):
        return steps, values
    index = steps // width
    starts = np.flatnonzero(np.r_[True, index[1:] != index[:-1]])
    ends = np.r_[starts[1:], len(steps)]
    bucket = np.repeat(np.arange(len(starts)), ends - starts)
    chosen = [starts, ends - 1]
    for extreme in (np.minimum, np.maximum):  # each bucket's extreme at its earliest step
        hits = np.flatnonzero(values == extreme.reduceat(values, starts)[bucket])
        chosen.append(hits[np.unique(bucket[hits], return_index=True)[1]])
    points = np.unique(np.concatenate(chosen))
    return steps[points], values[points]
