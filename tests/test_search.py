"""Adaptive search: Optuna studies in the run store's database, trials as runs, pruning, resume.

Most tests drive the synthetic task of tests/search_tasks.py (a known optimum over ρ, seconds per
trial) through the real driver process, sweep workers and store; one runs a tiny real training study.
"""

from __future__ import annotations

import math
import os
import signal
import time

import optuna
import pytest

from samlab.config import preset
from samlab.runs import search as search_runs
from samlab.runs.executors import pid_alive
from samlab.runs.store import Store
from samlab.search import SearchSpec, best_by_m, epoch_means, parse_range, trial_history
from samlab.sweeps import aggregate, paired_differences
from tests import search_tasks
from tests.pg_fixtures import BACKENDS, store_on

SYNTHETIC = "synthetic=tests.search_tasks"


@pytest.fixture
def synthetic(monkeypatch):
    monkeypatch.setenv("SAMLAB_TASKS", SYNTHETIC)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("SAMLAB_FLUSH_S", "0.2")
    monkeypatch.setenv("SAMLAB_SEARCH_POLL_S", "0.2")
    monkeypatch.setenv("SEARCH_PROBE_SLEEP", "0")


def _spec(**overrides) -> SearchSpec:
    base = preset("digits-cnn-msharp", {"epochs": 4})
    fields = {"ms": [64, 4], "rho": (0.01, 1.0), "trials": 4, "seeds": [0], "parallel": 2, "kind": "synthetic",
              "prune": False, "name": "probe"} | overrides
    return SearchSpec(base, **fields)


def _study_trials(store: Store, search_id: str, m: int):
    study = optuna.load_study(study_name=f"{search_id}-m{m}", storage=search_runs.optuna_storage(store.url))
    return study.get_trials(deepcopy=False)


# -- spec --------------------------------------------------------------------------------------------------
def test_ranges_and_spec_are_validated():
    assert parse_range("--rho", "0.01:1") == (0.01, 1.0)
    assert parse_range("--lr", "") is None
    for bad in ("1:0.1", "0:1", "0.1", "a:b", "-1:1"):
        with pytest.raises(ValueError, match="--rho"):
            parse_range("--rho", bad)
    with pytest.raises(ValueError, match="ms: every m must divide batch_size=64"):
        _spec(ms=[64, 5]).validate()
    with pytest.raises(ValueError, match="seeds"):
        _spec(seeds=[]).validate()
    spec = _spec(lr=(0.01, 0.1)).validate()
    assert SearchSpec.from_dict(spec.to_dict()).to_dict() == spec.to_dict()
    configs = spec.trial_configs(4, {"rho": 0.3, "lr": 0.02})
    assert [(c.optim.method, c.optim.m, c.optim.rho, c.optim.lr) for c in configs] == [("msam", 4, 0.3, 0.02)]
    assert spec.trial_configs(64, {"rho": 0.3})[0].optim.method == "sam"  # m = the batch: plain SAM


def test_epoch_means_use_only_epochs_every_run_reached():
    import pandas as pd

    frame = pd.DataFrame({"run_id": ["a", "a", "a", "b", "b"], "step": [1, 2, 3, 1, 2],
                          "value": [0.2, 0.4, 0.6, 0.4, math.nan]})
    assert epoch_means(frame, ["a", "b"]) == {1: pytest.approx(0.3), 2: pytest.approx(0.4)}
    assert epoch_means(frame, ["a", "b", "c"]) == {}  # c has not reported yet


