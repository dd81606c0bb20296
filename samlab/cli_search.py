"""`python -m samlab search ...` (launch an adaptive search) and `python -m samlab searches ...` (follow it).

    search --preset NAME --ms 64,8,2 --rho 0.01:1 --trials 20 --seeds 0,1 [--lr A:B] [--wd A:B]
           [--parallel N] [--set k=v ...] [--name N] [--sampler-seed S] [--no-prune] [--wait] [--store URL]
        one Optuna study per m (ρ, and lr / weight decay when given, searched log-uniformly); prints the
        search id; --wait follows it and prints the best ρ per m at the end
    searches list | show ID [--trials] | cancel ID | resume ID
"""

from __future__ import annotations

import argparse
import math
import sys
import time

from samlab.cli_runs import _add_store, _parse_seeds, add_id_verbs


def add_cli(sub: argparse._SubParsersAction) -> None:
    launch = sub.add_parser("search", help="adaptive search of ρ per m (one Optuna study per m; detached)")
    launch.add_argument("--preset", required=True, help="a preset name (see `presets`)")
    launch.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a base config field, e.g. --set epochs=10 (repeatable)")
    launch.add_argument("--ms", required=True, help="comma-separated m values (m = the batch size is SAM)")
    launch.add_argument("--rho", required=True, help="ρ range LOW:HIGH, searched log-uniformly")
    launch.add_argument("--lr", default=None, help="also search the learning rate in LOW:HIGH (log-uniform)")
    launch.add_argument("--wd", default=None, help="also search the weight decay in LOW:HIGH (log-uniform)")
    launch.add_argument("--trials", type=int, required=True, help="trials per m (each: one run per seed)")
    launch.add_argument("--seeds", default="0", help="comma-separated training seeds of every trial")
    launch.add_argument("--parallel", type=int, default=2, help="trials in flight at once, over all m")
    launch.add_argument("--name", default=None, help="search name (default: '<preset> search')")
    launch.add_argument("--sampler-seed", type=int, default=0, help="seed of the TPE samplers")
    launch.add_argument("--no-prune", action="store_true", help="run every trial to its end")
    launch.add_argument("--wait", action="store_true", help="follow the search until it ends")
    _add_store(launch)
    launch.set_defaults(func=_search)

    searches = sub.add_parser("searches", help="list and control adaptive searches")
    verbs = searches.add_subparsers(dest="verb", required=True)
    verbs.add_parser("list", help="searches, newest first").set_defaults(func=_list)
    show = verbs.add_parser("show", help="best ρ per m so far (and every trial with --trials)")
    show.add_argument("search_id")
    show.add_argument("--trials", action="store_true")
    show.set_defaults(func=_show)
    add_id_verbs(verbs, "search_id", (("cancel", _cancel, "stop the search and its runs"),
                                      ("resume", _resume, "continue a cancelled, failed or driverless search")))
    for parser in verbs.choices.values():
        _add_store(parser)


def _parse_ms(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--ms: expected comma-separated integers, e.g. 64,8,2 (got {text!r})") from None


def _search(args: argparse.Namespace) -> int:
    from samlab.config import preset
    from samlab.runs import search as search_runs
    from samlab.search import SearchSpec, parse_range

    spec = SearchSpec(preset(args.preset, args.overrides), ms=_parse_ms(args.ms), rho=parse_range("--rho", args.rho),
                      lr=parse_range("--lr", args.lr), weight_decay=parse_range("--wd", args.wd),
                      trials=args.trials, seeds=_parse_seeds(args.seeds), parallel=args.parallel,
                      name=args.name or f"{args.preset} search", sampler_seed=args.sampler_seed,
                      prune=not args.no_prune)
    search_id = search_runs.submit(spec, store=args.store)
    print(search_id)
    if not args.wait:
        return 0
    while not (state := search_runs.progress(search_id, store=args.store))["done"]:
        print(f"\r{state['trials_finished']}/{state['trials_budget']} trials finished", end="", file=sys.stderr,
              flush=True)
        time.sleep(1.0)
    print(file=sys.stderr)
    _print_best(state)
    return 0 if state["status"] == "completed" else 1


def _print_best(state: dict) -> None:
    print(f"search {state['search_id']} ({state['name']}): {state['status']}, "
          f"{state['trials_finished']}/{state['trials_budget']} trials finished")
    for _, row in state["best"].iterrows():
        best = "no completed trial yet" if math.isnan(row["best_objective"]) else \
            f"best ρ {row['best_rho']:.4g} (trial {int(row['best_trial'])}): test acc {row['best_objective']:.4f}"
        print(f"  m={int(row['m']):<5d} {best}; {int(row['finished'])} finished, {int(row['pruned'])} pruned, "
              f"{int(row['running'])} running")
    if state["error"]:
        print(f"error: {state['error'].splitlines()[0]}")


def _list(args: argparse.Namespace) -> int:
    from samlab.runs.store import open_store

    rows = open_store(args.store).list_searches()
    for row in rows:
        created = row["created_at"].strftime("%Y-%m-%d %H:%M:%S") if row["created_at"] else ""
        print(f"{row['id']:12s}  {row['status']:9s}  {created:19s}  {row['name']}")
    if not rows:
        print("no searches")
    return 0


def _show(args: argparse.Namespace) -> int:
    from samlab.runs import search as search_runs

    state = search_runs.progress(args.search_id, store=args.store)
    _print_best(state)
    if args.trials:
        print(state["history"].to_string(index=False))
    return 0


def _cancel(args: argparse.Namespace) -> int:
    from samlab.runs import search as search_runs

    print(f"search cancelled; {search_runs.cancel(args.search_id, store=args.store)} run(s) asked to stop")
    return 0


def _resume(args: argparse.Namespace) -> int:
    from samlab.runs import search as search_runs

    print(f"driver started (pid {search_runs.resume(args.search_id, store=args.store)})")
    return 0
