"""The Ray backend against a real local Ray cluster started by the test (head node on 127.0.0.1).

The store is on PostgreSQL when SAMLAB_TEST_PG names a server (always under SAMLAB_REQUIRE_ALL), else a
SQLite file. Every submission
goes through the Jobs API from a process that never joins the cluster; the cluster's own job list
must show no driver other than samlab's submitted jobs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'ray[default]')")
from ray.job_submission import JobStatus, JobSubmissionClient  # noqa: E402

from samlab.runs import jobs  # noqa: E402
from samlab.runs import sweeps as sweep_runs  # noqa: E402
from samlab.runs.executors import describe_backend  # noqa: E402
from samlab.runs.ray_executor import submission_id  # noqa: E402
from samlab.runs.store import FINAL, Store  # noqa: E402
from tests.helpers import REQUIRE_ALL, free_port, wait_for  # noqa: E402
from tests.pg_fixtures import PG_URL, fresh_schema_url  # noqa: E402

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).with_name("ray"))


START_ATTEMPTS = 3  # `ray start` can fail on a busy machine (a port taken meanwhile, a component slow to come up)
START_LOG = "ray-start.log"  # what `ray start` prints, in the cluster's temp folder


@pytest.fixture(scope="module")
def cluster():
    """`ray start --head --block` in its own process group; the group is ended at teardown. A start that
    fails is retried on fresh ports, and the last failure's error shows what Ray printed."""
    for attempt in range(1, START_ATTEMPTS + 1):
        temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must stay short
        proc, address = _start_head(temp)
        try:
            client = _wait_for_dashboard(address, proc, Path(temp) / START_LOG)
        except RuntimeError as error:
            _stop(proc, temp)
            if attempt == START_ATTEMPTS:
                raise RuntimeError(f"{error} (attempt {attempt} of {START_ATTEMPTS})") from None
            warnings.warn(f"ray start, attempt {attempt} of {START_ATTEMPTS}: {error}", stacklevel=1)
            continue
        try:
            yield address, client
        finally:
            _stop(proc, temp)
        return


def _start_head(temp: str) -> tuple[subprocess.Popen, str]:
    dashboard = free_port()
    log = open(Path(temp) / START_LOG, "wb")  # noqa: SIM115 - the child holds it; _stop removes it
    with log:
        proc = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--num-cpus=2", "--node-ip-address=127.0.0.1",
             f"--port={free_port()}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard}", "--object-store-memory=100000000", f"--temp-dir={temp}",
             # ports Ray would otherwise take by default (52365, 10001): another cluster on the machine has them
             f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
             "--disable-usage-stats"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=temp,
            # the suite's own task kinds (tests/job_tasks.py) live in the repository, not in the installed package
            env=dict(os.environ) | {"PYTHONPATH": str(REPO)},
        )
    return proc, f"http://127.0.0.1:{dashboard}"


def _stop(proc: subprocess.Popen, temp: str) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    shutil.rmtree(temp, ignore_errors=True)


