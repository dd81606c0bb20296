"""Data-parallel training of one run with torch.distributed: m-SAM across ranks, DDP style.

    torchrun --nproc-per-node N -m samlab.distributed --preset NAME [--set k=v ...] [--workdir DIR]
    python -m samlab train --preset NAME --nproc N ...        (the same, launched through torchrun)

Every rank builds the same model from the same seed, draws the same global batch of
`batch_size` samples and trains on its own shard of b / N samples (rank r takes rows
r·b/N ... (r+1)·b/N − 1). Parameters are broadcast from rank 0 at the start, as DDP does.

SAM under data parallelism (Foret et al., ICLR 2021, whose multi-device code behaves the same way):

- first pass (forward and backward) without gradient synchronization: each rank perturbs with the
  gradient of its own shard, eps_r = rho g_r / ‖g_r‖;
- second pass averaged across ranks: the descent gradient is (1/N) Σ_r grad L_{B_r}(w + eps_r).

That is exactly m-SAM over the global batch with m = b / N, the per-rank batch (and with
`optim.method = msam` and m < b / N, m-SAM with that m, micro-batches never crossing ranks).
`sync_perturbation=True` all-reduces the first-pass gradient before eps is built, giving plain SAM
over the global batch: eps = rho g / ‖g‖ with g = (1/N) Σ_r g_r.

The step runs through `samlab.optim.sharpness_gradient` on the plain module: its gradients come from
torch.autograd.grad through torch.func.functional_call, where DistributedDataParallel's reducer
hooks never fire, so the module is not wrapped and the averaging is done here explicitly: one
flattened all-reduce per dtype (sum, then divide by N: gloo has no average reduction). BatchNorm
statistics stay per rank (never broadcast: DDP's broadcast_buffers=False); only rank 0 reports
metrics and writes checkpoints. The backend is nccl on CUDA devices and gloo on the CPU.

Public API: DataParallel, check_parallel_config(cfg, world_size), train(cfg, ...), launch(...),
main(argv).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from samlab.config import RunConfig, preset
from samlab.reporting import ConsoleReporter, Reporter

WRITER_RANK = 0


class DataParallel:
    """One rank's view of a data-parallel run: sharding, gradient averaging, agreement on stopping."""

    def __init__(self, *, sync_perturbation: bool = False, group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("parallel: torch.distributed is not initialized (run under torchrun, or call "
                             "torch.distributed.init_process_group first)")
        if not isinstance(sync_perturbation, bool):
            raise ValueError(f"sync_perturbation: must be True or False (got {sync_perturbation!r})")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.sync_perturbation = sync_perturbation

    @property
    def is_writer(self) -> bool:
        return self.rank == WRITER_RANK

    @property
    def ascent_hook(self):
        """The first-pass gradient transform: an all-reduce mean when perturbations are synchronized,
        else None (each rank perturbs with its own gradient)."""
        return self.mean_ if self.sync_perturbation else None

    def shard(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's contiguous slice of the global batch."""
        b = x.shape[0]
        if b % self.world_size:
            raise ValueError(f"batch_size: the global batch of {b} must split evenly over "
                             f"{self.world_size} ranks")
        per = b // self.world_size
        lo = self.rank * per
        return x[lo : lo + per], y[lo : lo + per]

    def mean_(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Average tensors across ranks in place (one flat all-reduce per dtype: sum, then / N)."""
        tensors = list(tensors)
        by_dtype: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        for i, t in enumerate(tensors):
            by_dtype.setdefault((t.dtype, t.device), []).append(i)
        for indices in by_dtype.values():
            flat = torch.cat([tensors[i].reshape(-1) for i in indices])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
            flat.div_(self.world_size)
            offset = 0
            for i in indices:
                n = tensors[i].numel()
                tensors[i].copy_(flat[offset : offset + n].view_as(tensors[i]))
                offset += n
        return tensors

    def average(self, model: nn.Module, metrics: dict[str, float]) -> dict[str, float]:
        """Average every trainable parameter's .grad and the step's scalar metrics across ranks."""
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        self.mean_(grads)
        names = list(metrics)
        values = torch.tensor([float(metrics[n]) for n in names], dtype=torch.float64,
                              device=grads[0].device if grads else "cpu")
        (values,) = self.mean_([values])
        return dict(zip(names, values.tolist(), strict=True))

    def agree_stop(self, asked: bool) -> bool:
        """True on every rank when any rank was asked to stop (the reporter lives on rank 0)."""
        flag = torch.tensor([1.0 if asked else 0.0], device=self._device())
        dist.all_reduce(flag, op=dist.ReduceOp.SUM, group=self.group)
        return bool(flag.item() > 0)

    def broadcast_(self, model: nn.Module) -> None:
        """Rank 0's parameters to every rank (buffers stay per rank: BatchNorm statistics)."""
        for p in model.parameters():
            dist.broadcast(p.data, src=WRITER_RANK, group=self.group)

    def _device(self) -> torch.device:
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def check_parallel_config(cfg: RunConfig, world_size: int) -> RunConfig:
    """The config checks a data-parallel run adds (ValueError naming the field)."""
    cfg.validate()
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"nproc: must be an integer >= 1 (got {world_size!r})")
    if cfg.batch_size % world_size:
        raise ValueError(f"batch_size: {cfg.batch_size} must be divisible by the number of processes "
                         f"{world_size} (each trains on batch_size / nproc samples)")
    if cfg.optim.accumulate > 1 or cfg.precision == "fp16":
        field = "optim.accumulate" if cfg.optim.accumulate > 1 else "precision"
        raise ValueError(f"{field}: data-parallel runs take neither optim.accumulate > 1 nor precision fp16 "
                         "(both run the step through the SAM optimizer class; see SAM.no_sync for DDP)")
    per_rank = cfg.batch_size // world_size
    if cfg.optim.method == "msam" and per_rank % cfg.optim.m:
        raise ValueError(f"optim.m: m={cfg.optim.m} must divide the per-process batch {per_rank} "
                         f"(batch_size {cfg.batch_size} / nproc {world_size})")
    return cfg


def _init_process_group(device: str) -> tuple[str, int]:
    """Join the group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): nccl when
    the run's device is CUDA (or "auto" with CUDA present), else gloo."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"environment: {', '.join(missing)} not set; start this module with torchrun "
                         "(or `python -m samlab train --nproc N`)")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    wants_cuda = device.startswith("cuda") or device == "auto"
    backend = "nccl" if wants_cuda and torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    return backend, local_rank


def train(cfg: RunConfig, *, workdir: str | Path | None = None, resume: bool = False,
          sync_perturbation: bool = False, reporter: Reporter | None = None):
    """Train `cfg` as one rank of the current process group; returns train.run's TrainResult.

    On CUDA each rank uses the device of its LOCAL_RANK. Rank 0 uses `reporter` (default: console)
    and writes the checkpoints; the other ranks report nothing."""
    from samlab.train import run

    backend, local_rank = _init_process_group(cfg.device)
    check_parallel_config(cfg, dist.get_world_size())
    if backend == "nccl":
        cfg = cfg.with_overrides({"device": f"cuda:{local_rank}"})
    elif cfg.device.startswith("cuda"):
        raise ValueError(f"device: {cfg.device!r} asked for, but CUDA is not available to this process")
    parallel = DataParallel(sync_perturbation=sync_perturbation)
    rank_reporter = (reporter or ConsoleReporter()) if parallel.is_writer else Reporter()
    return run(cfg, rank_reporter, workdir=workdir, resume=resume, parallel=parallel)


def _forwarded_args(args: argparse.Namespace) -> list[str]:
    out = ["--preset", args.preset]
    for item in args.overrides:
        out += ["--set", item]
    if args.workdir:
        out += ["--workdir", str(args.workdir)]
    out += ["--resume"] * bool(args.resume) + ["--json"] * bool(args.json)
    out += ["--sync-perturbation"] * bool(args.sync_perturbation)
    return out


def launch(args: argparse.Namespace, nproc: int) -> int:
    """`python -m samlab train --nproc N`: run this module under torchrun with N local processes."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or not 1 <= nproc <= 1024:
        raise ValueError(f"--nproc: must be an integer in [1, 1024] (got {nproc!r})")
    check_parallel_config(preset(args.preset, args.overrides), nproc)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "samlab.distributed", *_forwarded_args(args)]
    return subprocess.call(command)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="torchrun ... -m samlab.distributed",
                                     description="one data-parallel training run (a rank of it)")
    parser.add_argument("--preset", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--json", action="store_true", help="rank 0 prints the final summary as JSON")
    parser.add_argument("--sync-perturbation", action="store_true",
                        help="all-reduce the first gradient (SAM over the global batch) instead of "
                             "per-process perturbations (m-SAM, m = batch_size / nproc)")
    args = parser.parse_args(argv)
    try:
        result = train(preset(args.preset, args.overrides), workdir=args.workdir, resume=args.resume,
                       sync_perturbation=args.sync_perturbation)
        # every rank waits for the others (the writer rank saves and evaluates last) before the process
        # group is torn down: a rank that tore it down while a peer still used it could abort at exit
        dist.barrier()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == WRITER_RANK:
        summary: dict[str, Any] = result.summary
        print(json.dumps(summary, sort_keys=True) if args.json else
              f"{result.status}: {summary['epochs']} epochs, {summary['steps']} steps on {summary['device']}")
    return 0 if result.status == "completed" else 1


if __name__ == "__main__":
    # As `python -m samlab` does: a rank that had finished, met its peers at the barrier and destroyed its
    # process group still aborted once in a loaded test run ("terminate called without an active
    # exception", exit -6) while the interpreter shut down.
    from samlab.quick_exit import exit_now

    exit_now(main())
