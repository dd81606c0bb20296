"""The checkpoint files of a run: where they live, how they are written and read back, and their digest.

A training run writes `checkpoint.pt` (model, optimizer, RNG streams and position, so it resumes
exactly) into its workdir, and a small snapshot of the weights per checkpoint epoch under `snapshots/`
(the trajectory the landscape's PCA directions and path use). Everything is read back with
`torch.load(weights_only=True)`. Analyses get a model through `load_trained` and never import the trainer.
The UI and the job runner import this module for `checkpoint_of` alone, so torch, the datasets and the
models are imported inside the functions that need them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from samlab.config import RunConfig
    from samlab.data import Dataset

CHECKPOINT = "checkpoint.pt"
SNAPSHOT_DIR = "snapshots"
SNAPSHOT_MAX_PARAMS = 5_000_000  # trajectory snapshots (for landscape PCA) only for models this small


@dataclass
class Trained:
    """A model restored from a checkpoint, with what the analyses need beside it."""

    model: nn.Module
    config: RunConfig
    data: Dataset
    loss_fn: Any  # per-sample loss
    epoch: int
    step: int


def checkpoint_of(run: Mapping[str, Any]) -> str:
    """The checkpoint file of a training run: the path it reported, else `checkpoint.pt` in its workdir."""
    return str(run.get("checkpoint_path") or Path(run.get("workdir") or "") / CHECKPOINT)


def build_run_model(cfg: RunConfig, data: Dataset, device: torch.device) -> nn.Module:
    """The (freshly initialised) model of a run config for its dataset, on `device`."""
    from samlab.models import build_model

    outputs = data.num_classes if data.task == "classification" else 1
    return build_model(cfg.model, data.input_shape, outputs).to(device)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The payload of a checkpoint or snapshot (weights_only); ValueError naming the file if unreadable."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which and why
        raise ValueError(f"checkpoint: cannot read {path} ({type(exc).__name__}: {exc})") from None


def write_checkpoint(workdir: Path, payload: dict[str, Any]) -> Path:
    """Write `workdir/checkpoint.pt` atomically: a kill mid-write never leaves a truncated checkpoint."""
    import torch

    path = Path(workdir) / CHECKPOINT
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def require_checkpoint(workdir: Path | None) -> Path:
    """The checkpoint a resumed run continues from; ValueError saying why there is none."""
    if workdir is None:
        raise ValueError("resume: needs the run's workdir (where checkpoint.pt was written)")
    path = Path(workdir) / CHECKPOINT
    if not path.is_file():
        raise ValueError(f"resume: no checkpoint at {path}; the run stopped before its first checkpoint")
    return path


def write_snapshot(workdir: Path, epoch: int, payload: dict[str, Any]) -> Path:
    """Save one trajectory snapshot (config, weights, epoch, step) for epoch `epoch`."""
    import torch

    folder = Path(workdir) / SNAPSHOT_DIR
    folder.mkdir(exist_ok=True)
    path = folder / f"epoch_{epoch:04d}.pt"
    torch.save(payload, path)
    return path


def list_snapshots(workdir: str | Path) -> list[Path]:
    """Model snapshots saved at each checkpoint epoch (the training trajectory), oldest first."""
    folder = Path(workdir) / SNAPSHOT_DIR
    return sorted(folder.glob("epoch_*.pt")) if folder.is_dir() else []


def snapshot_epoch(path: Path) -> int:
    """The epoch a snapshot file was written at (from its name `epoch_NNNN.pt`)."""
    return int(Path(path).stem.split("_")[-1])


def snapshot_weights(path: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters of a snapshot, on the model's device, keyed like `named_parameters`."""
    import torch

    device = next(model.parameters()).device
    payload = torch.load(path, map_location=device, weights_only=True)
    names = {name for name, _ in model.named_parameters()}
    return {name: t for name, t in payload["model"].items() if name in names}


def load_trained(checkpoint_path: str | Path, device: str | torch.device = "cpu") -> Trained:
    """Rebuild the model of a checkpoint (or a snapshot) with its config and data."""
    import torch

    from samlab.config import RunConfig
    from samlab.data import load_dataset
    from samlab.losses import per_sample_loss

    path = Path(checkpoint_path)
    if not path.is_file():
        raise ValueError(f"checkpoint: no file at {path}")
    payload = read_checkpoint(path)
    cfg = RunConfig.from_json(payload["config"])
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    data = load_dataset(cfg.data, device=dev)
    model = build_run_model(cfg, data, dev)
    model.load_state_dict(payload["model"])
    model.eval()
    return Trained(model, cfg, data, per_sample_loss(data.task), int(payload["epoch"]), int(payload["step"]))


def file_digest(path: str | Path) -> str:
    """sha256 of a checkpoint file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
