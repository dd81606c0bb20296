"""Background runs in real processes on a real SQLite file: submit, cancel, kill -9, reconcile, resume.

Most tests use the `count` task (tests/job_tasks.py: a resumable accumulator with a closed-form
answer), registered in the workers through SAMLAB_TASKS; one test trains a real model and checks that
kill -9 + resume gives the same weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from samlab import tasks
from samlab.config import preset
from samlab.runs import jobs, scheduler
from samlab.runs.executors import REPO_ROOT, hostname, pid_alive, worker_command
from samlab.runs.store import Store
from tests.helpers import backdate_heartbeat, wait_for

TEST_ENV = {
    "SAMLAB_TASKS": "count=tests.job_tasks,boom=tests.job_boom",
    "SAMLAB_FLUSH_S": "0.1",
    "SAMLAB_SCHEDULER_POLL_S": "0.1",
    "SAMLAB_SCHEDULER_IDLE_S": "1.5",
    "SAMLAB_CPU_SLOTS": "1",
    "SAMLAB_CANCEL_TIMEOUT_S": "2",
    "SAMLAB_STALE_S": "60",
    "CUDA_VISIBLE_DEVICES": "",  # CPU slots; the scheduler need not import torch to find GPUs
}


@pytest.fixture
def store(tmp_path: Path, monkeypatch) -> Store:
    url = f"sqlite:///{tmp_path / 'runs' / 'samlab.db'}"
    monkeypatch.setenv("SAMLAB_STORE", url)
    for key, value in TEST_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(tasks, "TASKS", dict(tasks.TASKS))
    st = Store(url)
    yield st
    for run in st.runs_with_status(["running"], host=hostname()):
        if run["pid"] and pid_alive(run["pid"]):
            os.killpg(run["pid"], signal.SIGKILL)
    for proc in jobs._spawned:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    jobs._spawned.clear()


def k_steps(store: Store, run_id: str) -> list[int]:
    return store.metrics([run_id], names=["k"])["step"].tolist()


def totals_are_prefix_sums(store: Store, run_id: str) -> bool:
    frame = store.metrics([run_id], names=["total"])
    return all(v == sum(range(s + 1)) for s, v in zip(frame["step"], frame["value"]))


def test_a_submitted_run_completes_in_its_own_process_with_metrics_in_the_store(store):
    run_id = jobs.submit({"steps": 25}, kind="count", name="tiny", store=store)
    assert jobs.wait(run_id, store=store, timeout=60) == {run_id: "completed"}
    run = store.get_run(run_id)
    assert run["result"] == {"total": float(sum(range(25))), "steps": 25}
    assert run["pid"] != os.getpid() and run["host"] == hostname() and run["device"] == "cpu"
    assert run["progress"] == 1.0 and run["started_at"] <= run["finished_at"]
    assert k_steps(store, run_id) == list(range(25)) and totals_are_prefix_sums(store, run_id)
    workdir = Path(run["workdir"])
    assert (workdir / ".samlab-run").read_text() == run_id
    assert f"run {run_id} completed" in Path(run["log_path"]).read_text()
    assert [a["name"] for a in store.artifacts(run_id)] == ["log"]
    jobs.delete(run_id, store=store)
    assert not workdir.exists() and store.list_runs() == []


def test_bad_input_is_refused_and_nothing_is_queued(store):
    with pytest.raises(ValueError, match="steps: must be a positive integer"):
        jobs.submit({"steps": -1}, kind="count", store=store)
    with pytest.raises(ValueError, match="optim.rho"):
        jobs.submit(preset("digits-mlp").with_overrides({"optim.rho": -1.0}), store=store)
    with pytest.raises(ValueError, match="optim.lr"):
        jobs.submit({"optim": {"lr": 0}}, store=store)
    with pytest.raises(ValueError, match="kind: unknown task kind"):
        jobs.submit({}, kind="nope", store=store)
    good = preset("digits-mlp")
    with pytest.raises(ValueError, match=r"configs\[1\]: batch_size"):
        jobs.submit_sweep([good, good.with_overrides({"batch_size": 0})], "s", store=store)
    assert store.list_runs() == []
    assert not jobs._spawned  # no scheduler was started for nothing


def test_cached_submissions_and_sweeps(store):
    first = jobs.submit_cached("count", {"steps": 3}, store=store, start=False)
    assert jobs.submit_cached("count", {"steps": 3, "sleep": 0.0}, store=store, start=False) == first
    other = jobs.submit_cached("count", {"steps": 4}, store=store, start=False)
    assert other != first
    jobs.cancel(first, store=store)  # a cancelled run is not a cached answer
    assert jobs.submit_cached("count", {"steps": 3}, store=store, start=False) not in (first, other)
    configs = [preset("digits-mlp").with_overrides({"seed": s}) for s in (0, 1, 2)]
    group = jobs.submit_sweep(configs, "seeds", store=store, start=False)
    runs = store.list_runs(group=group)
    assert sorted(r["params"]["seed"] for r in runs) == [0, 1, 2]
    assert all(r["status"] == "queued" for r in runs)
    # the sweep's name once, then what distinguishes the run (not the config's own name again)
    assert {r["name"] for r in runs} == {f"seeds · sgd lr=0.1 seed={s}" for s in (0, 1, 2)}


def test_cancel_queued_and_running_then_resume_matches_an_uninterrupted_run(store):
    steps = 400
    running = jobs.submit({"steps": steps, "sleep": 0.01, "checkpoint_every": 10_000}, kind="count", store=store)
    queued = jobs.submit({"steps": 5}, kind="count", store=store)  # one CPU slot: waits behind the first
    assert jobs.cancel(queued, store=store) == "cancelled"
    assert store.get_run(queued)["status"] == "cancelled"
    wait_for(lambda: len(k_steps(store, running)) >= 20, what="metrics of the running run")
    assert jobs.cancel(running, store=store) == "requested"
    assert jobs.wait(running, store=store, timeout=30)[running] == "cancelled"
    stopped = store.get_run(running)
    assert 20 <= stopped["result"]["stopped_at"] < steps
    assert "killed" not in (stopped["error"] or "")  # a graceful stop, not the hard kill
    assert (Path(stopped["workdir"]) / "state.json").is_file()
    with pytest.raises(ValueError, match="only queued or running"):
        jobs.cancel(running, store=store)

    jobs.resume(running, store=store)
    assert jobs.wait(running, store=store, timeout=60)[running] == "completed"
    assert store.get_run(running)["result"]["total"] == float(sum(range(steps)))
    assert k_steps(store, running) == list(range(steps))  # the resumed curve has no duplicates
    assert totals_are_prefix_sums(store, running)
    assert store.get_run(queued)["status"] == "cancelled"  # never started


def test_kill_9_fails_the_run_keeps_flushed_metrics_and_resume_finishes_it(store):
    steps = 300
    run_id = jobs.submit({"steps": steps, "sleep": 0.01, "checkpoint_every": 20}, kind="count", store=store)
    wait_for(lambda: len(k_steps(store, run_id)) >= 60, what="60 flushed steps")
    pid = store.get_run(run_id)["pid"]
    os.kill(pid, signal.SIGKILL)
    run = wait_for(lambda: (r := store.get_run(run_id))["status"] == "failed" and r, timeout=20,
                   what="the run to be marked failed")
    assert "SIGKILL" in run["error"] and "without recording a final status" in run["error"]
    flushed = k_steps(store, run_id)
    assert flushed == list(range(len(flushed))) and len(flushed) >= 60  # up to the last flush, intact
    assert totals_are_prefix_sums(store, run_id)

    # a corrupt saved state fails the resumed run with the reason; the scheduler goes on
    state = Path(run["workdir"]) / "state.json"
    good_state = state.read_text()
    state.write_text("{not json")
    jobs.resume(run_id, store=store)
    assert jobs.wait(run_id, store=store, timeout=30)[run_id] == "failed"
    error = store.get_run(run_id)["error"]
    assert error.startswith("resume failed: ValueError: resume: saved state") and "corrupt" in error

    state.write_text(good_state)
    jobs.resume(run_id, store=store)
    assert jobs.wait(run_id, store=store, timeout=60)[run_id] == "completed"
    assert store.get_run(run_id)["result"]["total"] == float(sum(range(steps)))
    assert k_steps(store, run_id) == list(range(steps)) and totals_are_prefix_sums(store, run_id)


def test_a_raising_task_records_its_traceback_and_other_runs_continue(store):
    boom = jobs.submit({"message": "kaput"}, kind="boom", store=store)
    fine = jobs.submit({"steps": 5}, kind="count", store=store)
    statuses = jobs.wait([boom, fine], store=store, timeout=60)
    assert statuses == {boom: "failed", fine: "completed"}
    run = store.get_run(boom)
    assert run["error"].startswith("RuntimeError: boom: kaput") and "Traceback" in run["error"]
    assert "RuntimeError: boom: kaput" in Path(run["log_path"]).read_text()
    assert store.metrics([boom])["name"].tolist() == ["before_boom"]  # flushed before the failure


def test_a_worker_that_ignores_cancel_is_killed_after_the_grace_period(store):
    run_id = jobs.submit({"steps": 100_000, "sleep": 0.01, "ignore_stop": True}, kind="count", store=store)
    wait_for(lambda: len(k_steps(store, run_id)) >= 5, what="the run to start")
    pid = store.get_run(run_id)["pid"]
    assert jobs.cancel(run_id, store=store) == "requested"
    assert jobs.wait(run_id, store=store, timeout=30)[run_id] == "cancelled"
    assert "did not stop within 2s" in store.get_run(run_id)["error"]
    wait_for(lambda: not pid_alive(pid), timeout=10, what="the worker process to be gone")


def test_reconcile_fails_dead_and_silent_workers_only(store):
    # a worker started by hand (no scheduler watching) and killed: its pid is gone on this host
    run_id = jobs.submit({"steps": 100_000, "sleep": 0.01}, kind="count", store=store, start=False)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.Popen(worker_command(run_id, store.url), cwd=REPO_ROOT, env=env)
    wait_for(lambda: len(k_steps(store, run_id)) >= 3, what="the hand-started worker")
    assert scheduler.reconcile(store) == []  # alive and beating
    proc.kill()
    proc.wait()
    ((failed_id, reason),) = scheduler.reconcile(store)
    assert failed_id == run_id and f"worker process {proc.pid} on {hostname()} is gone" in reason
    assert store.get_run(run_id)["status"] == "failed"

    # a run on another host whose heartbeat stopped: judged by the database clock
    other = jobs.submit({"steps": 3}, kind="count", store=store, start=False)
    assert store.claim(other, "elsewhere", "local")
    assert scheduler.reconcile(store, stale_after_s=60) == []
    backdate_heartbeat(store, other, 120)  # silent for two minutes
    ((failed_id, reason),) = scheduler.reconcile(store, stale_after_s=60)
    assert failed_id == other and reason.startswith("heartbeat stale")


def test_resuming_a_train_run_without_checkpoint_is_a_clear_error(store):
    run_id = jobs.submit(preset("digits-mlp"), store=store, start=False)
    with pytest.raises(ValueError, match="only cancelled or failed"):
        jobs.resume(run_id, store=store)
    store.claim(run_id, hostname(), "local")
    store.fail_run(run_id, "worker died")
    with pytest.raises(ValueError, match="resume: no checkpoint at"):
        jobs.resume(run_id, store=store)
    run = store.get_run(run_id)
    assert run["status"] == "failed" and run["error"].startswith("resume: no checkpoint")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "samlab", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60, env=dict(os.environ))


def test_cli_runs_commands_and_readable_errors(store):
    bad = _cli("submit", "--preset", "digits-mlp", "--set", "optim.lr=-1", "--store", store.url)
    assert bad.returncode == 2 and bad.stderr.startswith("error: optim.lr") and "Traceback" not in bad.stderr
    assert _cli("submit", "--preset", "nope", "--store", store.url).returncode == 2
    assert store.list_runs() == []
    done = jobs.submit({"steps": 4}, kind="count", name="cli-done", store=store)
    jobs.wait(done, store=store, timeout=60)
    slow = jobs.submit({"steps": 100_000, "sleep": 0.01}, kind="count", name="cli-slow", store=store)
    listing = _cli("runs", "list", "--store", store.url)
    assert listing.returncode == 0 and done in listing.stdout and slow in listing.stdout
    assert "1 completed" in listing.stdout and "cli-slow" in listing.stdout
    shown = _cli("runs", "show", done[:6], "--json", "--store", store.url)
    assert json.loads(shown.stdout)["result"]["total"] == 6.0
    logs = _cli("runs", "logs", done, "--store", store.url)
    assert f"run {done} completed" in logs.stdout
    cancelled = _cli("runs", "cancel", slow, "--store", store.url)
    assert cancelled.returncode == 0 and ("cancelled" in cancelled.stdout or "stop requested" in cancelled.stdout)
    assert jobs.wait(slow, store=store, timeout=30)[slow] == "cancelled"
    again = _cli("runs", "cancel", slow, "--store", store.url)
    assert again.returncode == 2 and "only queued or running" in again.stderr
    assert _cli("runs", "delete", done, "--store", store.url).returncode == 0
    assert [r["id"] for r in store.list_runs()] == [slow]
    missing = _cli("runs", "show", "ffffffffffff", "--store", store.url)
    assert missing.returncode == 2 and "no run" in missing.stderr


@pytest.mark.slow
def test_train_run_killed_and_resumed_ends_with_the_weights_of_an_uninterrupted_run(store, tmp_path, monkeypatch):
    import torch

    from samlab.checkpoints import load_trained
    from samlab.reporting import RecordingReporter
    from samlab.train import run

    # the device pinned: reference and worker must compute on the same one
    cfg = preset("digits-mlp", {"epochs": 6, "batch_size": 32, "data.n_train": 256, "model.width": 32,
                                "checkpoint_every": 1, "device": "cpu"})
    reference_reporter = RecordingReporter()
    # bit-identical only at the same thread count (reduction order): the worker's count fixed (no thread
    # governor, which would move it between one and all cores as the machine's load changes), the same here
    monkeypatch.setenv("SAMLAB_CPU_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = run(cfg, reference_reporter, workdir=tmp_path / "reference")
    finally:
        torch.set_num_threads(threads)
    assert reference.status == "completed"

    run_id = jobs.submit(cfg, store=store)
    workdir = Path(store.get_run(run_id)["workdir"])

    def stopped_at_a_checkpoint() -> int | None:
        if not (workdir / "checkpoint.pt").is_file():
            return None
        pid = store.get_run(run_id)["pid"]
        os.kill(pid, signal.SIGSTOP)  # frozen before it can finish: the kill below always interrupts it
        return pid

    pid = wait_for(stopped_at_a_checkpoint, timeout=120, what="the first checkpoint")
    assert store.get_run(run_id)["status"] == "running", "finished before it could be stopped; make it longer"
    os.kill(pid, signal.SIGKILL)
    assert jobs.wait(run_id, store=store, timeout=20)[run_id] == "failed"
    jobs.resume(run_id, store=store)
    assert jobs.wait(run_id, store=store, timeout=180)[run_id] == "completed"

    finished = store.get_run(run_id)
    resumed = load_trained(finished["checkpoint_path"]).model.state_dict()
    expected = load_trained(reference.checkpoint).model.state_dict()
    assert resumed.keys() == expected.keys()
    for name in expected:
        assert torch.equal(resumed[name], expected[name]), name
    assert finished["summary"]["final_test_acc"] == reference.summary["final_test_acc"]
    # the stored curve equals the uninterrupted one, point for point (no duplicates after resume)
    losses = store.metrics([run_id], names=["train_loss"], kind="step")
    ref = [(step, values["train_loss"]) for kind, step, values in reference_reporter.rows
           if kind == "step" and "train_loss" in values]
    assert list(zip(losses["step"], losses["value"])) == ref


@pytest.mark.parametrize("cores, slots, fewest, most",
                         [(2, None, 1, 2), (1, None, 1, 1), (8, None, 3, 4), (16, "4", 3, 4), (4, "8", 1, 1)])
def test_cpu_slots_leave_the_dashboard_a_core_when_it_needs_one(monkeypatch, cores, slots, fewest, most):
    from samlab.runs import executors

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    for name in ("SAMLAB_CPU_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "SAMLAB_CPU_SLOTS"):
        monkeypatch.delenv(name, raising=False)
    if slots:
        monkeypatch.setenv("SAMLAB_CPU_SLOTS", slots)
    monkeypatch.setattr(executors.os, "cpu_count", lambda: cores)
    found = executors.local_slots()
    assert len(found) == (int(slots) if slots else max(1, cores // 4))
    assert {s.env["OMP_NUM_THREADS"] for s in found} == {str(fewest)}  # the governor starts at the fewest
    assert {s.env["SAMLAB_CPU_THREADS_RANGE"] for s in found} == {f"{fewest}-{most}"}
    assert fewest * len(found) <= max(1, cores - 1) or fewest == 1
    assert most * len(found) <= cores or most == 1
    assert not any("OMP_WAIT_POLICY" in s.env or "GOMP_SPINCOUNT" in s.env for s in found)  # libgomp's default wait


def test_a_wait_policy_or_thread_count_set_by_the_user_reaches_the_worker_unchanged(monkeypatch):
    from samlab.runs import executors

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.delenv("SAMLAB_CPU_THREADS", raising=False)
    monkeypatch.setenv("GOMP_SPINCOUNT", "30000")
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    env = executors._worker_env(executors.local_slots()[0])
    assert env["GOMP_SPINCOUNT"] == "30000" and "OMP_WAIT_POLICY" not in env
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.setenv("SAMLAB_CPU_THREADS", "2")
    env = executors._worker_env(executors.local_slots()[0])
    assert env["OMP_WAIT_POLICY"] == "ACTIVE" and env["OMP_NUM_THREADS"] == "2"
    assert "SAMLAB_CPU_THREADS_RANGE" not in env  # a fixed count: no governor
