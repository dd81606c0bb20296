"""What watching costs a run: its wall time with a dashboard page open against no page at all.

    python benchmarks/live_overhead.py [--repeats 3] [--epochs 40] [--pages train,train-cli,runs,hessian] [--one-thread]
                                       [--settings NAME:VAR=VALUE[+VAR=VALUE],...] [--json]

Starts the dashboard server as `make run` does (`streamlit run app.py` in the app folder, with its
`.streamlit/config.toml`) on a free loopback port over a fresh run store, seeds the store with 100
finished runs with curves, and times the same fixed run (digits-cnn, --epochs epochs, seed 0, CPU)
under interleaved conditions, repeated --repeats times:

  none      no browser at all (the baseline), with the worker's default threads (its governor)
  all-cores no browser, one thread per core, spinning while they wait (SAMLAB_CPU_THREADS=cores,
            OMP_WAIT_POLICY=ACTIVE): the run with all cores to itself, against which the chosen
            setting must not be slower by > 10 %
  train     the Train page open in headless Chromium, the run launched as a user launches it: the
            digits-cnn preset loaded into the form, epochs and seed set, the page's Launch button
            clicked; the page then watches the run to the end
  train-cli the Train page open, the run submitted elsewhere (as `samlab submit` would): the page finds
            it within a second (the feed of the active runs) and watches it to the end
  runs      the Runs page open with the 100 seeded runs selected
  NAME      (--one-thread, --settings) the run with other worker thread settings: one-thread is
            SAMLAB_CPU_THREADS=1; a setting puts its variables into the environment the scheduler and
            its workers inherit (e.g. passive:OMP_WAIT_POLICY=PASSIVE, spin3e4:GOMP_SPINCOUNT=30000);
            each is timed with no page and, as train-NAME, with the Train page open
  hessian   the analysis the Hessian page runs with its defaults (top-5 and bottom-5 eigenvalues,
            Hutch++ trace with 99 vectors, density, per-layer, 512 samples) of a trained digits-cnn run,
            timed with no page (submitted from here) and as a user runs it: the Hessian page opened, the
            run picked, then the page's own "Compute the spectrum" button clicked; the page then watches
            the analysis to the end

Every page is opened, prepared, and left until the browser has finished drawing it (under 0.1 core
for a second, `wait_browser_idle`) before its run is submitted: the ratio is what watching costs, not
the page's first load (drawing the Train page's form and finished cards takes 3-5 s of a core here).

A run's wall time is finished_at − started_at in the store (the worker's own time, without the
scheduler's start-up). While a run is timed, the CPU seconds (/proc utime + stime) of the server and
of the headless browser are sampled; CPU per wall second is printed per condition (the figures the
machine's load moves least). Prints per-condition medians, the page/no-page ratios (a page against the
no-page runs of the same setting), each setting's no-page time over all-cores, and the load average;
and, as paired_*, the mean ± standard error of each page run's wall time over the no-page runs timed
just before and after it — the figure to read when the machine's speed drifts between repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import samlab
from samlab import tasks
from samlab.config import preset
from samlab.runs import jobs
from samlab.runs.store import FINAL, Store

APP_DIR = Path(samlab.__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
SEEDED = 100
ALL_CORES = {"SAMLAB_CPU_THREADS": str(os.cpu_count() or 1), "OMP_WAIT_POLICY": "ACTIVE"}
TRAIN_READY = "most recent finished"  # the Train page's runs panel is drawn (the menu also says "Runs")
HESSIAN = {"k": 5, "n_samples": 512, "trace_samples": 99, "mode": "eval"}  # the page's defaults


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads) from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def browser_cpu_seconds() -> float:
    """CPU seconds of the live Chromium processes started under this process (the headless browser)."""
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    head, tail = f.read().rsplit(")", 1)
            except OSError:
                continue
            parents[int(entry)] = int(tail.split()[1])
            names[int(entry)] = head.split("(", 1)[1]
    mine, grown = {os.getpid()}, True
    while grown:  # the descendants of this process
        grown = {pid for pid, ppid in parents.items() if ppid in mine} - mine
        mine |= grown
    total = 0.0
    for pid in mine:
        if "chrom" in names.get(pid, "").lower():
            with suppress(OSError, IndexError):
                total += cpu_seconds(pid)
    return total


def wait_browser_idle(quiet: float = 0.1, timeout: float = 60.0) -> float:
    """Wait until the browser has finished drawing the page it opened (under `quiet` of a core over one
    second), so that a timed run pays for watching, not for the page's first load; returns the wait."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        before = browser_cpu_seconds()
        time.sleep(1.0)
        if browser_cpu_seconds() - before < quiet:
            break
    return time.monotonic() - start


def load() -> float:
    return os.getloadavg()[0]


