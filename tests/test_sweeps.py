"""Sweeps: grid expansion, aggregation against hand-computed statistics, and a tiny sweep through the store."""

from __future__ import annotations

import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from samlab.config import RunConfig
from samlab.runs.store import Store
from samlab.runs.sweeps import progress
from samlab.sweeps import SweepSpec, aggregate, sweep_configs

REPO = Path(__file__).resolve().parents[1]


def tiny_base() -> RunConfig:
    return RunConfig.from_dict({
        "data": {"name": "digits", "n_train": 64, "n_test": 64},
        "model": {"name": "mlp", "width": 8, "depth": 1},
        "optim": {"method": "sgd", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0},
        "schedule": {"name": "constant"},
        "epochs": 1, "batch_size": 16, "device": "cpu", "checkpoint_every": 0,
    })


def test_grid_expands_methods_ms_rhos_and_seeds():
    spec = SweepSpec(tiny_base(), ms=[16, 4, 2], rhos=[0.05, 0.1], seeds=[0, 1, 2],
                     methods=["sgd", "sam", "msam", "nsam", "rwsam"], lam=2.0, name="grid")
    configs = sweep_configs(spec)
    by_method = {}
    for cfg in configs:
        by_method.setdefault(cfg.optim.method, []).append(cfg)
    assert len(by_method["sgd"]) == 3
    assert len(by_method["sam"]) == 2 * 3
    assert len(by_method["msam"]) == 2 * 2 * 3  # m = 16 is the batch: plain SAM stands for it
    assert {c.optim.m for c in by_method["msam"]} == {4, 2}
    assert {c.optim.lam for c in by_method["rwsam"]} == {2.0}
    assert all(c.name == "grid" for c in configs)
    assert [c.seed for c in configs[:3]] == [0, 1, 2]


@pytest.mark.parametrize(
    ("change", "field"),
    [({"ms": [5]}, "ms:"), ({"rhos": [0.0]}, "rhos:"), ({"seeds": []}, "seeds:"),
     ({"methods": ["adam"]}, "methods:"), ({"methods": ["rwsam"], "lam": 0.0}, "lam:")],
)
def test_bad_grids_name_the_field(change, field):
    args = {"ms": [4], "rhos": [0.1], "seeds": [0], "methods": ["sgd", "msam"]} | change
    with pytest.raises(ValueError, match=field):
        sweep_configs(SweepSpec(tiny_base(), **args))


def fake_finished_sweep(store: Store, accuracies: dict[tuple[str, int | None, float | None], list[float]]) -> str:
    """Runs recorded as finished with given test accuracies (train accuracy = 1.0), without training."""
    specs = []
    for (method, m, rho), accs in accuracies.items():
        for seed, acc in enumerate(accs):
            overrides = {"optim.method": method, "optim.m": m, "seed": seed}
            if rho is not None:
                overrides["optim.rho"] = rho
            cfg = tiny_base().with_overrides(overrides).validate()
            specs.append(({"kind": "train", "params": cfg.to_dict(), "group_id": "gfake"}, acc))
    ids = store.create_runs([spec for spec, _ in specs])
    for run_id, (_, acc) in zip(ids, specs):
        assert store.claim(run_id, "host", "test")
        status = "diverged" if math.isnan(acc) else "completed"
        summary = {"final_test_acc": None if math.isnan(acc) else acc, "final_train_acc": 1.0,
                   "generalization_gap": None if math.isnan(acc) else 1.0 - acc}
        store.finish_run(run_id, status, summary=summary)
    return "gfake"