# -- the driver ----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_search_finds_the_known_optimum_and_every_trial_is_a_run(synthetic, tmp_path, backend):
    trials = 10
    with store_on(backend, tmp_path) as store:
        spec = _spec(trials=trials, random_trials=4)
        search_id = search_runs.submit(spec, store=store)
        state = search_runs.wait(search_id, store=store, timeout=600)
        assert state["status"] == "completed", state["error"]
        history = state["history"]
        # an equal-budget log grid over the range is within half its spacing of the optimum
        resolution = math.log(spec.rho[1] / spec.rho[0]) / (trials - 1) / 2
        for m in spec.ms:
            trials_m = history[history["m"] == m]
            assert sorted(trials_m["trial"]) == list(range(trials))
            best = trials_m.loc[trials_m["objective"].idxmax()]
            assert abs(math.log(best["rho"] / search_tasks.optimum(m))) <= resolution
            # the study in the same database holds the same trials and objectives as the runs
            frozen = _study_trials(store, search_id, m)
            assert [t.state for t in frozen] == [optuna.trial.TrialState.COMPLETE] * trials
            by_number = trials_m.set_index("trial")
            for t in frozen:
                assert t.params["rho"] == pytest.approx(by_number.at[t.number, "rho"])
                assert t.value == pytest.approx(by_number.at[t.number, "objective"])
                assert t.value == pytest.approx(search_tasks.accuracy(t.params["rho"], m))
        runs = store.list_runs(group=search_id, limit=1000)
        assert len(runs) == trials * len(spec.ms) and {r["status"] for r in runs} == {"completed"}
        assert {(r["study"], r["trial"]) for r in runs} == {
            (f"{search_id}-m{m}", n) for m in spec.ms for n in range(trials)}
        assert store.get_search(search_id)["status"] == "completed"


@pytest.mark.slow
def test_a_hopeless_trial_is_pruned_and_its_run_ends_pruned(synthetic, tmp_path, monkeypatch):
    monkeypatch.setenv("SEARCH_PROBE_SLEEP", "0.4")
    store = Store(f"sqlite:///{tmp_path / 'samlab.db'}")
    # one m, trials one after another: the range's far end is ~60x from the optimum (accuracy ~3e-4)
    spec = SearchSpec(preset("digits-cnn-msharp", {"epochs": 8}), ms=[64], rho=(0.001, 20.0), trials=8, seeds=[0],
                      parallel=1, kind="synthetic", prune=True, prune_startup=2, prune_warmup=1, random_trials=8,
                      sampler_seed=3, name="prune")
    search_id = search_runs.submit(spec, store=store)
    state = search_runs.wait(search_id, store=store, timeout=600)
    assert state["status"] == "completed", state["error"]
    runs = store.list_runs(group=search_id, limit=100)
    pruned = [r for r in runs if r["status"] == "pruned"]
    assert pruned, [(r["trial"], r["params"]["optim"]["rho"], r["status"]) for r in runs]
    frozen = {t.number: t for t in _study_trials(store, search_id, 64)}
    for run in runs:
        state_of_trial = frozen[run["trial"]].state
        if run["status"] == "pruned":
            assert state_of_trial == optuna.trial.TrialState.PRUNED
            assert run["stop_reason"] == "pruned" and run["finished_at"] is not None
            # stopped early: fewer epochs recorded than the config asks for
            epochs = store.metrics([run["id"]], names=["test_acc"], kind="epoch")
            assert len(epochs) < 8
        else:
            assert run["status"] == "completed" and state_of_trial == optuna.trial.TrialState.COMPLETE
    # the pruned trial was below the median of the earlier trials at its last reported epoch
    table = trial_history(store, search_id)
    assert set(table["status"]) <= {"completed", "pruned"} and (table["status"] == "pruned").sum() == len(pruned)
    assert best_by_m(table).iloc[0]["pruned"] == len(pruned)


