"""Executors: where a run's worker process is started, and how it is stopped.

The scheduler (samlab.runs.scheduler) decides *which* queued run starts and on which slot; an executor
decides *how*. Everything a worker needs travels through the store URL and the run's row (workdir and
log path are recorded there), so a backend on other machines (Ray, later) needs no shared path.

Public API:
    Slot(name, env)                     one unit of capacity: a visible GPU or a CPU share
    local_slots() -> list[Slot]         one slot per visible CUDA device (CUDA_VISIBLE_DEVICES=i),
                                        else SAMLAB_CPU_SLOTS CPU slots (default max(1, cores // 4)), each
                                        with SAMLAB_CPU_THREADS threads, by default a range (`cpu_threads`)
                                        that the worker's governor keeps to (samlab.runs.cores)
    Executor                            interface: launch(run, store_url, slot) -> ref,
                                        alive(run) -> bool | None, kill(run), reap() -> [(run_id, code)]
    LocalExecutor                       a detached OS process per run, in its own session and process group,
                                        stdout/stderr appended to the run's log file
    get_executor(name=None)             SAMLAB_EXECUTOR (default "local")
    backend_name() -> str               "local" (scheduler + worker processes here) or "ray" (Ray jobs on the
                                        cluster at SAMLAB_RAY_ADDRESS, samlab.runs.ray_executor)
    describe_backend() -> str           one line for the dashboard: the backend and its capacity / cluster
    worker_command(run_id, store_url)   the command line of a worker
    pid_alive(pid) -> bool              False for a missing or zombie process
    env_float(name, default, lo, hi)    a numeric setting from the environment, validated
    hostname() -> str
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from samlab.runs.cores import RANGE_VAR

REPO_ROOT = Path(__file__).resolve().parents[2]  # workers run here, so relative data paths resolve alike


@dataclass(frozen=True)
class Slot:
    """A unit of capacity for one run; `env` is added to the worker's environment."""

    name: str
    env: dict[str, str] = field(default_factory=dict)


def env_float(name: str, default: float, lo: float = 0.0, hi: float = float("inf")) -> float:
    """A numeric setting from the environment; ValueError naming the variable when out of range."""
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name}: expected a number, got {text!r}") from None
    if not lo <= value <= hi:
        raise ValueError(f"{name}: must be in [{lo:g}, {hi:g}] (got {value:g})")
    return value


def hostname() -> str:
    return socket.gethostname()


