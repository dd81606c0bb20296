"""Suite-wide settings: one torch thread per test process.

The suite runs on small machines (2 cores) with tests that start worker subprocesses beside the
in-process ones; several torch thread pools on two cores spin against each other and make tiny
models many times slower. One thread per process, in tests and in the workers they start.
"""

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture
def store_env(tmp_path, monkeypatch):
    """An empty store in tmp_path, selected through SAMLAB_STORE; submitting starts no scheduler."""
    from samlab.runs import jobs
    from samlab.runs.store import Store

    url = f"sqlite:///{tmp_path / 'runs' / 'samlab.db'}"
    monkeypatch.setenv("SAMLAB_STORE", url)
    monkeypatch.setattr(jobs, "ensure_scheduler", lambda store=None: False)
    return Store(url)
