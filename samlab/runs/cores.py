"""A CPU run's thread count that follows what else the machine is doing.

On a laptop the workers, the dashboard server and the browser share a few cores. A run that spreads
its OpenMP threads over every core is fastest on an idle machine, but when anything else wants a core
its threads wait for one another at every parallel region and the run slows down many times over; a run
that leaves a core free is robust but gives up that core's speed when nothing else needs it. A
`ThreadGovernor` takes both: the worker's compute thread calls `tick()` where a task checks for a stop
request (every training step, Lanczos iteration, grid point); every `interval_s` it measures how many
cores the *other* processes kept busy (on the CPUs this process may run on, from /proc/stat, minus this
process's own CPU time), averages it over the last `tau_s` seconds (an exponential average, so the
2 s refresh cycle of a live page counts as its mean) and sets torch's thread count:

    `fewest` threads when that load rises above what `most` threads leave the others (cores − most,
              another slot's share) plus `high` cores;
    `most`   when it falls to that plus `low` (the gap keeps a load near one threshold from flapping).

`tau_s` = 4 s makes a live page's bursts (a full redraw, a chart frame loading plotly.js: a second or
two of one core) too short to count, while a load that stays (another job, a heavy page) still takes a
core from the run within 2–4 s.

It starts at `fewest`, the interval before its first tick (the task's start-up) counting as measured.
The thresholds come from `benchmarks/live_overhead.py` on 2 cores (idle machine): two threads were
~25 % faster than one on the digits-cnn preset with nothing else running; with the Train page open
(browser and server ≈ 0.6 core) two spinning threads took 10.8 s against 9.5 s for one; with the
Hessian page watching an analysis (≈ 0.3 core) two threads lost 9 % to the page and one thread 25 %;
under other jobs' load two threads were 4–10 times slower than one. Since the Train page draws its
charts in place (`dashboard.live_chart`, ≈ 0.2 core in bursts), two threads beat one with it open
(9.4 s against 10.6 s); with tau_s = 2 s its bursts still sent the run to one thread for 2–4 s, with
4 s they do not (the run keeps two threads throughout). Without /proc/stat (not Linux) it stays at
`fewest`.

Public API:
    ThreadGovernor(most, fewest, *, interval_s, tau_s, high, low, usage, set_threads, clock, cores)
        .tick()                 measure when due and set the thread count; cheap otherwise
        .threads                the thread count set last
        .summary()              how long it ran at each count (the worker logs it at the end)
    other_cores_busy()          a callable: cores the other processes kept busy since its previous call
    busy_ticks(cpus), own_cpu_seconds()   what it reads
    governor_from_env()         the worker's governor from SAMLAB_CPU_THREADS_RANGE ("fewest-most"), or None
    thread_budget(default), threads_now(default)   the process's most / current threads under its governor
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable

RANGE_VAR = "SAMLAB_CPU_THREADS_RANGE"
BUSY_STATES = (0, 1, 2, 5, 6, 7)  # user, nice, system, irq, softirq, steal (guest time is inside user)


def busy_ticks(cpus: set[int], stat: str = "/proc/stat") -> int:
    """Clock ticks the given CPUs spent busy since boot (every process's time, niced ones included:
    a low-priority process still takes a core from a thread that spins while it waits)."""
    total = 0
    with open(stat) as f:
        for line in f:
            if not line.startswith("cpu") or line.startswith("cpu "):
                continue
            name, *fields = line.split()
            if int(name[3:]) in cpus:
                total += sum(int(fields[i]) for i in BUSY_STATES if i < len(fields))
    return total


def own_cpu_seconds() -> float:
    """User + system CPU seconds of this process, all its threads."""
    t = os.times()
    return t.user + t.system


def other_cores_busy(*, stat: str = "/proc/stat", cpus: set[int] | None = None,
                     own: Callable[[], float] = own_cpu_seconds,
                     clock: Callable[[], float] = time.monotonic) -> Callable[[], float]:
    """A function returning how many cores processes other than this one kept busy since its previous
    call, on `cpus` (default: the CPUs this process may use). OSError when `stat` cannot be read."""
    cpus = os.sched_getaffinity(0) if cpus is None else cpus
    hz = os.sysconf("SC_CLK_TCK")
    state = {"busy": busy_ticks(cpus, stat) / hz, "own": own(), "at": clock()}

    def measure() -> float:
        busy, mine, now = busy_ticks(cpus, stat) / hz, own(), clock()
        elapsed = now - state["at"]
        others = ((busy - state["busy"]) - (mine - state["own"])) / elapsed if elapsed > 0 else 0.0
        state.update(busy=busy, own=mine, at=now)
        return max(0.0, others)

    return measure


def _set_torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


class ThreadGovernor:
    """Sets the compute thread's torch thread count between `fewest` and `most` from the others' load."""

    def __init__(self, most: int, fewest: int, *, interval_s: float = 0.5, tau_s: float = 4.0,
                 high: float = 0.45, low: float = 0.35, usage: Callable[[], float] | None = None,
                 set_threads: Callable[[int], None] = _set_torch_threads,
                 clock: Callable[[], float] = time.monotonic, cores: int | None = None) -> None:
        if not 1 <= fewest <= most:
            raise ValueError(f"thread range: need 1 <= fewest <= most (got {fewest}-{most})")
        self.most, self.fewest = most, fewest
        self.interval_s, self.tau_s = interval_s, tau_s
        cores = cores if cores is not None else len(os.sched_getaffinity(0))
        share = max(0, cores - most)  # what `most` threads leave the others (another slot's share)
        self.high, self.low = share + high, share + low
        self.usage = usage if usage is not None else other_cores_busy()
        self.set_threads, self.clock = set_threads, clock
        self.threads = fewest
        self.load: float | None = None  # the others' load, averaged over the last ~tau_s seconds
        self.last = self.changed_at = clock()  # the interval before the first tick (start-up) counts
        self.due = self.last + interval_s
        self.seconds_at: dict[int, float] = {}
        self.owner = threading.get_ident()  # thread counts are per thread: only the compute thread sets them
        set_threads(fewest)

    def tick(self) -> None:
        now = self.clock()
        if now < self.due or threading.get_ident() != self.owner:
            return
        self.due = now + self.interval_s
        busy, weight = self.usage(), 1.0 - math.exp(-(now - self.last) / self.tau_s)
        self.last = now
        self.load = busy if self.load is None else self.load + weight * (busy - self.load)
        if self.threads == self.most and self.load > self.high:
            self._use(self.fewest)
        elif self.threads == self.fewest and self.load <= self.low:
            self._use(self.most)

    def _use(self, n: int) -> None:
        if n != self.threads:
            self.set_threads(n)
            self._account(self.clock())
            self.threads = n

    def _account(self, now: float) -> None:
        self.seconds_at[self.threads] = self.seconds_at.get(self.threads, 0.0) + now - self.changed_at
        self.changed_at = now

    def summary(self) -> str:
        """How long the run spent at each thread count, e.g. 'threads: 2 for 6.1 s, 1 for 1.9 s'."""
        self._account(self.clock())
        parts = [f"{n} for {s:.1f} s" for n, s in sorted(self.seconds_at.items(), reverse=True)]
        return "threads: " + ", ".join(parts)


def parse_range(text: str) -> tuple[int, int]:
    """'fewest-most' → (fewest, most); ValueError naming the variable on anything else."""
    low, sep, high = text.partition("-")
    try:
        fewest, most = int(low), int(high)
    except ValueError:
        raise ValueError(f"{RANGE_VAR}: expected FEWEST-MOST, e.g. 1-2 (got {text!r})") from None
    if not sep or not 1 <= fewest <= most:
        raise ValueError(f"{RANGE_VAR}: expected 1 <= FEWEST <= MOST (got {text!r})")
    return fewest, most


_process_governor: ThreadGovernor | None = None  # the one governing this process (a run worker's)


def governor_from_env() -> ThreadGovernor | None:
    """The worker's governor when its slot gave it a thread range, else None (a fixed thread count);
    it governs the process: `thread_budget` and `threads_now` answer from it."""
    global _process_governor
    text = os.environ.get(RANGE_VAR, "")
    if not text:
        return None
    fewest, most = parse_range(text)
    if fewest == most:
        return None
    try:
        _process_governor = ThreadGovernor(most, fewest)
    except OSError:  # no /proc/stat: the fixed, robust count
        _set_torch_threads(fewest)
        return None
    return _process_governor


def thread_budget(default: int) -> int:
    """The most threads this process may use: its governor's largest count, else `default`."""
    return _process_governor.most if _process_governor is not None else default


def threads_now(default: int) -> int:
    """The threads this process may use at this moment: its governor's current count, else `default`.
    For code that runs its own worker threads (one torch thread each) instead of torch's."""
    return _process_governor.threads if _process_governor is not None else default