def _visible_gpus() -> int:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return 0  # GPUs hidden on purpose: skip the torch import
    import torch  # only the scheduler pays for this import

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def local_slots() -> list[Slot]:
    """One slot per visible GPU, or CPU slots sharing the cores (threads split between them)."""
    gpus = _visible_gpus()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if gpus:
        ids = [d.strip() for d in visible.split(",")][:gpus] if visible else [str(i) for i in range(gpus)]
        return [Slot(f"gpu{i}", {"CUDA_VISIBLE_DEVICES": dev}) for i, dev in enumerate(ids)]
    cores = os.cpu_count() or 1
    n = int(env_float("SAMLAB_CPU_SLOTS", max(1, cores // 4), 1, 1024))
    # hide GPUs from CPU runs explicitly, so a CPU slot never touches a device it was not given
    env = {"CUDA_VISIBLE_DEVICES": "", **cpu_thread_env(cores, n)}
    return [Slot(f"cpu{i}", dict(env)) for i in range(n)]


def cpu_threads(cores: int, slots: int) -> tuple[int, int]:
    """The thread range of each CPU run: (the cores but one, shared by the slots; all cores shared), at
    least one. The worker's `ThreadGovernor` (samlab.runs.cores) moves between them: all of its share
    while the other processes leave the cores idle, one core fewer as soon as anything else wants one
    (the dashboard, a browser, another job), so a page watching a run takes no time from it. On a
    2-core machine: one or two threads."""
    return max(1, (cores - 1) // slots), max(1, cores // slots)


def cpu_thread_env(cores: int, slots: int) -> dict[str, str]:
    """A CPU worker's thread settings: SAMLAB_CPU_THREADS fixes the count; otherwise the range the
    worker's governor keeps to (SAMLAB_CPU_THREADS_RANGE), the process started with the fewest."""
    fixed = os.environ.get("SAMLAB_CPU_THREADS")
    if fixed:
        return {"OMP_NUM_THREADS": str(int(env_float("SAMLAB_CPU_THREADS", 1, 1, 4096)))}
    fewest, most = cpu_threads(cores, slots)
    return {"OMP_NUM_THREADS": str(fewest), RANGE_VAR: f"{fewest}-{most}"}


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return True  # no procfs (macOS): existence is all we can tell


def module_command(module: str, *args: str) -> list[str]:
    """`python -m module args…` with this interpreter (where samlab is installed)."""
    return [sys.executable, "-m", module, *args]


def worker_command(run_id: str, store_url: str) -> list[str]:
    return module_command("samlab.runs.worker", run_id, "--store", store_url)


def spawn_module(module: str, args: Sequence[str], log_path: Path,
                 env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `python -m module args…` detached from this process: its own session and process group,
    no stdin, stdout and stderr appended to `log_path`, so it outlives the caller (a UI, a CLI)."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            module_command(module, *args), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            cwd=str(REPO_ROOT), env=env, start_new_session=True, close_fds=True,
        )


def _worker_env(slot: Slot) -> dict[str, str]:
    env = dict(os.environ)
    env.pop(RANGE_VAR, None)  # a thread range comes from the slot only (not from a worker that submits runs)
    env.update(slot.env)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Executor(ABC):
    """Starts and stops workers. `ref` is the backend's handle for a run, recorded in the store."""

    name: str

    @abstractmethod
    def launch(self, run: dict[str, Any], store_url: str, slot: Slot) -> tuple[int | None, str]:
        """Start the worker of `run` on `slot`; return (pid on this host or None, executor ref)."""

    @abstractmethod
    def alive(self, run: dict[str, Any]) -> bool | None:
        """Whether the run's worker still exists; None when this executor cannot tell from here."""

    @abstractmethod
    def kill(self, run: dict[str, Any]) -> bool:
        """Stop the run's worker at once (no checkpoint); True if a signal was delivered."""

    @abstractmethod
    def reap(self) -> list[tuple[str, int]]:
        """Runs whose worker (launched here) has exited since the last call, with exit codes."""


class LocalExecutor(Executor):
    """Workers as detached processes on this host: own session and process group, log file output."""

    name = "local"

    def __init__(self) -> None:
        self.host = hostname()
        self.children: dict[str, subprocess.Popen] = {}

    def launch(self, run: dict[str, Any], store_url: str, slot: Slot) -> tuple[int | None, str]:
        proc = spawn_module("samlab.runs.worker", [run["id"], "--store", store_url], Path(run["log_path"]),
                            env=_worker_env(slot))
        self.children[run["id"]] = proc
        return proc.pid, f"{self.host}:{proc.pid}:{slot.name}"

    def alive(self, run: dict[str, Any]) -> bool | None:
        if run.get("host") != self.host or not run.get("pid"):
            return None
        child = self.children.get(run["id"])
        if child is not None:
            return child.poll() is None
        return pid_alive(int(run["pid"]))

    def kill(self, run: dict[str, Any]) -> bool:
        if run.get("host") != self.host or not run.get("pid"):
            return False
        try:
            os.killpg(int(run["pid"]), signal.SIGKILL)  # the worker leads its own process group
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def reap(self) -> list[tuple[str, int]]:
        done = [(run_id, proc.returncode) for run_id, proc in self.children.items() if proc.poll() is not None]
        for run_id, _ in done:
            del self.children[run_id]
        return done


def slot_of(run: dict[str, Any]) -> str | None:
    """The slot name a local run occupies, from its executor ref "host:pid:slot"."""
    ref = run.get("executor_ref") or ""
    parts = ref.split(":")
    return parts[2] if len(parts) == 3 else None


BACKENDS = ("local", "ray")


def backend_name() -> str:
    """SAMLAB_EXECUTOR, validated: "local" (default) or "ray"."""
    name = os.environ.get("SAMLAB_EXECUTOR") or "local"
    if name not in BACKENDS:
        raise ValueError(f"SAMLAB_EXECUTOR: unknown executor {name!r}; available: {', '.join(BACKENDS)}")
    return name


def get_executor(name: str | None = None) -> Executor:
    """The executor named by `name` or SAMLAB_EXECUTOR (default "local") for the local scheduler."""
    name = name or backend_name()
    if name == "local":
        return LocalExecutor()
    if name == "ray":
        raise ValueError("SAMLAB_EXECUTOR: with 'ray' runs are submitted to the cluster as Ray jobs "
                         "(samlab.runs.ray_executor); the local scheduler does not launch them")
    raise ValueError(f"SAMLAB_EXECUTOR: unknown executor {name!r}; available: {', '.join(BACKENDS)}")


def describe_backend() -> str:
    """Where background runs go, in one line (the dashboard's status)."""
    if backend_name() == "ray":
        from samlab.runs.ray_executor import describe

        return f"executor ray: {describe()}"
    slots = local_slots()
    kind = "GPU" if slots and slots[0].name.startswith("gpu") else "CPU"
    return f"executor local: {len(slots)} {kind} slot(s) on {hostname()}"
