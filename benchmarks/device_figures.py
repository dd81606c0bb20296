"""Every accelerator figure in one run: the benchmarks that take `--device`, one after another.

    python benchmarks/device_figures.py [--device cuda] [--out DIR] [--quick] [--only a,b]

Runs, each as its own process with its own time limit (a benchmark that runs over is stopped and
reported as such; the others still run):

- step_cost: one optimizer step on every built-in model (plus ResNet-18 at width 64 on a GPU):
  SAM / SGD, m-SAM (auto, fused, vmap, loop) / SAM at k = 4, 16, 64;
- hessian: samlab's Lanczos and Hutch++ against PyHessian (the digits CNN at widths 10 and 80);
- landscape: one landscape grid point against one eval forward, every built-in model;
- epoch: one cifar10-resnet18 epoch on synthetic CIFAR-10 files in bf16 for SGD, SAM, m-SAM (k = 4, 16)
  and RW-SAM (the second of two epochs, after the device's warm-up).

Each benchmark's JSON goes to DIR/NAME.json and its output to DIR/NAME.log; DIR/figures.json gathers
them all with each one's wall time and exit status. DIR defaults to $OUT when set (a device
machine's result folder), else ./device-figures. On a GPU the whole run takes a few minutes (the
limits below sum to 9 min). `--quick` shrinks every workload to a smoke test of a quarter of a minute on a
CPU (`--device cpu --quick`), which checks the script and the benchmarks' device options end to end on a
machine without an accelerator (the test suite runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> (arguments for the full run, arguments for --quick, time limit in seconds for the full run)
BENCHMARKS = {
    "step_cost": (["--repeats", "7"],
                  ["--repeats", "1", "--warmup", "1", "--min-sample", "0.01", "--models", "mlp-64,diag-linear",
                   "--ks", "4", "--impls", "auto,loop"], 150),
    "hessian": (["--repeats", "3", "--workloads", "small,large", "--with-func"], ["--repeats", "1"], 120),
    "landscape": (["--repeats", "5"], ["--repeats", "1", "--workloads", "digits-mlp,diag-linear"], 90),
    "epoch": (["--precision", "bf16", "--epochs", "2"],
              ["--precision", "fp32", "--epochs", "1", "--train-samples", "256", "--test-samples", "64",
               "--width", "4", "--batch", "64", "--methods", "sgd,msam4"], 180),
}
SCRIPTS = {"step_cost": "step_cost.py", "hessian": "hessian_vs_pyhessian.py",
           "landscape": "landscape_point_cost.py", "epoch": "epoch_cost.py"}


def command(name: str, device: str, quick: bool) -> list[str]:
    full, shrunk, _ = BENCHMARKS[name]
    return [sys.executable, str(HERE / SCRIPTS[name]), "--json", "--device", device, *(shrunk if quick else full)]


def run_one(name: str, device: str, quick: bool, out: Path) -> dict:
    """Run one benchmark; its JSON and log go to `out`."""
    limit = BENCHMARKS[name][2] * (2 if quick else 1)
    cmd = command(name, device, quick)
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd[1:])} (limit {limit} s)", flush=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, cwd=HERE.parent, env=_child_env())
        status, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as err:
        status, stdout, stderr = "timed out", _text(err.stdout), _text(err.stderr)
    wall = time.perf_counter() - start
    (out / f"{name}.log").write_text(stdout + ("\n--- stderr ---\n" + stderr if stderr else ""))
    result = _result(stdout)
    if result is not None:
        (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(f"    {name}: exit {status}, {wall:.0f} s{'' if result is not None else ', no JSON result'}", flush=True)
    return {"command": cmd[1:], "exit": status, "wall_s": round(wall, 1), "result": result}


def _child_env() -> dict[str, str]:
    """The environment with the repository on PYTHONPATH: samlab imports from the checkout also where it is
    not installed (a bare accelerator machine that got the working tree and nothing else)."""
    paths = [str(HERE.parent), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1"}


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def _result(stdout: str) -> object | None:
    """The benchmark's figures: its output, one JSON object with --json (None when it did not finish)."""
    try:
        return json.loads(stdout)
    except json.JSONDecodeError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--out", default=None, help="result folder (default: $OUT, else ./device-figures)")
    parser.add_argument("--quick", action="store_true", help="shrunk workloads: a smoke test of the script")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    args = parser.parse_args(argv)
    names = list(BENCHMARKS) if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"--only: unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: CUDA is not available on this machine (use --device cpu --quick to check the script)")
    out = Path(args.out or os.environ.get("OUT") or "device-figures")
    out.mkdir(parents=True, exist_ok=True)
    figures = {"device": args.device, "quick": args.quick, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
               "benchmarks": {}}
    for name in names:
        figures["benchmarks"][name] = run_one(name, args.device, args.quick, out)
        (out / "figures.json").write_text(json.dumps(figures, indent=1))  # kept current: a cut-off run keeps what ran
    failed = [n for n, r in figures["benchmarks"].items() if r["exit"] != 0 or r["result"] is None]
    print(f"figures in {out / 'figures.json'}; " + (f"failed or without a result: {', '.join(failed)}" if failed
                                                   else "every benchmark gave its result"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
