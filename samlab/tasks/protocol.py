"""The protocol every resumable analysis task follows.

- its request key covers the normalised params and the sha256 of every checkpoint they name, so a
  checkpoint trained further is a new request for the run store's cache (`request_key`);
- its partial state is JSON in the task's workdir, written atomically and read back only for the
  same request (`TaskState`);
- progress of a part (a stage, one of several surfaces) maps onto the whole task's bar (`PartReporter`);
- it measures a seeded subset of a split, the same for every run compared (`seeded_subset`, `batches`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from samlab.checkpoints import file_digest
from samlab.reporting import Reporter


def checkpoint_paths(params: dict[str, Any]) -> list[str]:
    """The checkpoint files a request names ("checkpoint" or "checkpoints")."""
    single = params.get("checkpoint")
    several = params.get("checkpoints")
    paths = [single] if isinstance(single, str) else []
    if isinstance(several, list):
        paths += [p for p in several if isinstance(p, str)]
    return paths


def checkpoint_digests(params: dict[str, Any]) -> list[str | None]:
    """sha256 of each checkpoint the request names (None for a file that is not there)."""
    return [file_digest(p) if Path(p).is_file() else None for p in checkpoint_paths(params)]


def request_key(kind: str, params: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of kind, normalised params and the contents of their checkpoints."""
    request: dict[str, Any] = {"kind": kind, "params": params}
    digests = checkpoint_digests(params)
    if digests:
        request["checkpoint_digests"] = digests
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class TaskState:
    """A task's partial result as JSON in its workdir, tagged with the request it belongs to."""

    def __init__(self, workdir: Path, name: str, kind: str, params: dict[str, Any]) -> None:
        self.path = Path(workdir) / name
        self.request = request_key(kind, params)

    def load(self, resume: bool) -> dict[str, Any] | None:
        """The saved state when resuming the same request (same params, same checkpoint bytes), else None."""
        if not resume or not self.path.is_file():
            return None
        saved = json.loads(self.path.read_text())
        if not isinstance(saved, dict) or saved.pop("request", None) != self.request:
            return None
        return saved

    def save(self, payload: dict[str, Any]) -> None:
        """Atomic write (temporary file + rename): a kill mid-write leaves the last good state."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**payload, "request": self.request}))
        tmp.replace(self.path)


class PartReporter(Reporter):
    """Forwards to `inner`, mapping one part's progress onto [start, start + width] of the whole `total`."""

    def __init__(self, inner: Reporter, start: float, width: float, total: float, label: str = "") -> None:
        self.inner, self.start, self.width, self.total, self.label = inner, start, width, total, label

    def progress(self, done: float, total: float, message: str = "") -> None:
        part = min(done, total) * self.width / total if total > 0 else self.width
        self.inner.progress(self.start + part, self.total, f"{self.label}: {message}" if self.label else message)

    def log(self, message: str) -> None:
        self.inner.log(message)

    def should_stop(self) -> bool:
        return self.inner.should_stop()


def seeded_subset(x: torch.Tensor, y: torch.Tensor, size: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`size` samples drawn without replacement by a generator seeded with `seed` (all when size is None
    or not smaller than the set)."""
    if size is None or size >= len(x):
        return x, y
    index = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:size].to(x.device)
    return x[index], y[index.to(y.device)]


def batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive batches of `size` samples."""
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]
