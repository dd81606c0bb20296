"""Running an adaptive search: one Optuna study per m, every trial an ordinary run per seed.

    python -m samlab.runs.search drive SEARCH_ID [--store URL]

`submit(spec)` records the search in the store (table `searches`; its id is also the group id of its
runs) and starts its *driver*: a detached process (own session, log under <runs root>/searches/)
that outlives the UI or CLI that started it. The studies live in the same database as the runs
(Optuna's RDB storage on the store's URL, SQLite or PostgreSQL), named "<search id>-m<m>", each with
a seeded TPE sampler and a median pruner. A file lock (per search, beside the run folders) keeps one
driver per search on a host.

Each tick the driver
  - writes its heartbeat to the search row and reads its cancel flag;
  - follows the trials in flight: the mean test accuracy over a trial's runs at each epoch all of
    them reached is reported to Optuna as an intermediate value, and when the pruner says so the
    trial's runs are asked to stop with reason "pruned" (the store's cancel flag: the run
    checkpoints, ends, and is recorded as `pruned`); a trial whose runs all ended is told to its
    study (objective = mean final test accuracy; pruned; or failed);
  - asks new trials while fewer than `parallel` are in flight and a study has budget left, queues
    their runs (study and trial number recorded on each), and starts them on the configured runner:
    sweep workers on this host (default locally), or `jobs.start_runs` (the local scheduler, or one
    Ray job per trial with SAMLAB_EXECUTOR=ray).

Pruning is decided here and not in the training run: the objective is a mean over seeds, which only
the driver sees whole; the runs need no Optuna and no access to the studies (a Ray node needs only
the store); only the driver writes the studies, so no many-writer contention on the RDB storage; and
the decision reaches any executor through the cancel flag every worker already reads at each flush.
The cost is latency: a hopeless run trains on for one driver tick plus one flush (a few seconds).

Resume (after a cancel, or a driver that died): `resume(search_id)` starts a new driver. It adopts
trials still running in their studies and follows their runs (which kept training meanwhile); a
trial asked but never queued (the driver died in between) is failed and not counted. A study's
budget counts completed, pruned and failed trials, so finished trials are never repeated; trials
cancelled with the search do not count and are asked again.

Public API: submit(spec, *, store=None) -> search_id, start_driver(search_id, *, store=None) -> pid,
cancel(search_id, *, store=None) -> int, resume(search_id, *, store=None) -> pid,
progress(search_id, *, store=None) -> dict, wait(search_id, *, store=None, timeout=None) -> dict,
Driver(store, search_id).run(), main(argv).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from samlab.runs import jobs
from samlab.runs import sweeps as sweep_runs
from samlab.runs.executors import backend_name, env_float, hostname, pid_alive, spawn_module
from samlab.runs.scheduler import release, try_lock
from samlab.runs.store import ACTIVE, FINAL, Store, open_store
from samlab.search import SearchSpec, epoch_means, trial_objective

OUTCOME = "samlab_outcome"  # a trial's user attribute: why it ended FAIL ("failed", "cancelled", "orphan")
COUNTED = ("failed",)  # FAIL outcomes that use up budget
LINGER_S = 10.0  # sweep workers of a search wait this long for the next trial's runs


# -- launching and control ----------------------------------------------------------------------------
def submit(spec: SearchSpec, *, store: Store | str | None = None) -> str:
    """Record the search and start its driver; returns the search id (also its runs' group id)."""
    spec.validate()
    if backend_name() == "ray":
        spec.runner = "scheduler"  # jobs.start_runs hands each trial to the cluster as a Ray job
    st = open_store(store)
    search_id = jobs.new_group_id(spec.name)
    st.create_search(search_id, spec.name, spec.to_dict())
    start_driver(search_id, store=st)
    return search_id


def _log_path(st: Store, search_id: str) -> Path:
    return Path(st.runs_root) / "searches" / f"{search_id}.log"


def start_driver(search_id: str, *, store: Store | str | None = None) -> int:
    """Start a detached driver for the search; returns its pid (it exits at once if one is running)."""
    st = open_store(store)
    st.get_search(search_id)
    proc = spawn_module("samlab.runs.search", ["drive", search_id, "--store", st.url], _log_path(st, search_id),
                        env=dict(os.environ) | {"PYTHONUNBUFFERED": "1"})
    return proc.pid


def cancel(search_id: str, *, store: Store | str | None = None) -> int:
    """Stop the search: the driver fails its trials in flight and exits; every active run of the search
    is cancelled here as well (so a dead driver leaves nothing running). Returns the runs asked to stop."""
    st = open_store(store)
    st.get_search(search_id)
    st.request_search_cancel(search_id)
    return sweep_runs.cancel(search_id, store=st)


def resume(search_id: str, *, store: Store | str | None = None) -> int:
    """Continue a cancelled, failed or driverless search with a new driver; returns its pid."""
    st = open_store(store)
    row = st.get_search(search_id)
    if row["status"] == "completed":
        raise ValueError(f"search_id: search {search_id} is completed; launch a new one to search further")
    if row["status"] == "running" and driver_alive(row, st):
        raise ValueError(f"search_id: search {search_id} has a live driver (pid {row['pid']} on {row['host']})")
    st.reopen_search(search_id)
    return start_driver(search_id, store=st)


def driver_alive(row: dict[str, Any], store: Store) -> bool:
    """Whether the search's driver is alive: its pid on this host, else a fresh heartbeat."""
    if row.get("pid") and row.get("host") == hostname():
        return pid_alive(int(row["pid"]))
    if row.get("heartbeat_at") is None:
        return False
    age = (store.server_now() - row["heartbeat_at"]).total_seconds()
    return age < env_float("SAMLAB_STALE_S", 60.0, 1.0)


def progress(search_id: str, *, store: Store | str | None = None) -> dict[str, Any]:
    """The search as a whole: its row (status, driver), trials finished per m against the budget, and
    run counts by status."""
    from samlab.search import best_by_m, trial_history

    st = open_store(store)
    row = st.get_search(search_id)
    spec = SearchSpec.from_dict(row["spec"])
    history = trial_history(st, search_id)
    best = best_by_m(history)
    counts = st.count_by_status(group=search_id)
    finished = int(best["finished"].sum()) if not best.empty else 0
    budget = spec.trials * len(spec.ms)
    return {"search_id": search_id, "name": row["name"], "status": row["status"], "error": row["error"],
            "driver_alive": row["status"] == "running" and driver_alive(row, st), "spec": spec,
            "history": history, "best": best, "counts": counts, "trials_finished": finished,
            "trials_budget": budget, "done": row["status"] != "running"}


def wait(search_id: str, *, store: Store | str | None = None, timeout: float | None = None,
         poll_s: float = 1.0) -> dict[str, Any]:
    """Block until the search ended (or `timeout` seconds); returns `progress`."""
    st = open_store(store)
    return sweep_runs.poll_until_done(lambda: progress(search_id, store=st), timeout=timeout, poll_s=poll_s)


# -- the driver ----------------------------------------------------------------------------------------
def optuna_storage(url: str):
    """Optuna's RDB storage on the run store's database (SQLite waits on a busy file like the store)."""
    import optuna
    import sqlalchemy as sa

    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if sa.make_url(url).get_backend_name() == "sqlite":
        kwargs = {"connect_args": {"timeout": 30}}
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


class Driver:
    """Drives one search's studies until every study used its budget, or the search is cancelled."""

    def __init__(self, store: Store | str | None, search_id: str, *, poll_s: float | None = None) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.optuna = optuna
        self.st = open_store(store)
        self.search_id = search_id
        self.spec = SearchSpec.from_dict(self.st.get_search(search_id)["spec"])
        self.poll_s = env_float("SAMLAB_SEARCH_POLL_S", 1.0, 0.05, 60) if poll_s is None else poll_s
        storage = optuna_storage(self.st.url)
        self.studies = {m: self._study(storage, i, m) for i, m in enumerate(self.spec.ms)}
        self.inflight: dict[tuple[int, int], Any] = {}  # (m, trial number) -> optuna Trial
        self.pruning: set[tuple[int, int]] = set()
        self.reported: dict[tuple[int, int], set[int]] = {}
        self.workers: list[int] = []  # sweep worker pids this driver started

    def _study(self, storage, index: int, m: int):
        spec = self.spec
        sampler = self.optuna.samplers.TPESampler(seed=spec.sampler_seed + index,
                                                  n_startup_trials=spec.random_trials)
        pruner = (self.optuna.pruners.MedianPruner(n_startup_trials=spec.prune_startup,
                                                   n_warmup_steps=spec.prune_warmup)
                  if spec.prune else self.optuna.pruners.NopPruner())
        return self.optuna.create_study(study_name=spec.study_name(self.search_id, m), storage=storage,
                                        sampler=sampler, pruner=pruner, direction="maximize",
                                        load_if_exists=True)

    # -- main loop --------------------------------------------------------------------------------
    def run(self) -> str:
        """Drive to the end; returns the search's final status."""
        pid, host = os.getpid(), hostname()
        self._adopt()
        while True:
            if self.st.search_heartbeat(self.search_id, pid, host):
                self._cancel_inflight()
                self.st.search_heartbeat(self.search_id, pid, host, status="cancelled")
                return "cancelled"
            self._follow()
            if not self.inflight and all(self._used(m) >= self.spec.trials for m in self.spec.ms):
                self.st.search_heartbeat(self.search_id, pid, host, status="completed")
                return "completed"
            self._launch()
            self._keep_workers()
            time.sleep(self.poll_s)

    def _adopt(self) -> None:
        """Resume: follow trials still running in their studies; fail those that were never queued."""
        running = self.optuna.trial.TrialState.RUNNING
        for m, study in self.studies.items():
            queued = {run["trial"] for run in self.st.trial_runs(study.study_name)}
            for frozen in study.get_trials(deepcopy=False, states=(running,)):
                if frozen.number in queued:
                    key = (m, frozen.number)
                    self.inflight[key] = self.optuna.trial.Trial(study, frozen._trial_id)
                    self.reported[key] = set(frozen.intermediate_values)
                else:
                    orphan = self.optuna.trial.Trial(study, frozen._trial_id)
                    orphan.set_user_attr(OUTCOME, "orphan")
                    study.tell(orphan, state=self.optuna.trial.TrialState.FAIL)
        if self.spec.runner == "scheduler":
            queued = [r["id"] for r in self.st.list_runs(status="queued", group=self.search_id, limit=100_000)]
            if queued:
                jobs.start_runs(self.st, queued, group=self.search_id, resubmit=True)

    def _used(self, m: int) -> int:
        """Trials of study m that count against its budget: finished ones and those in flight."""
        states = self.optuna.trial.TrialState
        used = sum(1 for t in self.studies[m].get_trials(deepcopy=False)
                   if t.state in (states.COMPLETE, states.PRUNED)
                   or (t.state == states.FAIL and t.user_attrs.get(OUTCOME) in COUNTED))
        return used + sum(1 for key in self.inflight if key[0] == m)  # in flight: RUNNING until told

    # -- following trials -------------------------------------------------------------------------
    def _follow(self) -> None:
        if not self.inflight:
            return
        by_study = {m: self.st.trial_runs(self.studies[m].study_name) for m in {k[0] for k in self.inflight}}
        ids = [r["id"] for runs in by_study.values() for r in runs
               if (self._key(r) in self.inflight)]
        metrics = self.st.metrics(ids, names=["test_acc"], kind="epoch") if ids else None
        for key in list(self.inflight):
            runs = [r for r in by_study[key[0]] if r["trial"] == key[1]]
            self._follow_trial(key, runs, metrics)

    def _key(self, run: dict[str, Any]) -> tuple[int, int]:
        for m, study in self.studies.items():
            if study.study_name == run["study"]:
                return (m, run["trial"])
        return (-1, -1)

    def _follow_trial(self, key: tuple[int, int], runs: list[dict[str, Any]], metrics) -> None:
        trial = self.inflight[key]
        means = epoch_means(metrics, [r["id"] for r in runs]) if metrics is not None else {}
        done = self.reported.setdefault(key, set())
        for step in sorted(set(means) - done):
            trial.report(means[step], step)
            done.add(step)
        active = [r for r in runs if r["status"] in ACTIVE]
        if active and key not in self.pruning and means and trial.should_prune():
            self.pruning.add(key)
            for run in active:
                self._stop(run["id"], "pruned")
        if all(r["status"] in FINAL for r in runs):
            self._tell(key, runs)

    def _stop(self, run_id: str, reason: str) -> None:
        with contextlib.suppress(ValueError):  # it ended meanwhile
            jobs.cancel(run_id, store=self.st, reason=reason)

    def _tell(self, key: tuple[int, int], runs: list[dict[str, Any]]) -> None:
        states = self.optuna.trial.TrialState
        study, trial = self.studies[key[0]], self.inflight.pop(key)
        statuses = [r["status"] for r in runs]
        if key in self.pruning or "pruned" in statuses:
            study.tell(trial, state=states.PRUNED)
        else:
            value = trial_objective(statuses, [(r.get("summary") or {}).get("final_test_acc") for r in runs])
            if value is not None:
                study.tell(trial, value)
            else:
                cancelled = "cancelled" in statuses and "failed" not in statuses
                trial.set_user_attr(OUTCOME, "cancelled" if cancelled else "failed")
                study.tell(trial, state=states.FAIL)
        self.pruning.discard(key)
        print(f"[{time.strftime('%H:%M:%S')}] m={key[0]} trial {key[1]}: {', '.join(statuses)}", flush=True)

    def _cancel_inflight(self) -> None:
        for key, trial in list(self.inflight.items()):
            trial.set_user_attr(OUTCOME, "cancelled")
            self.studies[key[0]].tell(trial, state=self.optuna.trial.TrialState.FAIL)
            self.inflight.pop(key)
        sweep_runs.cancel(self.search_id, store=self.st)

    # -- launching trials -------------------------------------------------------------------------
    def _launch(self) -> None:
        while len(self.inflight) < self.spec.parallel:
            open_ms = [m for m in self.spec.ms if self._used(m) < self.spec.trials]
            if not open_ms:
                return
            m = min(open_ms, key=lambda v: (self._used(v), self.spec.ms.index(v)))
            self._ask(m)

    def _ask(self, m: int) -> None:
        distributions = {name: self.optuna.distributions.FloatDistribution(lo, hi, log=True)
                         for name, (lo, hi) in self.spec.ranges().items()}
        study = self.studies[m]
        trial = study.ask(distributions)
        configs = self.spec.trial_configs(m, trial.params)
        if self.spec.kind != "train":
            configs = [c.to_dict() for c in configs]
        specs = jobs.member_specs(configs, self.spec.name, self.search_id, kind=self.spec.kind,
                                  study=study.study_name, trial=trial.number)
        run_ids = self.st.create_runs(specs)
        self.inflight[(m, trial.number)] = trial
        self.reported[(m, trial.number)] = set()
        if self.spec.runner == "scheduler":
            jobs.start_runs(self.st, run_ids, group=self.search_id)

    def _keep_workers(self) -> None:
        """Sweep workers: as many alive as the search may use while runs are queued."""
        if self.spec.runner != "sweep":
            return
        self.workers = [pid for pid in self.workers if _child_alive(pid)]
        if not self.st.list_runs(status="queued", group=self.search_id, limit=1):
            return
        busy = {int(r["executor_ref"].split(":")[1]) for r in self.st.list_runs(
            status="running", group=self.search_id, limit=100_000)
            if (r["executor_ref"] or "").startswith(f"{sweep_runs.SWEEP_EXECUTOR}:")}
        alive = set(self.workers) | {pid for pid in busy if pid_alive(pid)}
        wanted = self.spec.workers or min(self.spec.parallel * len(self.spec.seeds), os.cpu_count() or 1)
        if len(alive) < wanted:
            self.workers += sweep_runs.start_workers(self.search_id, store=self.st, workers=wanted - len(alive),
                                                     linger_s=LINGER_S)


def _child_alive(pid: int) -> bool:
    """Whether a child process of ours still runs (reaping it when it has exited)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return pid_alive(pid)
    return done == 0


def drive(search_id: str, *, store: Store | str | None = None) -> str:
    """Run the search's driver in this process (one per search: a file lock); returns its final status."""
    st = open_store(store)
    lock = try_lock(Path(st.runs_root) / f".search-{search_id}.lock")
    if lock is None:
        print(f"search {search_id}: another driver is running", flush=True)
        return "running"
    try:
        print(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] search driver pid {os.getpid()} on {hostname()}: "
              f"{search_id}", flush=True)
        try:
            status = Driver(st, search_id).run()
        except Exception as exc:
            text = traceback.format_exc()
            print(text, flush=True)
            st.search_heartbeat(search_id, os.getpid(), hostname(), status="failed",
                                error=f"{type(exc).__name__}: {exc}\n\n{text}")
            return "failed"
        print(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] search {search_id} {status}", flush=True)
        return status
    finally:
        release(lock)


# -- command line -----------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m samlab.runs.search", description="adaptive search driver")
    sub = parser.add_subparsers(dest="command", required=True)
    drive_cmd = sub.add_parser("drive", help="drive a search's studies until its budget is used")
    drive_cmd.add_argument("search_id")
    drive_cmd.add_argument("--store", default=None, help="store URL (default: SAMLAB_STORE or data/runs)")
    args = parser.parse_args(argv)
    return 0 if drive(args.search_id, store=args.store) in ("completed", "cancelled", "running") else 1


if __name__ == "__main__":
    raise SystemExit(main())
