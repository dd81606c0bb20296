"""One progress/metrics interface for every long computation (training, analyses, sweeps).

The engine and the analyses call a `Reporter`; the CLI passes one that draws a progress bar,
the background worker passes one that writes to the run store. The core never knows which.
"""

from __future__ import annotations

import sys
import time
from typing import Any


class Reporter:
    """No-op base: subclasses override what they need."""

    def metrics(self, kind: str, step: int, values: dict[str, float]) -> None:
        """Record scalar metrics; `kind` is "step" (per optimizer step) or "epoch" (per evaluation)."""

    def progress(self, done: float, total: float, message: str = "") -> None:
        """Report how far a computation has come (done out of total units)."""

    def result(self, value: dict[str, Any]) -> None:
        """Publish a JSON-serialisable (possibly partial) result of an analysis."""

    def log(self, message: str) -> None:
        """A human-readable line for the run's log."""

    def should_stop(self) -> bool:
        """True when the computation was asked to stop gracefully (checkpoint, then return)."""
        return False

    def sync(self) -> None:
        """Make everything reported so far durable. Called before each checkpoint is written, so a
        run resumed from that checkpoint after a crash has no hole in its curves."""


class ConsoleReporter(Reporter):
    """Progress bar on a terminal (stderr), plain lines when stderr is not a TTY."""

    def __init__(self, stream=None, min_interval: float = 0.2) -> None:
        self.stream = stream or sys.stderr
        self.min_interval = min_interval
        self._last = 0.0
        self._t0 = time.monotonic()
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def progress(self, done: float, total: float, message: str = "") -> None:
        now = time.monotonic()
        if done < total and now - self._last < self.min_interval:
            return
        self._last = now
        frac = 0.0 if total <= 0 else min(1.0, done / total)
        elapsed = now - self._t0
        eta = elapsed * (1 - frac) / frac if frac > 0 else float("nan")
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        line = f"[{bar}] {100 * frac:5.1f}% {message} elapsed {elapsed:6.1f}s eta {eta:6.1f}s"
        if self._tty:
            self.stream.write("\r" + line + ("\n" if done >= total else ""))
        elif done >= total or now - self._t0 > 0:
            self.stream.write(line + "\n")
        self.stream.flush()

    def log(self, message: str) -> None:
        self.stream.write(("\n" if self._tty else "") + message + "\n")
        self.stream.flush()


class RecordingReporter(Reporter):
    """Keeps everything in memory: for tests and for callers that want the metrics back."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, int, dict[str, float]]] = []
        self.progress_calls: list[tuple[float, float, str]] = []
        self.results: list[dict[str, Any]] = []
        self.lines: list[str] = []
        self.stop_requested = False

    def metrics(self, kind: str, step: int, values: dict[str, float]) -> None:
        self.rows.append((kind, step, dict(values)))

    def progress(self, done: float, total: float, message: str = "") -> None:
        self.progress_calls.append((done, total, message))

    def result(self, value: dict[str, Any]) -> None:
        self.results.append(value)

    def log(self, message: str) -> None:
        self.lines.append(message)

    def should_stop(self) -> bool:
        return self.stop_requested
