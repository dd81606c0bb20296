"""The m-sharpness lesson and the Sweeps page render with AppTest, with and without a finished sweep."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from samlab.runs import jobs
from samlab.runs.store import Store
from samlab.sweeps import CONTROL_SWEEP_NAME, LESSON_SWEEP_NAME, control_spec, lesson_spec, sweep_configs

ROOT = Path(__file__).resolve().parent.parent
LESSON = "pages/6_Lesson_m-sharpness.py"
SWEEPS = "pages/5_Sweeps.py"
TIMEOUT = 120


SEEDS = (4, 5, 6)


def finished_lesson_sweep(store: Store, seeds=SEEDS) -> str:
    """The lesson's ReLU-network grid recorded as finished (test loss falling as m falls, with a per-seed
    wobble of known size), without training."""
    configs = sweep_configs(lesson_spec(seeds=seeds))
    group = jobs.submit_sweep(configs, LESSON_SWEEP_NAME, store=store, start=False)
    for run in store.list_runs(group=group, limit=10_000):
        optim, seed = run["params"]["optim"], run["params"]["seed"]
        m = optim["m"] or run["params"]["batch_size"]
        loss = 0.034 if optim["method"] in ("sgd", "rwsam") else 0.026 + 0.001 * m ** 0.5
        loss += 0.001 * seed + (0.0002 * (seed - 5) if m == 6 else 0.0)
        assert store.claim(run["id"], "test-host", "test")
        store.finish_run(run["id"], "completed", summary={"final_test_loss": loss, "final_train_loss": 0.01,
                                                          "final_test_acc": None})
    return group


def finished_control_sweep(store: Store, seeds=SEEDS) -> str:
    configs = sweep_configs(control_spec(seeds=seeds))
    group = jobs.submit_sweep(configs, CONTROL_SWEEP_NAME, store=store, start=False)
    for run in store.list_runs(group=group, limit=10_000):
        optim, seed = run["params"]["optim"], run["params"]["seed"]
        acc = {"sam": 0.80, "msam": 0.81, "ghostbn": 0.805, "rwsam": 0.79}[optim["method"]] + 0.01 * seed
        assert store.claim(run["id"], "test-host", "test")
        store.finish_run(run["id"], "completed", summary={"final_test_acc": acc, "final_train_acc": 0.9,
                                                          "generalization_gap": 0.9 - acc})
    return group


def app(page: str) -> AppTest:
    at = AppTest.from_file(str(ROOT / page), default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, "; ".join(str(e.value) for e in at.exception)
    assert not at.error, [e.value for e in at.error]
    return at


def test_lesson_renders_without_a_sweep_and_offers_to_launch_it(store_env):
    at = app(LESSON)
    headers = [h.value for h in at.header]
    assert len(headers) == 5 and headers[0].startswith("1") and headers[4].startswith("5")
    assert any(b.label == "Launch the lesson sweep" for b in at.button)
    assert store_env.list_runs() == []


def test_lesson_launch_button_queues_the_lesson_sweep(store_env, monkeypatch):
    from samlab.runs import sweeps

    monkeypatch.setattr(sweeps, "start_workers", lambda group_id, store=None, workers=None: [])
    at = app(LESSON)
    at.button(key="lesson.launch").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    runs = store_env.list_runs(limit=10_000)
    assert len(runs) == len(sweep_configs(lesson_spec())) and {r["status"] for r in runs} == {"queued"}


def test_lesson_renders_a_finished_sweep_with_paired_standard_errors(store_env):
    finished_lesson_sweep(store_env)
    at = app(LESSON)
    assert not any(b.label == "Launch the lesson sweep" for b in at.button)
    paired = at.dataframe[0].value.set_index("cell")
    # SAM's loss minus the cell's, seed by seed: m = 6 is 0.001·(√60 − √6) better, ± its wobble's SE
    gain = 0.001 * (60 ** 0.5 - 6 ** 0.5)
    assert paired.loc["m = 6", "difference"] == pytest.approx(gain)
    wobble = [0.0002 * (s - 5) for s in SEEDS]
    mean = sum(wobble) / 3
    se = (sum((w - mean) ** 2 for w in wobble) / 2) ** 0.5 / 3 ** 0.5
    assert paired.loc["m = 6", "SE"] == pytest.approx(se)
    assert paired.loc["m = 6", "z"] == pytest.approx(gain / se)
    assert paired.loc["m = 60", "difference"] == 0 and paired.loc["SGD", "better"] == "0 of 3"
    assert any("Paired by seed against m = 60 (SAM)" in m.value and "≥ 3 SE" in m.value for m in at.markdown)
    captions = " ".join(c.value for c in at.caption)
    assert "seeds [4, 5, 6]" in captions and "runs completed" in captions
    # step 4 offers the measurement of each model as a background run
    assert any(b.label.startswith("Measure tr V") for b in at.button)
    assert any(b.label == "Launch the BatchNorm control sweep" for b in at.button)


def test_lesson_shows_the_batchnorm_control(store_env):
    finished_lesson_sweep(store_env)
    finished_control_sweep(store_env)
    at = app(LESSON)
    control = at.dataframe[1].value.set_index("cell")
    assert control.loc["m = 8", "difference"] == pytest.approx(1.0)  # points of accuracy
    assert control.loc["ghost-BN m = 8", "difference"] == pytest.approx(0.5)
    assert control.loc["RW-SAM", "difference"] == pytest.approx(-1.0)


def test_sweeps_page_renders_empty_and_with_a_finished_sweep(store_env):
    at = app(SWEEPS)
    assert any("No sweeps yet" in i.value for i in at.info)
    finished_control_sweep(store_env)
    at = app(SWEEPS)
    assert len(at.get("plotly_chart")) >= 3
    assert any("ghost-BN m = 8" in m.value for m in at.markdown)


def test_the_sweeps_progress_refreshes_only_while_the_sweep_runs(store_env, monkeypatch):
    """A queued sweep's progress panel refreshes itself; once every run has finished the page runs again
    and draws it with no refresh, so an open page costs the runs nothing."""
    from tests.helpers import mark_finished, record_fragments

    group = jobs.submit_sweep(sweep_configs(control_spec(seeds=(4,))), CONTROL_SWEEP_NAME, store=store_env,
                              start=False)
    defined = record_fragments(monkeypatch)
    at = app(SWEEPS)
    assert [every for name, every in defined if name == "progress_panel"] == [3.0]
    assert any("queued" in p.text for p in at.get("progress"))  # "0 / n runs finished · 0 running · n queued"
    for run in store_env.list_runs(group=group, limit=10_000):
        mark_finished(store_env, run["id"], summary={"final_test_acc": 0.8, "final_train_acc": 0.9,
                                                     "generalization_gap": 0.1})
    defined.clear()
    at.run()  # the refreshing panel sees the sweep done and runs the page again
    assert not at.exception
    assert [every for name, every in defined if name == "progress_panel"][-1] is None
    defined.clear()
    at.run()
    assert [every for name, every in defined if name == "progress_panel"] == [None]


def test_trend_sentence_compares_the_difference_with_the_seed_spread():
    import pandas as pd

    from dashboard.msharp_view import trend_sentence

    clear = pd.DataFrame({"m": [2.0, 64.0], "test_acc_mean": [0.95, 0.90], "test_acc_std": [0.01, 0.02],
                          "n_seeds": [5, 5]})
    assert "+5.00 points, larger than the seed spread (2.00)" in trend_sentence(clear)
    noisy = clear.assign(test_acc_mean=[0.91, 0.90])
    assert "within the seed spread" in trend_sentence(noisy)
    assert "Not enough" in trend_sentence(clear.iloc[:1])


def test_claims_sentence_and_table_from_paired_rows():
    import pandas as pd

    from dashboard.msharp_view import claims_sentence, paired_se_table

    paired = pd.DataFrame({
        "method": ["sam", "msam", "ghostbn", "sgd"], "m": [64.0, 8.0, 8.0, float("nan")],
        "rho": [0.3, 0.1, 0.3, float("nan")], "reference_m": [64.0] * 4, "reference_rho": [0.3] * 4,
        "diff_mean": [0.0, 0.004, 0.001, -0.012], "diff_std": [0.0, 0.002, 0.004, 0.002],
        "n_pairs": [4, 4, 4, 4], "n_better": [0, 4, 2, 0], "diff_se": [0.0, 0.001, 0.002, 0.001],
        "z": [float("nan"), 4.0, 0.5, -12.0],
    })
    text = claims_sentence(paired, regression=False)
    assert text.startswith("Paired by seed against m = 64 (SAM) at ρ = 0.3, in points of test accuracy")
    assert "m = 8 +0.4 ± 0.1 (z = 4.0, ≥ 3 SE; 4 of 4 seeds better)" in text
    assert "ghost-BN m = 8 +0.1 ± 0.2 (z = 0.5, < 3 SE; 2 of 4 seeds better)" in text
    assert "SGD -1.2 ± 0.1 (z = -12.0, ≥ 3 SE" in text and "m = 64 +" not in text
    table = paired_se_table(paired, regression=False)
    assert list(table["cell"]) == ["m = 64", "m = 8", "ghost-BN m = 8", "SGD"]
    assert list(table["difference"]) == pytest.approx([0.0, 0.4, 0.1, -1.2])
    assert "Not enough" in claims_sentence(paired.iloc[:1], regression=False)


def test_per_m_grids_from_the_sweeps_form():
    from dashboard.msharp_view import parse_rhos_by_m

    assert parse_rhos_by_m('{"64": [0.2, 0.4], "2": [0.05]}') == {64: [0.2, 0.4], 2: [0.05]}
    assert parse_rhos_by_m("") == {}
    with pytest.raises(ValueError, match="rhos_by_m: keys"):
        parse_rhos_by_m('{"big": [0.1]}')
    with pytest.raises(ValueError, match=r"rhos_by_m\[4\]"):
        parse_rhos_by_m('{"4": 0.1}')