@pytest.mark.slow
def test_resuming_after_killing_the_driver_repeats_no_finished_trial(synthetic, tmp_path, monkeypatch):
    monkeypatch.setenv("SEARCH_PROBE_SLEEP", "0.3")
    store = Store(f"sqlite:///{tmp_path / 'samlab.db'}")
    spec = _spec(ms=[64], trials=6, parallel=2)
    search_id = search_runs.submit(spec, store=store)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        finished = [r for r in store.list_runs(group=search_id, limit=100) if r["status"] == "completed"]
        if len(finished) >= 2:
            break
        time.sleep(0.2)
    driver = store.get_search(search_id)["pid"]
    os.kill(driver, signal.SIGKILL)
    while pid_alive(driver):
        time.sleep(0.05)
    before = {r["id"]: (r["trial"], r["status"]) for r in store.list_runs(group=search_id, limit=100)}
    done_before = {trial for trial, status in before.values() if status == "completed"}
    assert len(done_before) >= 2 and store.get_search(search_id)["status"] == "running"
    assert not search_runs.progress(search_id, store=store)["driver_alive"]

    search_runs.resume(search_id, store=store)
    state = search_runs.wait(search_id, store=store, timeout=600)
    assert state["status"] == "completed", state["error"]
    runs = store.list_runs(group=search_id, limit=100)
    # every run from before is still there, and no trial number has a second run
    assert set(before) <= {r["id"] for r in runs}
    trials = [r["trial"] for r in runs]
    assert len(trials) == len(set(trials))
    frozen = _study_trials(store, search_id, 64)
    complete = [t.number for t in frozen if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == spec.trials and done_before <= set(complete)
    assert set(complete) <= set(trials)  # every counted trial has its run
    # trials asked but never queued when the driver died are failed, not counted
    assert all(t.user_attrs.get(search_runs.OUTCOME) == "orphan" for t in frozen
               if t.state == optuna.trial.TrialState.FAIL)


@pytest.mark.slow
def test_cancel_stops_the_search_and_its_runs(synthetic, tmp_path, monkeypatch):
    monkeypatch.setenv("SEARCH_PROBE_SLEEP", "0.5")
    store = Store(f"sqlite:///{tmp_path / 'samlab.db'}")
    search_id = search_runs.submit(_spec(ms=[64], trials=20, parallel=2), store=store)
    deadline = time.monotonic() + 300
    while not store.list_runs(status="running", group=search_id, limit=1) and time.monotonic() < deadline:
        time.sleep(0.2)
    search_runs.cancel(search_id, store=store)
    state = search_runs.wait(search_id, store=store, timeout=300)
    assert state["status"] == "cancelled"
    deadline = time.monotonic() + 120
    while store.list_runs(status=["queued", "running"], group=search_id, limit=1) and time.monotonic() < deadline:
        time.sleep(0.2)
    statuses = {r["status"] for r in store.list_runs(group=search_id, limit=100)}
    assert statuses <= {"completed", "cancelled"} and "cancelled" in statuses


@pytest.mark.slow
def test_a_tiny_real_study_completes_through_the_store(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("SAMLAB_SEARCH_POLL_S", "0.3")
    store = Store(f"sqlite:///{tmp_path / 'samlab.db'}")
    base = preset("digits-cnn-msharp", {"epochs": 2, "data.n_train": 128})
    spec = SearchSpec(base, ms=[64, 8], rho=(0.05, 0.5), trials=2, seeds=[0], parallel=2, prune=False,
                      name="tiny", workers=2)
    search_id = search_runs.submit(spec, store=store)
    state = search_runs.wait(search_id, store=store, timeout=900)
    assert state["status"] == "completed", state["error"]
    runs = store.list_runs(group=search_id, limit=100)
    assert len(runs) == 4 and {r["status"] for r in runs} == {"completed"} and {r["kind"] for r in runs} == {"train"}
    history = state["history"]
    for run in runs:
        row = history[(history["m"] == (run["params"]["optim"]["m"] or 64)) & (history["trial"] == run["trial"])]
        assert row["objective"].item() == pytest.approx(run["summary"]["final_test_acc"])
    # the grid sweeps' tables read the search's group as it is: best ρ per m and the paired comparison
    tables = aggregate(store, search_id)
    assert sorted(tables.best_by_m["m"]) == [8.0, 64.0]
    assert set(tables.best_by_m["rhos_tried"]) == {2}
    paired = paired_differences(tables)
    assert list(paired["n_pairs"]) == [1, 1] and paired.iloc[0]["diff_mean"] == 0.0


# -- the Sweeps page in adaptive-search mode ---------------------------------------------------------------
def _recorded_search(store: Store) -> str:
    """A search recorded as if driven: m=64 and m=8, three trials each, the last of m=8 pruned."""
    from samlab.runs import jobs

    spec = _spec(ms=[64, 8], trials=3, seeds=[0, 1], kind="train").validate()
    store.create_search("gsearch00001", "probe", spec.to_dict())
    for m in spec.ms:
        for number, rho in enumerate((0.05, 0.2, 0.8)):
            configs = spec.trial_configs(m, {"rho": rho})
            specs = jobs.member_specs(configs, "probe", "gsearch00001", study=f"gsearch00001-m{m}", trial=number)
            for run_id, cfg in zip(store.create_runs(specs), configs):
                assert store.claim(run_id, "test-host", "test")
                acc = search_tasks.accuracy(rho, m) * 0.9 + 0.01 * cfg.seed
                store.flush(run_id, [("epoch", 1, "test_acc", acc / 2, 0.0)])
                if m == 8 and number == 2:
                    store.request_cancel(run_id, "pruned")
                    store.finish_run(run_id, store.stopped_status(run_id))
                else:
                    store.finish_run(run_id, "completed", summary={"final_test_acc": acc, "final_train_acc": 1.0,
                                                                   "generalization_gap": 1.0 - acc})
    return "gsearch00001"


def _sweeps_page(mode: str = "adaptive search"):
    from streamlit.testing.v1 import AppTest

    from tests.test_lesson_page import ROOT, SWEEPS, TIMEOUT

    at = AppTest.from_file(str(ROOT / SWEEPS), default_timeout=TIMEOUT)
    at.query_params["mode"] = mode
    at.run()
    assert not at.exception, "; ".join(str(e.value) for e in at.exception)
    return at


def test_sweeps_page_shows_a_search_live(store_env):
    search_id = _recorded_search(store_env)
    at = _sweeps_page()
    best = at.dataframe[0].value
    assert list(best["m"]) == [64, 8] and list(best["best ρ"]) == [0.2, 0.05]
    assert list(best["pruned"]) == [0, 1] and list(best["trials finished"]) == [3, 3]
    assert any(search_id in str(s.options) for s in at.selectbox)
    # the grid sweeps' views of the same group: the best-ρ curve and the paired comparison
    assert any(h.value == "Accuracy against m (best ρ per m)" for h in at.subheader)
    assert any("paired" in m.value.lower() or "seed" in m.value.lower() for m in at.markdown)
    assert any(b.label == "Resume the search" for b in at.button)  # no driver is running for it
    grid = _sweeps_page("grid")  # a search is not listed among the grid sweeps
    assert any("No sweeps yet" in i.value for i in grid.info)


def test_sweeps_page_launches_a_search(store_env, monkeypatch):
    started = []
    monkeypatch.setattr(search_runs, "start_driver", lambda search_id, store=None: started.append(search_id))
    at = _sweeps_page()
    at.text_input(key="search.ms").set_value("64, 16")
    at.text_input(key="search.rho").set_value("0.02:0.5")
    at.button(key="search.launch").click().run()
    assert not at.exception
    (row,) = store_env.list_searches()
    assert started == [row["id"]]
    spec = SearchSpec.from_dict(store_env.get_search(row["id"])["spec"])
    assert spec.ms == [64, 16] and spec.rho == (0.02, 0.5) and spec.trials == 12


def test_store_records_pruned_runs(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'samlab.db'}")
    queued, running = store.create_runs([{"kind": "train", "params": {}, "study": "s", "trial": 0}] * 2)
    assert store.request_cancel(queued, "pruned") == "cancelled"
    assert store.get_run(queued)["status"] == "pruned"
    assert store.claim(running, "h", "test")
    assert store.request_cancel(running, "pruned") == "requested"
    assert store.request_cancel(running) == "requested"  # a later plain cancel keeps the first reason
    assert store.stopped_status(running) == "pruned"
    assert store.count_by_status()["pruned"] == 1
    with pytest.raises(ValueError, match="reason"):
        store.request_cancel(running, "bored")
    assert [r["trial"] for r in store.trial_runs("s")] == [0, 0]