def test_aggregate_matches_hand_computed_statistics(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'runs.db'}")
    accuracies = {
        ("sam", None, 0.05): [0.80, 0.82, 0.84],
        ("sam", None, 0.1): [0.83, 0.85, 0.87],
        ("msam", 4, 0.05): [0.90, 0.88, float("nan")],
        ("msam", 4, 0.1): [0.86, 0.86, 0.86],
        ("sgd", None, None): [0.70, 0.74, 0.72],
        ("nsam", None, 0.05): [0.71, 0.73, 0.72],
    }
    group = fake_finished_sweep(store, accuracies)
    tables = aggregate(store, group)
    assert len(tables.runs) == 18 and tables.batch_size == 16
    heat = tables.heatmap.set_index(["m", "rho"])
    assert len(heat) == 4
    assert heat.loc[(16.0, 0.1), "test_acc_mean"] == pytest.approx(0.85)
    assert heat.loc[(16.0, 0.1), "test_acc_std"] == pytest.approx(statistics.stdev([0.83, 0.85, 0.87]))
    assert heat.loc[(4.0, 0.05), "n_seeds"] == 2 and heat.loc[(4.0, 0.05), "n_not_completed"] == 1
    best = tables.best_by_m.set_index("m")
    assert best.loc[16.0, "rho"] == 0.1 and best.loc[16.0, "test_acc_mean"] == pytest.approx(0.85)
    assert best.loc[4.0, "rho"] == 0.05 and best.loc[4.0, "test_acc_mean"] == pytest.approx(0.89)
    assert best.loc[4.0, "gap_mean"] == pytest.approx(0.11)
    assert best.loc[4.0, "rhos_tried"] == 2
    refs = tables.references.set_index("method")
    assert refs.loc["sgd", "test_acc_mean"] == pytest.approx(0.72) and refs.loc["sgd", "n_seeds"] == 3
    assert math.isnan(refs.loc["sgd", "rho"])
    assert refs.loc["nsam", "test_acc_std"] == pytest.approx(0.01)
    state = progress(group, store=store)
    assert state["done"] and state["counts"]["completed"] == 17 and state["counts"]["diverged"] == 1


def test_unknown_group_is_a_value_error(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'runs.db'}")
    with pytest.raises(ValueError, match="group_id"):
        aggregate(store, "nope")


