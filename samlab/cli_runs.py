"""`python -m samlab submit ...` and `python -m samlab runs list|show|cancel|resume|logs|delete ...`.

    submit --preset NAME [--set k=v ...] [--seeds 0,1,2] [--name N] [--wait] [--store URL]
        one run, or a sweep (group) with one run per seed; prints the run ids (and the group id)
    runs list [--status S] [--kind K] [--group G] [--text T] [--limit N]
    runs show ID [--json]      details, summary / result and the last epoch metrics
    runs cancel ID | runs resume ID | runs delete ID [--keep-files]
    runs logs ID [-f]          the run's log; -f follows it until the run ends
Every subcommand takes --store URL (default: SAMLAB_STORE, else data/runs/samlab.db). Bad input is one
line on stderr and exit status 2 (samlab.cli prints ValueErrors), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TextIO

# the run store (SQLAlchemy) and the job layer are imported inside the commands that use them: building
# the parser, which every `python -m samlab` command does, then costs neither


def _add_store(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", default=None, help="store URL (default: SAMLAB_STORE or data/runs/samlab.db)")


def add_cli(sub: argparse._SubParsersAction) -> None:
    submit = sub.add_parser("submit", help="queue background training runs (detached; survives this shell)")
    submit.add_argument("--preset", required=True, help="a preset name (see `presets`)")
    submit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set optim.rho=0.1 (repeatable)")
    submit.add_argument("--seeds", default=None, help="comma-separated seeds: one run per seed, as a sweep")
    submit.add_argument("--name", default=None, help="run or sweep name")
    submit.add_argument("--wait", action="store_true", help="block until the runs end; exit 1 unless all completed")
    _add_store(submit)
    submit.set_defaults(func=_submit)

    runs = sub.add_parser("runs", help="list and control background runs")
    verbs = runs.add_subparsers(dest="verb", required=True)
    listing = verbs.add_parser("list", help="runs, newest first")
    listing.add_argument("--status", action="append", default=None)
    listing.add_argument("--kind", default=None)
    listing.add_argument("--group", default=None)
    listing.add_argument("--text", default=None)
    listing.add_argument("--limit", type=int, default=50)
    listing.set_defaults(func=_list)
    show = verbs.add_parser("show", help="one run in detail")
    show.add_argument("run_id")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=_show)
    add_id_verbs(verbs, "run_id", (("cancel", _cancel, "stop a run gracefully (queued: at once)"),
                                   ("resume", _resume, "continue a cancelled or failed run from its checkpoint")))
    logs = verbs.add_parser("logs", help="print a run's log")
    logs.add_argument("run_id")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing until the run ends")
    logs.set_defaults(func=_logs)
    delete = verbs.add_parser("delete", help="delete a run's rows and its folder")
    delete.add_argument("run_id")
    delete.add_argument("--keep-files", action="store_true")
    delete.set_defaults(func=_delete)
    for parser in (listing, show, logs, delete, *[verbs.choices[v] for v in ("cancel", "resume")]):
        _add_store(parser)


def add_id_verbs(verbs: argparse._SubParsersAction, id_name: str, items) -> None:
    """Subcommands `VERB ID` from (verb, func, help) items."""
    for verb, func, text in items:
        parser = verbs.add_parser(verb, help=text)
        parser.add_argument(id_name)
        parser.set_defaults(func=func)


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--seeds: expected comma-separated integers, e.g. 0,1,2 (got {text!r})") from None
    if not seeds:
        raise ValueError("--seeds: give at least one seed")
    return seeds


def _submit(args: argparse.Namespace) -> int:
    from samlab.config import preset
    from samlab.runs import jobs
    from samlab.runs.store import open_store

    cfg = preset(args.preset, args.overrides)
    if args.seeds is None:
        ids = [jobs.submit(cfg, name=args.name, store=args.store)]
        print(ids[0])
    else:
        configs = [cfg.with_overrides({"seed": seed}) for seed in _parse_seeds(args.seeds)]
        group = jobs.submit_sweep(configs, args.name or args.preset, store=args.store)
        ids = [r["id"] for r in open_store(args.store).list_runs(group=group, limit=100_000)]
        print(f"group {group}")
        for run_id in reversed(ids):
            print(run_id)
    if not args.wait:
        return 0
    statuses = _wait_with_progress(ids, args.store)
    return 0 if all(s == "completed" for s in statuses.values()) else 1


def _wait_with_progress(ids: list[str], store_url: str | None, stream: TextIO | None = None) -> dict[str, str]:
    """Poll the runs until all have ended: a progress bar redrawn in place on a terminal, else one line
    each time the number finished or the progress (in steps of PROGRESS_STEP) changes."""
    from samlab.runs.store import open_store

    store = open_store(store_url)
    stream = stream or sys.stderr
    tty = stream.isatty()
    last = None
    while True:
        runs = [store.get_run(run_id) for run_id in ids]
        done, fraction = wait_progress(runs)
        if tty:
            print(f"\r{progress_bar(done, len(runs), fraction)}", end="", file=stream, flush=True)
        elif (done, int(fraction / PROGRESS_STEP)) != last:
            last = (done, int(fraction / PROGRESS_STEP))
            print(f"{done}/{len(runs)} finished, {100 * fraction:.0f}%", file=stream, flush=True)
        if done == len(runs):
            if tty:
                print(file=stream)
            for r in runs:
                print(f"{r['id']} {r['status']}" + (f": {r['error'].splitlines()[0]}" if r["error"] else ""))
            return {r["id"]: r["status"] for r in runs}
        time.sleep(0.5)


PROGRESS_STEP = 0.1  # without a terminal, a new line at most every 10% (and at every finished run)
BAR_WIDTH = 30


def wait_progress(runs: list[dict]) -> tuple[int, float]:
    """How many runs have ended, and the mean progress (an ended run counts as 1)."""
    from samlab.runs.store import FINAL

    done = sum(r["status"] in FINAL for r in runs)
    mean = sum(1.0 if r["status"] in FINAL else min(max(r["progress"] or 0.0, 0.0), 1.0) for r in runs) / len(runs)
    return done, mean


def progress_bar(done: int, total: int, fraction: float) -> str:
    """'[##########····················]  33.3%  1/3 finished' for a terminal."""
    filled = round(BAR_WIDTH * fraction)
    return f"[{'#' * filled}{'·' * (BAR_WIDTH - filled)}] {100 * fraction:5.1f}%  {done}/{total} finished"


def _list(args: argparse.Namespace) -> int:
    from samlab.runs.store import open_store

    store = open_store(args.store)
    rows = store.list_runs(status=args.status, kind=args.kind, group=args.group, text=args.text,
                           limit=args.limit)
    print(f"{'id':12s}  {'kind':9s} {'status':9s} {'progress':>8s}  {'created (UTC)':19s}  name")
    for r in rows:
        progress = "" if r["progress"] is None else f"{100 * r['progress']:.0f}%"
        created = r["created_at"].strftime("%Y-%m-%d %H:%M:%S") if r["created_at"] else ""
        print(f"{r['id']:12s}  {r['kind']:9s} {r['status']:9s} {progress:>8s}  {created:19s}  {r['name']}")
    counts = store.count_by_status(kind=args.kind, group=args.group, text=args.text)
    print(", ".join(f"{n} {status}" for status, n in counts.items() if n) or "no runs")
    return 0


def _show(args: argparse.Namespace) -> int:
    from samlab.runs.store import open_store

    store = open_store(args.store)
    run = store.get_run(args.run_id)
    run["last_epoch_metrics"] = store.latest_metrics([run["id"]]).get(run["id"], {})
    run["artifacts"] = {a["name"]: a["path"] for a in store.artifacts(run["id"])}
    if args.json:
        print(json.dumps(run, default=str, sort_keys=True, indent=2))
        return 0
    for key in ("id", "kind", "name", "status", "group_id", "study", "trial", "stop_reason", "created_at", "started_at", "finished_at",
                "heartbeat_at", "host", "pid", "device", "progress", "progress_message", "workdir",
                "log_path", "checkpoint_path"):
        if run.get(key) is not None:
            print(f"{key:17s} {run[key]}")
    for key in ("summary", "result", "last_epoch_metrics", "artifacts", "params"):
        if run.get(key):
            print(f"{key}:\n  {json.dumps(run[key], sort_keys=True, default=str)}")
    if run["error"]:
        print(f"error:\n{run['error']}")
    return 0


def _cancel(args: argparse.Namespace) -> int:
    from samlab.runs import jobs

    outcome = jobs.cancel(args.run_id, store=args.store)
    print("cancelled" if outcome == "cancelled" else "stop requested (the run checkpoints, then ends)")
    return 0


def _resume(args: argparse.Namespace) -> int:
    from samlab.runs import jobs

    print(f"queued {jobs.resume(args.run_id, store=args.store)} to resume")
    return 0


def _logs(args: argparse.Namespace) -> int:
    from samlab.runs.store import FINAL, open_store

    store = open_store(args.store)
    run = store.get_run(args.run_id)
    path = Path(run["log_path"])
    position = 0
    while True:
        if path.is_file():
            with open(path, "rb") as f:
                f.seek(position)
                chunk = f.read()
                position = f.tell()
            sys.stdout.write(chunk.decode("utf-8", "replace"))
            sys.stdout.flush()
        elif not args.follow:
            raise ValueError(f"run_id: run {run['id']} has no log at {path} yet (status {run['status']})")
        if not args.follow or store.get_run(run["id"])["status"] in FINAL and position >= _size(path):
            return 0
        time.sleep(0.5)


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def _delete(args: argparse.Namespace) -> int:
    from samlab.runs import jobs

    jobs.delete(args.run_id, store=args.store, files=not args.keep_files)
    print("deleted")
    return 0
