"""Suite-wide settings: one torch thread per test process.

The suite runs on small machines (2 cores) with tests that start worker subprocesses beside the
in-process ones; several torch thread pools on two cores spin against each other and make tiny
models many times slower. One thread per process, in tests and in the workers they start.
"""

import os

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
