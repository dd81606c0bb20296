"""The training engine: a RunConfig in, metrics out through a Reporter, checkpoints that resume exactly.

Every optimizer step goes through `samlab.optim.sharpness_gradient`, then the base optimizer (SGD with
momentum / Nesterov / weight decay, or AdamW) steps; gradient accumulation (`optim.accumulate`) and fp16
with a gradient scaler run it through the `SAM` optimizer class instead (`samlab.optim.sam_step`). The
learning rate is a pure function of the global step (warm-up, then constant / cosine / step decay), so a
resumed run sees the same schedule.

Reproducibility: three seeded streams — the global torch RNG (initialisation, dropout), `batch_gen`
(one permutation per epoch) and `aux_gen` (augmentation, RW-SAM probes, n-SAM batches). A checkpoint
stores all three, with the permutation generator's state at the start of the epoch and the position in
it, so a run stopped mid-epoch resumes to bit-identical weights on the CPU.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from samlab.checkpoints import (
    SNAPSHOT_MAX_PARAMS,
    build_run_model,
    read_checkpoint,
    require_checkpoint,
    write_checkpoint,
    write_snapshot,
)
from samlab.config import RunConfig
from samlab.data import iterate_batches, load_dataset
from samlab.devices import resolve_device
from samlab.losses import correct, mean_loss, per_sample_loss
from samlab.optim import SAM, sam_step, sharpness_gradient
from samlab.reporting import Reporter

if TYPE_CHECKING:
    from samlab.distributed import DataParallel

EVAL_BATCH = 1024


@dataclass
class TrainResult:
    status: str  # "completed" | "cancelled" | "diverged"
    summary: dict[str, Any]
    checkpoint: Path | None
    model: nn.Module = field(repr=False)


@dataclass
class _State:
    epoch: int = 0  # completed epochs
    step: int = 0  # completed optimizer steps
    step_in_epoch: int = 0
    best_test_acc: float = float("nan")
    last_eval: dict[str, float] = field(default_factory=dict)
    wall_time: float = 0.0


# -- public API -----------------------------------------------------------------------------------
def run(
    config: RunConfig,
    reporter: Reporter | None = None,
    *,
    workdir: str | Path | None = None,
    resume: bool = False,
    parallel: DataParallel | None = None,
) -> TrainResult:
    """Train `config` to completion, cancellation (reporter.should_stop()) or divergence.

    `parallel` (samlab.distributed) makes this process one rank of a data-parallel run: each step
    it trains on its shard of the global batch, gradients are averaged across ranks, and only the
    writing rank saves checkpoints."""
    cfg = config.validate()
    reporter = reporter or Reporter()
    device = resolve_device(cfg.device)
    if cfg.precision != "fp32" and device.type not in ("cuda", "cpu"):
        raise ValueError(f"precision: {cfg.precision} autocast runs on CUDA or the CPU (resolved device is {device.type})")
    workdir = Path(workdir) if workdir is not None else None
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(cfg.seed)
    data = load_dataset(cfg.data, device=device)
    model = build_run_model(cfg, data, device)
    sam = _sam_optimizer(cfg, model) if uses_sam_class(cfg) else None
    base = sam.base_optimizer if sam is not None else _base_optimizer(cfg, model)
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
    batch_gen = torch.Generator().manual_seed(cfg.seed)
    aux_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    state = _State()
    epoch_gen_state = batch_gen.get_state()

    if resume:
        ckpt_path = require_checkpoint(workdir)
        state, epoch_gen_state = _load_checkpoint(ckpt_path, model, base, batch_gen, aux_gen, device, scaler)
        reporter.log(f"resumed from {ckpt_path} at epoch {state.epoch}, step {state.step}")
    if parallel is not None:
        parallel.broadcast_(model)

    engine = _Engine(cfg, data, model, base, batch_gen, aux_gen, device, reporter, workdir, parallel, sam, scaler)
    return engine.train(state, epoch_gen_state)


def uses_sam_class(cfg: RunConfig) -> bool:
    """Whether the step runs through the SAM optimizer class (gradient accumulation or fp16)."""
    return cfg.optim.accumulate > 1 or cfg.precision == "fp16"


def learning_rate(cfg: RunConfig, step: int, steps_per_epoch: int) -> float:
    """The schedule as a pure function of the global step: linear warm-up, then constant/cosine/step."""
    base_lr, sched = cfg.optim.lr, cfg.schedule
    total = cfg.epochs * steps_per_epoch
    warmup = int(round(sched.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if sched.name == "constant":
        return base_lr
    if sched.name == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return sched.min_lr + 0.5 * (base_lr - sched.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))
    return base_lr * sched.gamma ** ((step // steps_per_epoch) // sched.step_every)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str) -> dict[str, float]:
    """Mean loss and accuracy in eval mode, in batches, without touching the model's mode afterwards."""
    loss_fn = per_sample_loss(task)
    was_training = model.training
    model.eval()
    total_loss, total_correct = 0.0, 0.0
    with torch.no_grad():
        for i in range(0, len(x), EVAL_BATCH):
            out = model(x[i : i + EVAL_BATCH])
            yb = y[i : i + EVAL_BATCH]
            total_loss += loss_fn(out, yb).double().sum().item()
            total_correct += correct(out, yb, task).double().sum().item()
    model.train(was_training)
    n = max(1, len(x))
    return {"loss": total_loss / n, "acc": total_correct / n}


