"""Device selection and description: explicit devices, never a bare `.cuda()`."""

from __future__ import annotations

import ctypes

import torch

# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; any other name is checked for availability."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r}: CUDA is not available on this machine (use 'auto' or 'cpu')")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={name!r}: MPS is not available on this machine (use 'auto' or 'cpu')")
    return dev


def describe_devices() -> list[dict]:
    """What the machine offers, for the dashboard's status panel."""
    found = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            found.append({"device": f"cuda:{i}", "name": props.name, "memory_gib": props.total_memory / 2**30})
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append({"device": "mps", "name": "Apple GPU", "memory_gib": None})
    import os

    found.append({"device": "cpu", "name": f"CPU ({os.cpu_count()} cores)", "memory_gib": None})
    return found


def retain_freed_memory(mmap_mb: int = 32, trim_mb: int = 256, pad_mb: int = 64) -> bool:
    """Let the C allocator keep freed memory for the next allocations (glibc `mallopt`), for a process
    that runs one computation and exits (the CLI, a run's worker).

    By default glibc serves large blocks (from 128 KiB up; the threshold adapts) with fresh `mmap`s that
    `free` unmaps, and returns the top of its heap to the system once a little is free there, so the
    activations of every step or Hessian-vector product are page-faulted and zeroed by the kernel again:
    on the digits CNN 20–30 % of a product's CPU time. Blocks up to `mmap_mb` then come from the heap,
    which keeps up to `trim_mb` free at its top and grows by `pad_mb` extra at a time (the fixed mmap
    threshold also ends glibc's adaptive one). False where there is no glibc `mallopt` (macOS, Windows, musl's stub)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, TypeError):
        return False
    settings = ((_M_MMAP_THRESHOLD, mmap_mb), (_M_TRIM_THRESHOLD, trim_mb), (_M_TOP_PAD, pad_mb))
    return all(mallopt(option, megabytes << 20) == 1 for option, megabytes in settings)