@contextmanager
def server(app_dir: Path, python: str, env: dict[str, str], log: Path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [python, "-m", "streamlit", "run", "app.py", "--server.address", "127.0.0.1", "--server.port",
             str(port), "--browser.gatherUsageStats", "false"],
            cwd=app_dir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the dashboard did not start (see {log})")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        yield url, proc.pid
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_final(store: Store, run_id: str, timeout: float = 1800) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = store.get_run(run_id)
        if run["status"] in FINAL:
            return run
        time.sleep(0.25)
    raise TimeoutError(f"run {run_id} did not finish within {timeout:.0f} s")


def wait_running(store: Store, run_id: str) -> None:
    while store.get_run(run_id)["status"] == "queued":
        time.sleep(0.05)


def wall(run: dict[str, Any]) -> float:
    if run["status"] != "completed":
        raise RuntimeError(f"run {run['id']} ended {run['status']}: {run.get('error')}")
    return (run["finished_at"] - run["started_at"]).total_seconds()


def settle(store: Store) -> None:
    """Wait until the previous scheduler has exited, so the next run starts a fresh one with this
    process's environment (SAMLAB_SCHEDULER_IDLE_S is short)."""
    from samlab.runs.scheduler import lock_path, release, try_lock

    for _ in range(100):
        fd = try_lock(lock_path(store))
        if fd is not None:
            release(fd)
            return
        time.sleep(0.1)


def seed_store(store: Store, rows: list[tuple], params: dict[str, Any]) -> list[str]:
    """SEEDED finished runs with the curves of a real run (the seed differs, so do the labels)."""
    ids = store.create_runs([{"kind": "train", "params": {**params, "seed": 1000 + i}, "name": f"history {i}"}
                             for i in range(SEEDED)])
    for run_id in ids:
        store.start_run(run_id, pid=os.getpid(), host="bench", device="cpu")
        store.flush(run_id, rows, progress=1.0, message="completed")
        store.finish_run(run_id, "completed", summary={})
    return ids


def metric_rows(store: Store, run_id: str) -> list[tuple]:
    frame = store.metrics([run_id])
    return [(r.kind, int(r.step), r.name, float(r.value) if r.value == r.value else None, 0.0)
            for r in frame.itertuples()]


def timed(store: Store, submit, pid: int) -> dict[str, float]:
    """Submit a run, wait for it; its wall time, the CPU of the server and of the browser per wall second."""
    settle(store)
    cpu0, browser0, t0, load0 = cpu_seconds(pid), browser_cpu_seconds(), time.monotonic(), load()
    run = wait_final(store, submit())
    cpu1, browser1, t1 = cpu_seconds(pid), browser_cpu_seconds(), time.monotonic()
    return {"wall_s": wall(run), "server_cpu_per_s": (cpu1 - cpu0) / (t1 - t0),
            "browser_cpu_per_s": max(0.0, browser1 - browser0) / (t1 - t0), "load": load0}


def wait_launched(store: Store, before: set[str], timeout: float = 120) -> str:
    """The id of the train run that the page queued, once it has (one not among `before`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = [r["id"] for r in store.list_runs(kind="train", limit=5) if r["id"] not in before]
        if new:
            return new[0]
        time.sleep(0.05)
    raise TimeoutError("the page did not queue the run")


def fill_train_form(page, epochs: int) -> None:
    """The Train page's form set to the timed run: the digits-cnn preset, `epochs`, seed 0, the CPU."""
    def settled() -> None:
        page.wait_for_timeout(300)
        page.locator('[data-testid="stStatusWidget"]').wait_for(state="detached", timeout=60_000)

    page.get_by_role("combobox", name="Preset").click()
    page.keyboard.type("digits-cnn")
    page.keyboard.press("Enter")
    settled()
    page.get_by_role("button", name="Load preset").click()
    settled()
    for label, value in (("epochs", str(epochs)), ("seeds", "0")):
        box = page.get_by_label(label, exact=True)
        box.fill(value)
        box.press("Enter")
        settled()
    page.get_by_role("combobox", name="device").click()
    page.get_by_role("option", name="cpu", exact=True).click()
    settled()


def wait_submitted(store: Store, key: str, timeout: float = 120) -> str:
    """The id of the run with this cache key, once the page has queued it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = store.find_cached(key)
        if found is not None:
            return found["id"]
        time.sleep(0.05)
    raise TimeoutError("the page did not queue the analysis")


def parse_settings(text: str) -> list[tuple[str, dict[str, str]]]:
    """'name:VAR=VALUE+VAR=VALUE,…' → [(name, {VAR: VALUE})]."""
    settings = []
    for item in filter(None, text.split(",")):
        name, _, assignments = item.partition(":")
        pairs = [a.split("=", 1) for a in assignments.split("+") if a]
        if not name or not pairs or any(len(p) != 2 or not p[0] for p in pairs):
            raise SystemExit(f"--settings: expected NAME:VAR=VALUE[+VAR=VALUE], got {item!r}")
        settings.append((name, dict(pairs)))
    return settings


@contextmanager
def environ(overrides: dict[str, str]):
    """These variables in os.environ (inherited by the scheduler and its workers), restored after."""
    before = {k: os.environ.get(k) for k in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--pages", default="train,train-cli,runs,hessian")
    parser.add_argument("--app-dir", default=str(APP_DIR), help="the app folder (default: this samlab's)")
    parser.add_argument("--python", default=sys.executable, help="the server's interpreter")
    parser.add_argument("--one-thread", action="store_true",
                        help="also time the run with one worker thread (SAMLAB_CPU_THREADS=1), no page and Train")
    parser.add_argument("--settings", default="", help="other worker thread settings to time, no page and Train: "
                        "NAME:VAR=VALUE[+VAR=VALUE],… (e.g. passive:OMP_WAIT_POLICY=PASSIVE)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    pages = [p for p in args.pages.split(",") if p]
    settings = ([("one-thread", {"SAMLAB_CPU_THREADS": "1"})] if args.one_thread else []) + parse_settings(args.settings)
    from playwright.sync_api import sync_playwright

    tmp = Path(tempfile.mkdtemp(prefix="samlab-live-"))
    url_store = f"sqlite:///{tmp / 'samlab.db'}"
    os.environ.update({"SAMLAB_STORE": url_store, "SAMLAB_SCHEDULER_IDLE_S": "0.3", "SAMLAB_CPU_SLOTS": "1",
                       "PYTHONPATH": args.app_dir})
    store = Store(url_store)
    config = preset("digits-cnn", {"epochs": args.epochs, "seed": 0, "device": "cpu"})

    def train() -> str:
        return jobs.submit(config, store=store)

    def launch(page) -> str:
        before = {r["id"] for r in store.list_runs(kind="train", limit=5)}
        page.get_by_role("button", name="Launch").click()
        return wait_launched(store, before)

    results: dict[str, list[dict[str, float]]] = {}
    sequence: list[tuple[str, float]] = []  # (condition, wall) in the order timed, for the paired ratios

    def record(condition: str, figures: dict[str, float]) -> None:
        results.setdefault(condition, []).append(figures)
        sequence.append((condition, figures["wall_s"]))
        print(f"  {condition:16s} wall {figures['wall_s']:7.2f} s  server CPU {figures['server_cpu_per_s']:.3f}"
              f" core  browser CPU {figures['browser_cpu_per_s']:.3f} core  load {figures['load']:.2f}",
              file=sys.stderr, flush=True)

    with server(Path(args.app_dir), args.python, dict(os.environ), tmp / "streamlit.log") as (url, pid), \
            sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
        first = wait_final(store, train())  # warm-up, and the curves the seeded runs get
        settle(store)  # no scheduler alive while the seeded runs are briefly queued: none launches them
        seeded = seed_store(store, metric_rows(store, first["id"]), first["params"])

        def with_page(path: str, ready: str, condition: str, submit, prepare=None) -> None:
            """Time a run with a page open: the page loaded (and prepared) first, then the run submitted."""
            page = browser.new_page(viewport={"width": 1400, "height": 1600})
            try:
                page.goto(f"{url}/{path}", wait_until="load")
                page.get_by_text(ready).first.wait_for(timeout=120_000)
                if prepare is not None:
                    prepare(page)
                wait_browser_idle()
                record(condition, timed(store, lambda: submit(page), pid))
            finally:
                page.close()

        checkpoint = None
        if "hessian" in pages:
            from dashboard.hessian_view import request

            checkpoint = first["checkpoint_path"]

        for r in range(args.repeats):
            print(f"repeat {r + 1}/{args.repeats}", file=sys.stderr, flush=True)
            record("none", timed(store, train, pid))
            with environ(ALL_CORES):
                record("all-cores", timed(store, train, pid))
            if "train" in pages:
                with_page("Train", TRAIN_READY, "train", launch, prepare=lambda page: fill_train_form(page, args.epochs))
                record("none", timed(store, train, pid))
            if "train-cli" in pages:
                with_page("Train", TRAIN_READY, "train-cli", lambda page: train())
                record("none", timed(store, train, pid))
            for name, overrides in settings:
                with environ(overrides):
                    record(name, timed(store, train, pid))
                    if "train" in pages:
                        with_page("Train", TRAIN_READY, f"train-{name}", lambda page: train())
            if "runs" in pages:
                with_page("Runs?runs=" + ",".join(seeded), "Summary", "runs", lambda page: train())
                record("none", timed(store, train, pid))
            if "hessian" in pages and checkpoint:
                record("hessian-none", timed(store, lambda seed=2 * r + 1: jobs.submit_cached(
                    "hessian", request(checkpoint, seed=seed, per_layer=True, **HESSIAN), store=store), pid))
                seed = 2 * r + 2
                query = "&".join(f"{k}={v}" for k, v in {"k": HESSIAN["k"], "n_samples": HESSIAN["n_samples"],
                                                          "trace": HESSIAN["trace_samples"], "seed": seed}.items())
                key = tasks.cache_key("hessian", tasks.check_params(
                    "hessian", request(checkpoint, seed=seed, per_layer=True, **HESSIAN)))

                def pick(page, first_id=first["id"]) -> None:
                    box = page.get_by_role("combobox").first
                    box.click()
                    page.keyboard.type(first_id[:6])
                    page.keyboard.press("Enter")
                    page.keyboard.press("Escape")  # the multiselect commits its value when it closes
                    page.get_by_role("button", name="Compute the spectrum").first.wait_for(timeout=120_000)

                def click(page, key=key) -> str:
                    page.get_by_role("button", name="Compute the spectrum").first.click()
                    return wait_submitted(store, key)

                with_page(f"Hessian?{query}", "λ_max during training", "hessian", click, prepare=pick)
        browser.close()
    summary = summarize(results, [name for name, _ in settings], sequence)
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        print_summary(summary, [name for name, _ in settings])
    return 0


def summarize(results: dict[str, list[dict[str, float]]], settings: list[str],
              sequence: list[tuple[str, float]] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {"cores": os.cpu_count(), "load_end": load()}
    for condition, rows in results.items():
        out[condition] = {key: statistics.median(r[key] for r in rows) for key in rows[0]} | {"n": len(rows)}

    def ratio(key: str, numerator: str, denominator: str) -> None:
        if numerator in out and denominator in out:
            out[key] = out[numerator]["wall_s"] / out[denominator]["wall_s"]
        pairs = paired_ratios(sequence, numerator, denominator)
        if len(pairs) >= 2:
            out[key.replace("ratio_", "paired_", 1)] = {
                "mean": statistics.mean(pairs), "se": statistics.stdev(pairs) / len(pairs) ** 0.5,
                "median": statistics.median(pairs), "n": len(pairs)}

    ratio("ratio_train", "train", "none")
    ratio("ratio_train_cli", "train-cli", "none")
    ratio("ratio_runs", "runs", "none")
    ratio("ratio_hessian", "hessian", "hessian-none")
    ratio("ratio_chosen_over_all_cores", "none", "all-cores")
    for name in settings:
        ratio(f"ratio_train_{name.replace('-', '_')}", f"train-{name}", name)
        ratio(f"ratio_{name.replace('-', '_')}_over_all_cores", name, "all-cores")
    return out


def paired_ratios(sequence: list[tuple[str, float]], condition: str, baseline: str) -> list[float]:
    """Each `condition` run's wall over the mean of the nearest `baseline` runs timed just before and just
    after it: the machine's speed drifts by tens of % between minutes here, and a ratio of neighbours
    cancels most of that where a ratio of medians over the whole benchmark does not."""
    out = []
    for i, (name, wall) in enumerate(sequence):
        if name != condition:
            continue
        before = next((w for n, w in reversed(sequence[:i]) if n == baseline), None)
        after = next((w for n, w in sequence[i + 1:] if n == baseline), None)
        near = [w for w in (before, after) if w is not None]
        if near:
            out.append(wall / statistics.mean(near))
    return out


def print_summary(summary: dict[str, Any], settings: list[str]) -> None:
    print(f"{summary['cores']} cores; load average at the end {summary['load_end']:.2f}")
    conditions = ["none", "all-cores", "train", "train-cli", "runs", *(c for n in settings for c in (n, f"train-{n}")),
                  "hessian-none", "hessian"]
    for condition in conditions:
        if condition in summary:
            s = summary[condition]
            print(f"{condition:16s} median wall {s['wall_s']:7.2f} s  server CPU {s['server_cpu_per_s']:.3f} core"
                  f"  browser CPU {s['browser_cpu_per_s']:.3f} core  load {s['load']:.2f}  (n={s['n']})")
    for key in sorted(k for k in summary if k.startswith("ratio_")):
        print(f"{key:36s} {summary[key]:.3f}")
    for key in sorted(k for k in summary if k.startswith("paired_")):
        p = summary[key]
        print(f"{key:36s} {p['mean']:.3f} ± {p['se']:.3f} (median {p['median']:.3f}, n={p['n']}: each run over the"
              " no-page runs timed next to it)")


if __name__ == "__main__":
    sys.exit(main())