def test_a_tiny_sweep_runs_through_the_store_in_a_sweep_worker(tmp_path):
    from samlab.runs import jobs

    url = f"sqlite:///{tmp_path / 'runs.db'}"
    store = Store(url)
    spec = SweepSpec(tiny_base(), ms=[16, 4], rhos=[0.05, 0.2], seeds=[0, 1], methods=["sam", "msam"], name="tiny")
    group = jobs.submit_sweep(sweep_configs(spec), spec.name, store=store, start=False)
    assert progress(group, store=store)["counts"]["queued"] == 8
    done = subprocess.run([sys.executable, "-m", "samlab.runs.sweeps", "work", group, "--store", url], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    state = progress(group, store=store)
    assert state["done"] and state["counts"]["completed"] == 8, state
    tables = aggregate(store, group)
    assert tables.heatmap.shape[0] == 4 and set(tables.heatmap["n_seeds"]) == {2}
    assert set(tables.best_by_m["m"]) == {16.0, 4.0}
    # the heatmap is the mean of what each run recorded in its own summary and metrics
    members = store.list_runs(group=group, limit=1000)
    cell = [r for r in members if r["params"]["optim"]["method"] == "msam" and r["params"]["optim"]["rho"] == 0.2]
    accs = [store.get_run(r["id"])["summary"]["final_test_acc"] for r in cell]
    heat = tables.heatmap.set_index(["m", "rho"])
    assert heat.loc[(4.0, 0.2), "test_acc_mean"] == pytest.approx(sum(accs) / 2)
    epoch_rows = store.metrics([cell[0]["id"]], names=["test_acc"], kind="epoch")
    assert len(epoch_rows) == 1
    assert {r["executor"] for r in members} == {"sweep"}


def test_no_local_sweep_workers_are_started_when_runs_go_to_ray(monkeypatch, tmp_path):
    from samlab.runs import sweeps as sweeps_module

    monkeypatch.setenv("SAMLAB_EXECUTOR", "ray")
    with pytest.raises(ValueError, match="workers: with SAMLAB_EXECUTOR=ray"):
        sweeps_module.start_workers("g-none", store=f"sqlite:///{tmp_path}/s.db")


def test_per_m_rho_grids_replace_the_shared_grid_for_their_m_only():
    spec = SweepSpec(tiny_base(), ms=[16, 4, 2], rhos=[0.3], seeds=[0, 1], methods=["sgd", "sam", "msam", "nsam"],
                     rhos_by_m={16: [0.2, 0.4], 2: [0.025, 0.05, 0.1]})
    grid = {}
    for cfg in sweep_configs(spec):
        m = cfg.optim.m if cfg.optim.method == "msam" else cfg.optim.method
        grid.setdefault(m, set()).add(cfg.optim.rho)
    assert grid == {"sgd": {0.05}, "sam": {0.2, 0.4}, 4: {0.3}, 2: {0.025, 0.05, 0.1}, "nsam": {0.3}}
    assert len(sweep_configs(spec)) == 2 * (1 + 2 + 1 + 3 + 1)
    # every swept m has its own grid: the shared grid may then be empty
    own = SweepSpec(tiny_base(), ms=[4], rhos=[], seeds=[0], methods=["sam", "msam"],
                    rhos_by_m={16: [0.2], 4: [0.1]})
    assert [c.optim.rho for c in sweep_configs(own)] == [0.2, 0.1]


@pytest.mark.parametrize(
    ("rhos_by_m", "rhos", "field"),
    [({8: [0.1]}, [0.1], "rhos_by_m: m=8 is not swept"), ({4: []}, [0.1], r"rhos_by_m\[4\]"),
     ({4: [-0.1]}, [0.1], r"rhos_by_m\[4\]"), ({4: [0.1]}, [], "rhos:")],
)
def test_bad_per_m_grids_name_the_field(rhos_by_m, rhos, field):
    spec = SweepSpec(tiny_base(), ms=[4], rhos=rhos, seeds=[0], methods=["sam", "msam"], rhos_by_m=rhos_by_m)
    with pytest.raises(ValueError, match=field):
        sweep_configs(spec)


def test_paired_differences_subtract_the_largest_m_seed_by_seed(tmp_path):
    from samlab.sweeps import paired_differences

    store = Store(f"sqlite:///{tmp_path / 'runs.db'}")
    sam = [0.80, 0.90, 0.85]
    m4 = [0.82, 0.93, float("nan")]  # seed 2 diverged: only two pairs
    m2 = [0.81, 0.89, 0.88]
    group = fake_finished_sweep(store, {
        ("sam", None, 0.1): sam, ("sam", None, 0.2): [0.70, 0.70, 0.70],
        ("msam", 4, 0.05): m4, ("msam", 2, 0.05): m2, ("msam", 2, 0.1): [0.5, 0.5, 0.5],
        ("sgd", None, None): [0.6, 0.6, 0.6],
    })
    table = paired_differences(aggregate(store, group))
    assert list(table["method"]) == ["sam", "msam", "msam", "sgd"]
    sgd = table[table["method"] == "sgd"].iloc[0]
    assert math.isnan(sgd["m"]) and sgd["diff_mean"] == pytest.approx(statistics.mean([-0.2, -0.3, -0.25]))
    assert sgd["n_better"] == 0 and sgd["n_pairs"] == 3
    paired = table.dropna(subset=["m"]).set_index("m")
    assert list(paired.index) == [16.0, 4.0, 2.0]
    assert set(paired["reference_m"]) == {16.0} and set(paired["reference_rho"]) == {0.1}
    assert paired.loc[16.0, "diff_mean"] == 0.0 and paired.loc[16.0, "n_pairs"] == 3
    d4 = [m4[0] - sam[0], m4[1] - sam[1]]
    assert paired.loc[4.0, "diff_mean"] == pytest.approx(statistics.mean(d4))
    assert paired.loc[4.0, "diff_std"] == pytest.approx(statistics.stdev(d4))
    assert paired.loc[4.0, "n_pairs"] == 2 and paired.loc[4.0, "n_better"] == 2
    d2 = [a - b for a, b in zip(m2, sam)]
    assert paired.loc[2.0, "rho"] == 0.05 and paired.loc[2.0, "diff_mean"] == pytest.approx(statistics.mean(d2))
    assert paired.loc[2.0, "diff_std"] == pytest.approx(statistics.stdev(d2)) and paired.loc[2.0, "n_better"] == 2
