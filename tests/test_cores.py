"""The CPU worker's thread governor: its decisions on a scripted load, what it reads from /proc/stat
(a written file against hand-computed figures, and a real busy process), and the worker's wiring."""

from __future__ import annotations

import inspect
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from samlab.runs.cores import ThreadGovernor, other_cores_busy, parse_range

TAU_S = inspect.signature(ThreadGovernor).parameters["tau_s"].default  # the averaging time it is built with

linux_only = pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads /proc/stat (Linux)")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def governor(loads: list[float], *, most: int = 2, fewest: int = 1, cores_: int = 2):
    """A governor over a scripted sequence of other processes' loads; returns it, its clock and the
    thread counts it set."""
    clock, calls, feed = Clock(), [], iter(loads)
    gov = ThreadGovernor(most, fewest, usage=lambda: next(feed), set_threads=calls.append, clock=clock,
                         cores=cores_)  # the defaults: every 0.5 s, averaged over 2 s, down above 0.45, up at 0.35
    return gov, clock, calls


def step(gov: ThreadGovernor, clock: Clock, dt: float = 0.5) -> int:
    clock.now += dt
    gov.tick()
    return gov.threads


def ema(loads: list[float], dts: list[float], tau: float = TAU_S) -> list[float]:
    """The exponential average by hand: the first measurement as is, then x += (1 - e^(-dt/tau)) (load - x)."""
    out, x = [], None
    for load, dt in zip(loads, dts):
        x = load if x is None else x + (1 - math.exp(-dt / tau)) * (load - x)
        out.append(x)
    return out


def test_it_starts_at_the_fewest_and_goes_to_the_most_when_the_machine_is_quiet():
    gov, clock, calls = governor([0.1, 0.0, 0.0])
    assert calls == [1] and gov.threads == 1
    assert step(gov, clock) == 2  # a quiet first interval (the task's start-up): every core
    assert gov.load == pytest.approx(0.1)
    assert [step(gov, clock) for _ in range(2)] == [2, 2] and calls == [1, 2]  # set once per change


def test_the_averaged_load_follows_the_exponential_average_and_the_two_thresholds():
    loads = [0.0] + [1.0] * 6 + [0.0] * 12  # another process takes a whole core for 3 s, then stops
    gov, clock, calls = governor(loads)
    threads, averages = [], []
    for _ in loads:
        threads.append(step(gov, clock))
        averages.append(gov.load)
    expected = ema(loads, [0.5] * len(loads))
    assert averages == pytest.approx(expected)
    # down once the average passes 0.45, up once it is back to 0.35, nothing in between
    want, now = [], 1
    for x in expected:
        now = 1 if (now == 2 and x > 0.45) else 2 if (now == 1 and x <= 0.35) else now
        want.append(now)
    assert threads == want and want[:5] == [2] * 5 and 1 in want and want[-1] == 2  # 2 s of it: no change yet
    assert gov.summary().startswith("threads: 2 for ") and calls == [1, 2, 1, 2]


def test_a_steady_load_keeps_the_run_at_the_fewest_and_a_live_pages_bursts_do_not():
    # another process at ≈ 0.6 core on average (in a 2 s cycle): the run gives it a core
    gov, clock, _ = governor([0.0] + [1.0, 0.8, 0.3, 0.3] * 8)
    assert step(gov, clock) == 2
    threads = [step(gov, clock) for _ in range(32)]
    assert threads[:4] == [2] * 4 and set(threads[12:]) == {1}
    # a live page refreshing every 2 s (≈ 0.3 core, in one busy half-second of four): the run keeps both
    gov, clock, _ = governor([0.0] + [1.0, 0.05, 0.05, 0.05] * 8)
    assert {step(gov, clock) for _ in range(33)} == {2}
    # the same after a full redraw of the page (a second of 1.5 cores): a burst, not a load to yield to
    gov, clock, _ = governor([0.0, 1.5, 1.5] + [1.0, 0.05, 0.05, 0.05] * 8)
    assert {step(gov, clock) for _ in range(35)} == {2}


def test_a_long_quiet_start_up_counts():
    gov, clock, _ = governor([0.1] + [1.2] * 6)
    assert step(gov, clock, dt=3.0) == 2  # the first tick comes after 3 quiet seconds of start-up
    assert [step(gov, clock) for _ in range(6)] == [2, 2, 2, 1, 1, 1]  # a whole other core busy: down in 2 s


def test_no_measurement_before_the_interval_has_passed():
    gov, clock, _ = governor([0.0, 0.9])
    step(gov, clock, dt=0.2)
    step(gov, clock, dt=0.2)  # 0.4 s: not due, the scripted loads are not read
    assert step(gov, clock, dt=0.2) == 2  # 0.6 s: the first load (quiet) is read
    with pytest.raises(StopIteration):  # everything scripted was read exactly when due
        step(gov, clock, dt=0.5)
        step(gov, clock, dt=0.5)


def test_others_may_use_what_the_most_threads_leave_them():
    # 8 cores, two slots of 4: the other slot's 4 busy cores are its share, not contention
    gov, clock, _ = governor([4.0, 4.2, 4.2, 4.3, 6.0, 6.0, 6.0], most=4, fewest=3, cores_=8)
    assert [step(gov, clock) for _ in range(7)] == [4, 4, 4, 4, 4, 3, 3]


