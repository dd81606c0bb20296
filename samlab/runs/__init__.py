"""Run orchestration: the run store, submitting and cancelling runs, the scheduler and its executors,
the worker process a run lives in, the Ray backend, and launching sweeps. Nothing here does math: a run's
work is a task of `samlab.tasks`."""