# -- the engine -----------------------------------------------------------------------------------
class _Engine:
    def __init__(self, cfg, data, model, base, batch_gen, aux_gen, device, reporter, workdir, parallel=None,
                 sam=None, scaler=None):
        self.cfg, self.data, self.model, self.base = cfg, data, model, base
        self.sam, self.scaler = sam, scaler
        self.batch_gen, self.aux_gen, self.device = batch_gen, aux_gen, device
        self.reporter, self.workdir, self.parallel = reporter, workdir, parallel
        self.writes = workdir is not None and (parallel is None or parallel.is_writer)
        self.loss_fn = per_sample_loss(data.task)
        n = len(data.x_train)
        if cfg.data.augment and not data.is_image:
            raise ValueError(f"data.augment: {data.name!r} is not an image set; augmentation needs images")
        self.batch_size = min(cfg.batch_size, n)
        if cfg.optim.method in ("msam", "ghostbn") and self.batch_size % cfg.optim.m != 0:
            raise ValueError(
                f"optim.m: m={cfg.optim.m} must divide the effective batch size {self.batch_size} "
                f"(batch_size is capped by the train-set size {n})"
            )
        if self.batch_size % cfg.optim.accumulate != 0:
            raise ValueError(
                f"optim.accumulate: {cfg.optim.accumulate} must divide the effective batch size {self.batch_size} "
                f"(batch_size is capped by the train-set size {n})"
            )
        self.steps_per_epoch = max(1, n // self.batch_size)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.n_params = sum(p.numel() for p in model.parameters())
        self.probe = self._fixed_subset(cfg.hessian_samples) if cfg.hessian_every or cfg.noise_every else None

    def train(self, state: _State, epoch_gen_state: torch.Tensor) -> TrainResult:
        cfg = self.cfg
        started = time.monotonic() - state.wall_time
        self.model.train()
        while state.epoch < cfg.epochs:
            self.batch_gen.set_state(epoch_gen_state)
            batches = iterate_batches(
                self.data.x_train, self.data.y_train, self.batch_size, generator=self.batch_gen
            )
            epoch_t0 = time.monotonic()
            for x, y in itertools.islice(batches, state.step_in_epoch, None):
                if self._stop_requested():
                    state.wall_time = time.monotonic() - started
                    return self._finish("cancelled", state, epoch_gen_state)
                metrics = self._step(x, y, state.step)
                state.step += 1
                state.step_in_epoch += 1
                skipped = metrics.get("skipped", 0.0) > 0  # an fp16 overflow: the scaler skipped the step
                if not skipped and not all(math.isfinite(metrics[k]) for k in ("train_loss", "grad_norm")):
                    self.reporter.log(f"diverged at step {state.step}: {metrics}")
                    self.reporter.metrics("step", state.step, metrics)
                    state.wall_time = time.monotonic() - started
                    return self._finish("diverged", state, None)
                self._after_step(state, metrics)
            state.epoch += 1
            state.step_in_epoch = 0
            epoch_gen_state = self.batch_gen.get_state()
            self._end_epoch(state, time.monotonic() - epoch_t0, epoch_gen_state)
            state.wall_time = time.monotonic() - started
        state.wall_time = time.monotonic() - started
        return self._finish("completed", state, epoch_gen_state)

    # one optimizer step
    def _step(self, x: torch.Tensor, y: torch.Tensor, step: int) -> dict[str, float]:
        cfg, o = self.cfg, self.cfg.optim
        lr = learning_rate(cfg, step, self.steps_per_epoch)
        for group in self.base.param_groups:
            group["lr"] = lr
        if cfg.data.augment:
            x = self.data.augment(x, self.aux_gen)
        if self.parallel is not None:
            x, y = self.parallel.shard(x, y)
        t0 = time.perf_counter()
        if self.sam is not None:
            info = sam_step(self.sam, self.model, self.loss_fn, x, y, accumulate=o.accumulate, scaler=self.scaler,
                            autocast=_AUTOCAST_DTYPES[cfg.precision])
        else:
            with self._autocast():
                info = sharpness_gradient(
                    self.model, self.loss_fn, x, y,
                    method=o.method, rho=o.rho, m=o.m, impl=o.impl, lam=o.lam, estimator=o.estimator,
                    delta=o.delta, adaptive_eta=o.adaptive_eta, perturb_batch=self._perturb_batch(),
                    generator=self.aux_gen, ascent_hook=self.parallel.ascent_hook if self.parallel else None,
                )  # fmt: skip
            if self.parallel is not None:
                info = self.parallel.average(self.model, info)
            self.base.step()
            self.base.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        loss, perturbed = _scalar(info["loss"]), _scalar(info["perturbed_loss"])
        metrics = {
            "train_loss": loss,
            "perturbed_loss": perturbed,
            "sharpness": perturbed - loss,
            "grad_norm": _scalar(info["grad_norm"]),
            "lr": lr,
            "step_time": time.perf_counter() - t0,
        }
        if self.scaler is not None:
            metrics["skipped"] = info["skipped"]
            metrics["loss_scale"] = self.scaler.get_scale()
        return metrics

    def _after_step(self, state: _State, metrics: dict[str, float]) -> None:
        cfg = self.cfg
        measured = False
        if cfg.hessian_every and state.step % cfg.hessian_every == 0:
            from samlab.hessian import lambda_max_metric

            metrics["lambda_max"] = lambda_max_metric(
                self.model, mean_loss(self.data.task), self.probe, tol=1e-3, max_iter=50, seed=cfg.seed
            )
            measured = True
        if cfg.noise_every and state.step % cfg.noise_every == 0:
            from samlab.noise import noise_metrics

            metrics.update(noise_metrics(self.model, self.loss_fn, self.probe))
            measured = True
        if measured or state.step % cfg.log_every == 0 or state.step == self.total_steps:
            self.reporter.metrics("step", state.step, metrics)
        self.reporter.progress(state.step, self.total_steps, f"epoch {state.epoch + 1}/{cfg.epochs}")

    def _end_epoch(self, state: _State, epoch_time: float, epoch_gen_state: torch.Tensor) -> None:
        cfg = self.cfg
        last = state.epoch == cfg.epochs
        if state.epoch % cfg.eval_every == 0 or last:
            state.last_eval = self._evaluate()
            state.last_eval["epoch_time"] = epoch_time
            if not math.isnan(state.last_eval["test_acc"]):
                state.best_test_acc = _nanmax(state.best_test_acc, state.last_eval["test_acc"])
            self.reporter.metrics("epoch", state.epoch, state.last_eval)
        if self.writes and cfg.checkpoint_every and state.epoch % cfg.checkpoint_every == 0:
            self._save(state, epoch_gen_state)
            self._snapshot(state)

    def _evaluate(self) -> dict[str, float]:
        d = self.data
        train = evaluate(self.model, d.x_train, d.y_train, d.task)
        test = evaluate(self.model, d.x_test, d.y_test, d.task)
        return {
            "train_loss": train["loss"],
            "train_acc": train["acc"],
            "test_loss": test["loss"],
            "test_acc": test["acc"],
        }

    def _finish(self, status: str, state: _State, epoch_gen_state: torch.Tensor | None) -> TrainResult:
        checkpoint = None
        if self.writes and epoch_gen_state is not None:
            checkpoint = self._save(state, epoch_gen_state)
            if status == "completed":
                self._snapshot(state)
        summary = self._summary(status, state)
        self.reporter.progress(state.step, self.total_steps, status)
        return TrainResult(status, summary, checkpoint, self.model)

    def _summary(self, status: str, state: _State) -> dict[str, Any]:
        ev = state.last_eval
        gap = ev.get("train_acc", float("nan")) - ev.get("test_acc", float("nan"))
        loss_gap = ev.get("test_loss", float("nan")) - ev.get("train_loss", float("nan"))
        return {
            "status": status,
            "epochs": state.epoch,
            "steps": state.step,
            "final_train_loss": ev.get("train_loss"),
            "final_train_acc": ev.get("train_acc"),
            "final_test_loss": ev.get("test_loss"),
            "final_test_acc": ev.get("test_acc"),
            "best_test_acc": None if math.isnan(state.best_test_acc) else state.best_test_acc,
            "generalization_gap": None if math.isnan(gap) else gap,
            "loss_gap": None if math.isnan(loss_gap) else loss_gap,
            "wall_time": state.wall_time,
            "device": str(self.device),
            "n_params": self.n_params,
        }

    # helpers
    def _stop_requested(self) -> bool:
        asked = self.reporter.should_stop()
        return self.parallel.agree_stop(asked) if self.parallel is not None else asked

    def _perturb_batch(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.cfg.optim.method != "nsam":
            return None
        x, y = self.data.x_train, self.data.y_train
        size = self.cfg.optim.nsam_batch
        if size is None or size >= len(x):
            return x, y
        idx = torch.randperm(len(x), generator=self.aux_gen, device=self.aux_gen.device)[:size]
        return x[idx], y[idx]

    def _fixed_subset(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.cfg.seed + 2)
        idx = torch.randperm(len(self.data.x_train), generator=gen)[:size].to(self.device)
        return self.data.x_train[idx], self.data.y_train[idx]

    def _autocast(self):
        dtype = _AUTOCAST_DTYPES[self.cfg.precision]
        return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=self.device.type, dtype=dtype)

    def _save(self, state: _State, epoch_gen_state: torch.Tensor) -> Path:
        self.reporter.sync()  # metrics up to this checkpoint are stored before it exists
        payload = {
            "config": self.cfg.to_json(),
            "model": self.model.state_dict(),
            "optimizer": self.base.state_dict(),
            "epoch": state.epoch,
            "step": state.step,
            "step_in_epoch": state.step_in_epoch,
            "best_test_acc": state.best_test_acc,
            "last_eval": dict(state.last_eval),
            "wall_time": state.wall_time,
            "epoch_gen_state": epoch_gen_state,
            "aux_gen_state": self.aux_gen.get_state(),
            "torch_rng_state": torch.get_rng_state(),
        }
        if self.scaler is not None:
            payload["scaler"] = self.scaler.state_dict()
        return write_checkpoint(self.workdir, payload)

    def _snapshot(self, state: _State) -> None:
        if self.n_params > SNAPSHOT_MAX_PARAMS:
            return
        payload = {"config": self.cfg.to_json(), "model": self.model.state_dict(), "epoch": state.epoch,
                   "step": state.step}
        write_snapshot(self.workdir, state.epoch, payload)


# -- module helpers -------------------------------------------------------------------------------
def _base_class(cfg: RunConfig) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    o = cfg.optim
    if o.base == "sgd":
        return torch.optim.SGD, {"lr": o.lr, "momentum": o.momentum, "weight_decay": o.weight_decay,
                                 "nesterov": o.nesterov}
    return torch.optim.AdamW, {"lr": o.lr, "weight_decay": o.weight_decay}


def _base_optimizer(cfg: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    base, kwargs = _base_class(cfg)
    return base(model.parameters(), **kwargs)


def _sam_optimizer(cfg: RunConfig, model: nn.Module) -> SAM:
    """The SAM class around the base optimizer; it restores BatchNorm statistics after the perturbed pass."""
    o = cfg.optim  # validated: o.method is one of samlab.config.CLASS_PATH_METHODS
    base, kwargs = _base_class(cfg)
    return SAM(model.parameters(), base, rho=o.rho, adaptive_eta=o.adaptive_eta, method=o.method, model=model,
               **kwargs)


def _load_checkpoint(path, model, base, batch_gen, aux_gen, device, scaler=None) -> tuple[_State, torch.Tensor]:
    payload = read_checkpoint(path)
    try:
        model.load_state_dict(payload["model"])
        base.load_state_dict(payload["optimizer"])
        if scaler is not None:
            scaler.load_state_dict(payload["scaler"])
        aux_gen.set_state(payload["aux_gen_state"])
        torch.set_rng_state(payload["torch_rng_state"])
        state = _State(
            epoch=int(payload["epoch"]),
            step=int(payload["step"]),
            step_in_epoch=int(payload["step_in_epoch"]),
            best_test_acc=float(payload["best_test_acc"]),
            last_eval=dict(payload["last_eval"]),
            wall_time=float(payload["wall_time"]),
        )
        epoch_gen_state = payload["epoch_gen_state"]
        batch_gen.set_state(epoch_gen_state)
    except (KeyError, RuntimeError, TypeError) as exc:
        raise ValueError(f"checkpoint: {path} does not match this run ({type(exc).__name__}: {exc})") from None
    return state, epoch_gen_state


_AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _scalar(value) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def _nanmax(a: float, b: float) -> float:
    return b if math.isnan(a) else max(a, b)