def _log_tail(log: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    return "(no output)"


def _wait_for_dashboard(address: str, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> JobSubmissionClient:
    """The Jobs API client once the cluster runs jobs: the dashboard answers before the node's job agent
    has registered ("No available agent to submit job"), so a no-op job is submitted until it is taken."""
    deadline = time.monotonic() + timeout
    probe, last_error = f"probe-{uuid.uuid4().hex[:8]}", None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with code {proc.returncode}:\n{_log_tail(log)}")
        try:
            client = JobSubmissionClient(address)
            client.submit_job(entrypoint=f"{sys.executable} -c pass", submission_id=probe)
        except Exception as error:  # not up yet
            last_error = error
            time.sleep(1.0)
            continue
        wait_for(lambda c=client: _job_ended(c, probe), max(deadline - time.monotonic(), 1.0), "the probe job")
        return client
    raise RuntimeError(f"the Ray cluster at {address} took no job within {timeout:g}s: {last_error}")


@pytest.fixture
def env(cluster, tmp_path, monkeypatch):
    """The UI side's environment: the Ray backend, the shared store, small test task kinds."""
    address, client = cluster
    with contextlib.ExitStack() as stack:
        # under SAMLAB_REQUIRE_ALL the store must be the PostgreSQL server (fresh_schema_url fails without one)
        shared = PG_URL or REQUIRE_ALL
        url = stack.enter_context(fresh_schema_url("ray")) if shared else f"sqlite:///{tmp_path / 'runs.db'}"
        values = {"SAMLAB_EXECUTOR": "ray", "SAMLAB_RAY_ADDRESS": address, "SAMLAB_STORE": url,
                  "SAMLAB_RUNS_DIR": str(tmp_path / "runs"), "SAMLAB_TASKS": "count=tests.job_tasks",
                  "SAMLAB_FLUSH_S": "0.2", "SAMLAB_CANCEL_TIMEOUT_S": "20", "CUDA_VISIBLE_DEVICES": ""}
        for key, value in values.items():
            monkeypatch.setenv(key, value)
        store = Store(url, runs_root=tmp_path / "runs")
        yield store, client, values
        store.dispose()


def _job_ended(client: JobSubmissionClient, ref: str):
    status = client.get_job_status(ref)
    return status if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED) else None


def _all_final(store: Store, group: str):
    runs = store.list_runs(group=group)
    return runs if runs and all(r["status"] in FINAL for r in runs) else None


def _no_foreign_drivers(client: JobSubmissionClient) -> bool:
    """Only submitted jobs on the cluster: no other process called ray.init() against it."""
    return all(job.submission_id for job in client.list_jobs())


def _python(code: str, values: dict[str, str]) -> subprocess.CompletedProcess:
    """A fresh process with the UI's environment: a restarted dashboard, or the CLI."""
    env = dict(os.environ) | values
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def test_a_tiny_training_sweep_runs_end_to_end_through_the_jobs_api(env):
    store, client, values = env
    t0 = time.monotonic()
    cli = subprocess.run(
        [sys.executable, "-m", "samlab", "submit", "--preset", "digits-mlp", "--seeds", "0,1", "--name", "tiny",
         "--set", "epochs=2", "--set", "data.n_train=128", "--set", "batch_size=32", "--set", "device=cpu"],
        cwd=REPO, env=dict(os.environ) | values, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    group = cli.stdout.split()[1]
    ref = submission_id(group)
    runs = store.list_runs(group=group)
    assert len(runs) == 2 and {r["executor_ref"] for r in runs} == {ref}
    assert wait_for(lambda: _job_ended(client, ref), 150, "the sweep's Ray job") == JobStatus.SUCCEEDED
    elapsed = time.monotonic() - t0
    print(f"\ntiny Ray sweep (2 runs, submit to all completed): {elapsed:.1f}s")
    for run in store.list_runs(group=group):
        assert run["status"] == "completed", run["error"]
        assert run["executor"] == "ray" and run["host"] and run["device"] == "cpu" and run["pid"]
        assert run["summary"]["epochs"] == 2
        epochs = store.metrics([run["id"]], names=["test_acc"], kind="epoch")
        assert epochs["step"].tolist() == [1, 2]
        assert len(store.metrics([run["id"]], names=["train_loss"], kind="step")) == 8
    assert _no_foreign_drivers(client)
    line = describe_backend()
    assert line.startswith(f"executor ray: Ray cluster at {values['SAMLAB_RAY_ADDRESS']} (Ray {ray.__version__}")
    assert "1 node(s), 2 CPUs, 0 GPUs" in line


def test_cancel_of_a_running_sweep_stops_its_job_and_the_runs_checkpoint(env, tmp_path):
    store, client, _ = env
    group = jobs.submit_sweep([{"steps": 100_000, "sleep": 0.02, "checkpoint_every": 10_000}] * 2, "long",
                              kind="count", store=store)
    ref = submission_id(group)
    wait_for(lambda: all(r["status"] == "running" for r in store.list_runs(group=group))
          and all(len(store.metrics([r["id"]])) > 0 for r in store.list_runs(group=group)), 90,
          "both runs to run and write metrics")
    assert sweep_runs.cancel(group, store=store) == 2
    final = wait_for(lambda: _all_final(store, group), 60, "the runs to end")
    assert {r["status"] for r in final} == {"cancelled"}
    for run in final:
        assert (Path(run["workdir"]) / "state.json").is_file()  # the task checkpointed on the way out
        assert run["error"] is None  # a graceful stop, not a kill
    assert wait_for(lambda: _job_ended(client, ref), 60, "the job to end") == JobStatus.STOPPED


def test_reconcile_after_the_submitting_process_restarts(env):
    store, client, values = env
    # 1. the UI recorded the submission id, then died before the Jobs API call
    group = jobs.submit_sweep([{"steps": 5}, {"steps": 7}], "orphan", kind="count", store=store, start=False)
    ids = [r["id"] for r in store.list_runs(group=group)]
    ref = submission_id(group)
    assert store.assign_executor(ids, "ray", ref) == 2
    # 2. a run whose job ended without running it (its driver failed)
    (lost,) = store.create_runs([{"kind": "count", "params": {"steps": 3}}])
    lost_ref = submission_id(lost)
    store.assign_executor([lost], "ray", lost_ref)
    client.submit_job(entrypoint=f"{sys.executable} -c 'raise SystemExit(4)'", submission_id=lost_ref)
    wait_for(lambda: _job_ended(client, lost_ref), 60, "the failing job")
    # the restarted UI reconciles from the store and the cluster's job status
    out = _python("from samlab.runs import scheduler; print(scheduler.reconcile())", values)
    assert out.returncode == 0, out.stderr
    lost_run = store.get_run(lost)
    assert lost_run["status"] == "failed" and f"Ray job {lost_ref} ended (FAILED" in lost_run["error"]
    assert lost in out.stdout
    assert wait_for(lambda: _job_ended(client, ref), 90, "the resubmitted job") == JobStatus.SUCCEEDED
    for run in wait_for(lambda: _all_final(store, group), 30, "the orphaned runs"):
        assert run["status"] == "completed", run["error"]
        assert store.get_run(run["id"])["result"]["total"] == sum(range(run["params"]["steps"]))
    assert _no_foreign_drivers(client)