def test_only_the_thread_that_made_it_sets_thread_counts():
    gov, clock, calls = governor([0.0] * 10)
    clock.now += 1.0
    other = threading.Thread(target=gov.tick)
    other.start()
    other.join()
    assert calls == [1] and gov.threads == 1  # torch thread counts are per thread
    gov.tick()
    assert gov.threads == 2


@pytest.mark.parametrize("text, expected", [("1-2", (1, 2)), ("3-4", (3, 4)), ("2-2", (2, 2))])
def test_parse_range(text, expected):
    assert parse_range(text) == expected


@pytest.mark.parametrize("text", ["2", "0-2", "3-1", "a-b", "1-"])
def test_parse_range_rejects_bad_values_naming_the_variable(text):
    with pytest.raises(ValueError, match="SAMLAB_CPU_THREADS_RANGE"):
        parse_range(text)


def write_stat(path: Path, per_cpu: list[list[int]]) -> None:
    total = [sum(column) for column in zip(*per_cpu)]
    lines = ["cpu  " + " ".join(map(str, total))]
    lines += [f"cpu{i} " + " ".join(map(str, row)) for i, row in enumerate(per_cpu)]
    path.write_text("\n".join(lines + ["intr 1 2 3", "ctxt 99"]) + "\n")


def test_other_cores_busy_from_a_written_stat_file(tmp_path):
    # columns: user nice system idle iowait irq softirq steal guest guest_nice
    stat = tmp_path / "stat"
    hz = os.sysconf("SC_CLK_TCK")
    write_stat(stat, [[100, 0, 0, 900, 0, 0, 0, 0, 0, 0]] * 3)
    clock, own = Clock(), {"s": 5.0}
    measure = other_cores_busy(stat=str(stat), cpus={0, 2}, own=lambda: own["s"], clock=clock)
    # over 2 s: cpu0 busy 1.0 s user + 0.4 s nice + 0.2 s steal, cpu1 (not ours) 2 s, cpu2 0.5 s system
    # + 0.1 s irq + 0.1 s softirq + 3 s idle/iowait (idle); this process used 0.8 s of it
    write_stat(stat, [[100 + hz, int(0.4 * hz), 0, 900, 0, 0, 0, int(0.2 * hz), 0, 0],
                      [100 + 2 * hz, 0, 0, 900, 0, 0, 0, 0, 0, 0],
                      [100, 0, int(0.5 * hz), 900 + 2 * hz, hz, int(0.1 * hz), int(0.1 * hz), 0, 0, 0]])
    clock.now, own["s"] = 2.0, 5.8
    assert measure() == pytest.approx((1.0 + 0.4 + 0.2 + 0.5 + 0.1 + 0.1 - 0.8) / 2.0, abs=2 / hz)
    clock.now = 3.0  # nothing happened since: nobody busy
    assert measure() == 0.0


@linux_only
def test_a_real_busy_process_counts_and_this_one_does_not():
    measure = other_cores_busy()
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass"])
    try:
        time.sleep(0.3)  # the child has started spinning
        measure()
        time.sleep(1.0)
        busy_child = measure()
    finally:
        child.wait()
    t = time.process_time()
    while time.process_time() - t < 1.0:  # now this process spins and nothing of ours runs beside it
        pass
    busy_self = measure()
    assert busy_child >= 0.6  # one spinning process: about a core (others on the machine only add)
    assert busy_self <= busy_child - 0.3  # this process's own spinning is not counted


@linux_only
def test_the_worker_of_a_cpu_slot_runs_its_task_under_a_governor(tmp_path, monkeypatch):
    """A real worker process on a default CPU slot: its task sees the governor's thread counts (the
    range's fewest at the start), and a fixed SAMLAB_CPU_THREADS gives none."""
    from samlab.runs import executors

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.delenv("SAMLAB_CPU_THREADS", raising=False)
    monkeypatch.delenv("SAMLAB_CPU_SLOTS", raising=False)
    monkeypatch.setattr(executors.os, "cpu_count", lambda: 2)
    probe = ("import torch\nfrom samlab.runs.cores import governor_from_env\n"
             "g = governor_from_env()\nprint(torch.get_num_threads(), None if g is None else (g.fewest, g.most))")
    env = executors._worker_env(executors.local_slots()[0])
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1", "(1,", "2)"]
    monkeypatch.setenv("SAMLAB_CPU_THREADS", "2")
    env = executors._worker_env(executors.local_slots()[0])
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["2", "None"]


def test_governor_ticks_where_the_task_checks_in(tmp_path):
    """StoreReporter calls its on_check at every should_stop and progress: the governor's hook."""
    from samlab.runs.store import Store
    from samlab.runs.worker import StoreReporter

    store = Store(f"sqlite:///{tmp_path / 'runs.db'}")
    run_id = store.create_runs([{"kind": "train", "params": {}}])[0]
    checks = []
    reporter = StoreReporter(store, run_id, on_check=lambda: checks.append(1))
    reporter.should_stop()
    reporter.progress(1, 10, "step")
    reporter.metrics("step", 1, {"loss": 1.0})
    assert len(checks) == 2
