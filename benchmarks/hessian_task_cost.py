"""Cost of the Hessian page's analysis (the "hessian" task with its defaults), stage by stage.

Runs `samlab.tasks.hessian.run_task` in this process on a checkpoint, as `python -m samlab analyze
hessian` does, and prints for every finished stage its wall and CPU seconds (the process' CPU time,
all threads; robust to waiting for a core on a loaded machine) and its Hessian-vector products, then
the headline numbers (eigenvalues, trace ± stderr, per-layer traces ± stderr) so that two trees can be
compared on the same checkpoint. The load average before and after is printed with the figures.

    python benchmarks/hessian_task_cost.py CHECKPOINT [--threads N] [--set KEY=VALUE ...] [--json OUT]

A checkpoint of the digits-cnn preset: `python -m samlab train --preset digits-cnn --workdir DIR`
(DIR/checkpoint.pt).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from samlab.config import parse_assignment
from samlab.reporting import Reporter
from samlab.tasks.hessian import run_task


class StageClock(Reporter):
    """Wall and CPU time at every published (partial) result: one per finished stage."""

    def __init__(self) -> None:
        self.marks = [(time.perf_counter(), time.process_time(), [])]

    def progress(self, done: float, total: float, message: str = "") -> None:
        if len(self.marks) == 1 and not self.marks[0][2]:  # the first stage starts: the rest was set-up
            self.marks.append((time.perf_counter(), time.process_time(), ["(set-up: checkpoint, data)"]))

    def result(self, value: dict) -> None:
        self.marks.append((time.perf_counter(), time.process_time(), [*self.marks[1][2], *value["done"]]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--set", dest="params", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", help="write the full result and the stage times to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:  # as the CLI does (trees that have it)
        from samlab.devices import retain_freed_memory
    except ImportError:
        pass
    else:
        retain_freed_memory()
    params = {"checkpoint": args.checkpoint, "device": "cpu", **dict(parse_assignment(s) for s in args.params)}
    load_before = os.getloadavg()
    clock = StageClock()
    with tempfile.TemporaryDirectory() as workdir:
        result = run_task(params, clock, Path(workdir), resume=False)
    load_after = os.getloadavg()
    print(f"threads {torch.get_num_threads()}, load average {'/'.join(f'{v:.1f}' for v in load_before)} -> "
          f"{'/'.join(f'{v:.1f}' for v in load_after)}")
    stages = []
    for (w0, c0, before), (w1, c1, after) in zip(clock.marks, clock.marks[1:]):
        name = ", ".join(s for s in after if s not in before)
        stages.append({"stage": name, "wall_s": w1 - w0, "cpu_s": c1 - c0})
        print(f"  {name:28s} wall {w1 - w0:7.2f} s   cpu {c1 - c0:7.2f} s")
    wall = clock.marks[-1][0] - clock.marks[0][0]
    cpu = clock.marks[-1][1] - clock.marks[0][1]
    print(f"  {'total':28s} wall {wall:7.2f} s   cpu {cpu:7.2f} s")
    for line in headline(result):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"stages": stages, "wall_s": wall, "cpu_s": cpu, "result": result,
                                               "load": [load_before, load_after]}))
    return 0


def headline(result: dict) -> list[str]:
    lines = []
    eig = result.get("eigenvalues", {})
    for which in ("largest", "smallest"):
        if which in eig:
            e = eig[which]
            lines.append(f"{which:9s} {', '.join(f'{v:.7g}' for v in e['values'])}  ({e['n_hvp']} HVPs"
                         f"{', converged' if e['converged'] else ', NOT converged'})")
    if "trace" in result:
        t = result["trace"]
        lines.append(f"trace     {t['mean']:.6g} ± {t['stderr']:.3g}  ({t['n_hvp']} HVPs)")
    if "density" in result:
        lines.append(f"density   {len(result['density']['nodes'])} runs, {result['density']['n_hvp']} HVPs")
    for row in result.get("per_layer", []):
        trace = f"{row['trace']:.5g} ± {row['trace_stderr']:.3g}" if "trace" in row else "-"
        lines.append(f"layer {row['layer']:10s} {row['n_params']:6d} params  λ_max {row['lambda_max']:.7g}  trace {trace}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
