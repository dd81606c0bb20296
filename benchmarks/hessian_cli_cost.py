"""Wall and CPU time of the whole `python -m samlab analyze hessian` command (start-up included).

Runs the command on one checkpoint for every given source tree in turn (interleaved: tree 1, tree 2, …,
then again), each in a fresh process with PYTHONPATH pointing at that tree, and prints every run's wall
seconds and CPU seconds (user + system of the process and its threads), then per tree the medians and
their ratio to the first tree. The load average is printed with every run. Threads: torch's default
unless `--threads N` (sets OMP_NUM_THREADS for the command).

    python benchmarks/hessian_cli_cost.py CHECKPOINT [--tree DIR ...] [--repeats N] [--threads N]
        [--set KEY=VALUE ...]

Without --tree it times the tree this script belongs to. A digits-cnn checkpoint:
`python -m samlab train --preset digits-cnn --workdir DIR` (DIR/checkpoint.pt).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def run_once(tree: Path, checkpoint: str, params: list[str], threads: int | None, out: Path) -> tuple[float, float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, "-m", "samlab", "analyze", "hessian", "--set", f"checkpoint={checkpoint}",
               *[arg for item in params for arg in ("--set", item)], "--out", str(out)]  # fmt: skip
    before = os.times()
    start = time.perf_counter()
    done = subprocess.run(command, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    after = os.times()
    if done.returncode != 0:
        raise SystemExit(f"{tree}: exit status {done.returncode}\n{done.stderr[-2000:]}")
    return wall, (after.children_user - before.children_user) + (after.children_system - before.children_system)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--tree", action="append", default=[], help="a source tree (repeatable; default: this one)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the command")
    parser.add_argument("--set", dest="params", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    trees = [Path(t).resolve() for t in args.tree] or [HERE]
    checkpoint = str(Path(args.checkpoint).resolve())
    times: dict[Path, list[tuple[float, float]]] = {tree: [] for tree in trees}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for tree in trees:
                wall, cpu = run_once(tree, checkpoint, args.params, args.threads, Path(scratch) / "result.json")
                times[tree].append((wall, cpu))
                load = "/".join(f"{v:.1f}" for v in os.getloadavg())
                print(f"{tree}  run {repeat + 1}: wall {wall:6.2f} s  cpu {cpu:6.2f} s  (load {load})", flush=True)
    base = trees[0]
    base_wall = statistics.median(w for w, _ in times[base])
    base_cpu = statistics.median(c for _, c in times[base])
    print(f"medians over {args.repeats} runs, threads {args.threads or 'default'}:")
    for tree in trees:
        wall = statistics.median(w for w, _ in times[tree])
        cpu = statistics.median(c for _, c in times[tree])
        print(f"  {str(tree):40s} wall {wall:6.2f} s ({wall / base_wall:.2f}x)  cpu {cpu:6.2f} s ({cpu / base_cpu:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
