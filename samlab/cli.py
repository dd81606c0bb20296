"""`python -m samlab ...`: the command-line interface (parser and the train/presets subcommands).

Subcommands register themselves through `add_cli(subparsers)` in the modules listed in CLI_MODULES;
each sets `func` on its parser. A ValueError anywhere (bad config, unknown run, ...) is printed as one
readable line and exits with status 2; no traceback for bad input.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

from samlab.config import PRESETS

CLI_MODULES = ["samlab.cli", "samlab.cli_runs", "samlab.cli_search"]  # modules with add_cli(subparsers); add yours here


def add_cli(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="train one run in this process, with a progress bar")
    train.add_argument("--preset", required=True, help=f"one of: {', '.join(sorted(PRESETS))}")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. --set optim.rho=0.1 (repeatable)")
    train.add_argument("--workdir", help="folder for checkpoints and snapshots (default: none kept)")
    train.add_argument("--resume", action="store_true", help="continue from WORKDIR/checkpoint.pt")
    train.add_argument("--json", action="store_true", help="print the final summary as JSON on stdout")
    train.add_argument("--nproc", type=int, default=1,
                       help="data-parallel processes on this machine (torchrun; see samlab.distributed)")
    train.add_argument("--sync-perturbation", action="store_true",
                       help="with --nproc: all-reduce the first gradient (SAM over the global batch) instead "
                            "of per-process perturbations (m-SAM with m = batch_size / nproc)")
    train.set_defaults(func=_train)
    presets = sub.add_parser("presets", help="list the named presets with their configs")
    presets.set_defaults(func=_presets)
    analyze = sub.add_parser(
        "analyze", help="run an analysis (hessian, landscape, stability, msharp) in this process"
    )
    analyze.add_argument("kind", help="the analysis kind: hessian, landscape, stability or msharp")
    analyze.add_argument("--set", dest="params", action="append", default=[], metavar="KEY=VALUE",
                         help="a parameter, e.g. --set checkpoint=data/runs/ID/checkpoint.pt --set k=5; "
                              "values are parsed as JSON where they can be")
    analyze.add_argument("--workdir", help="folder for resumable state (default: a temporary folder)")
    analyze.add_argument("--resume", action="store_true", help="continue from the state in WORKDIR")
    analyze.add_argument("--out", help="write the full result as JSON to this file and print only a short "
                                       "summary (the headline numbers and the path)")
    analyze.set_defaults(func=_analyze)


def _train(args: argparse.Namespace) -> int:
    from samlab.config import preset
    from samlab.devices import retain_freed_memory
    from samlab.reporting import ConsoleReporter
    from samlab.train import run

    if args.nproc != 1 or args.sync_perturbation:
        from samlab.distributed import launch

        return launch(args, args.nproc)
    retain_freed_memory()
    cfg = preset(args.preset, args.overrides)
    reporter = ConsoleReporter()
    result = run(cfg, reporter, workdir=args.workdir, resume=args.resume)
    if args.json:
        print(json.dumps(result.summary, sort_keys=True))
    else:
        s = result.summary
        print(f"{result.status}: {s['epochs']} epochs, {s['steps']} steps in {s['wall_time']:.1f}s on {s['device']}")
        for key in ("final_train_loss", "final_test_loss", "final_train_acc", "final_test_acc", "best_test_acc"):
            if s.get(key) is not None:
                print(f"  {key:18s} {s[key]:.6g}")
    return 0 if result.status == "completed" else 1


def _analyze(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from samlab import tasks
    from samlab.config import parse_assignment
    from samlab.devices import retain_freed_memory
    from samlab.reporting import ConsoleReporter

    if args.kind == "train":
        raise ValueError("kind: use `python -m samlab train` for training runs")
    retain_freed_memory()
    params = tasks.check_params(args.kind, dict(parse_assignment(item) for item in args.params))
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(args.workdir or scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        result = tasks.task_function(args.kind)(params, ConsoleReporter(), workdir, args.resume)
    text = json.dumps(result, sort_keys=True, default=str)
    if not args.out:
        print(text)
        return 0
    Path(args.out).write_text(text)
    for line in result_summary(result):
        print(line)
    print(f"full result ({len(text):,} bytes of JSON) written to {args.out}")
    return 0


# echoes of the request and solver diagnostics, not results
SUMMARY_SKIP = {"params", "key", "checkpoint", "done", "residuals", "n_hvp", "converged"}
SUMMARY_LINES = 16
SUMMARY_LIST = 8  # numeric lists up to this length are shown whole (e.g. the top-k eigenvalues)


def result_summary(result: Any, prefix: str = "") -> list[str]:
    """The headline numbers of an analysis result: its scalar fields and short numeric lists, one
    'dotted.key  value' line each (at most SUMMARY_LINES, then how many more); long arrays are left to
    the file."""
    lines = list(_summary_leaves(result, prefix))
    if len(lines) > SUMMARY_LINES:
        lines = [*lines[:SUMMARY_LINES], f"… {len(lines) - SUMMARY_LINES} more fields in the file"]
    return lines


def _summary_leaves(value: Any, key: str) -> Iterator[str]:
    if isinstance(value, dict):
        for name, item in value.items():
            if name not in SUMMARY_SKIP:
                yield from _summary_leaves(item, f"{key}.{name}" if key else str(name))
    elif isinstance(value, list):
        if 0 < len(value) <= SUMMARY_LIST and all(_is_number(v) for v in value):
            yield f"{key:28s} [{', '.join(_short(v) for v in value)}]"
    elif value is not None:
        yield f"{key:28s} {_short(value)}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    text = str(value)
    return text if len(text) <= 60 else f"{text[:57]}…"


def _presets(args: argparse.Namespace) -> int:
    for name, raw in sorted(PRESETS.items()):
        print(f"{name}: {json.dumps(raw, sort_keys=True)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m samlab", description="samlab: SAM and m-sharpness lab")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in CLI_MODULES:
        importlib.import_module(module).add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = args.func(args)
        sys.stdout.flush()  # inside the try: a pipe closed early fails here, not at interpreter exit
        return status
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _closed_pipe()


def _closed_pipe() -> int:
    """The reader of stdout went away (`runs list | head`): end quietly, as other command-line tools do.
    stdout is pointed at /dev/null so that the interpreter's final flush does not raise again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + 13  # the status of a process ended by SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
