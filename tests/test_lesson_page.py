"""The m-sharpness lesson and the Sweeps page render with AppTest, with and without a finished sweep."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from dashboard.msharp_view import LESSON_SWEEP_NAME, lesson_spec
from samlab.runs import jobs
from samlab.runs.store import Store
from samlab.sweeps import sweep_configs
from tests.helpers import chart_traces, plotly_array

ROOT = Path(__file__).resolve().parent.parent
LESSON = "pages/6_Lesson_m-sharpness.py"
SWEEPS = "pages/5_Sweeps.py"
TIMEOUT = 120


def finished_lesson_sweep(store: Store, seeds: int = 2) -> str:
    """The lesson's grid recorded as finished (accuracy rising as m falls), without training."""
    configs = sweep_configs(lesson_spec(seeds=seeds))
    group = jobs.submit_sweep(configs, LESSON_SWEEP_NAME, store=store, start=False)
    for run in store.list_runs(group=group, limit=10_000):
        optim = run["params"]["optim"]
        m = optim["m"] or run["params"]["batch_size"]
        acc = 0.85 if optim["method"] in ("sgd", "nsam") else 0.95 - 0.01 * m ** 0.5 - 0.05 * optim["rho"]
        acc += 0.002 * run["params"]["seed"]
        assert store.claim(run["id"], "test-host", "test")
        store.finish_run(run["id"], "completed", summary={"final_test_acc": acc, "final_train_acc": 0.8,
                                                          "generalization_gap": 0.8 - acc})
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


def test_lesson_renders_a_finished_sweep_with_seed_counts(store_env):
    finished_lesson_sweep(store_env)
    at = app(LESSON)
    assert not any(b.label == "Launch the lesson sweep" for b in at.button)
    best = at.dataframe[0].value
    assert set(best["m"].dropna()) == {64.0, 32.0, 8.0, 2.0}
    assert set(best["n_seeds"]) == {2}
    # each m was tuned on its own grid, and the paired table subtracts m = 64 seed by seed
    spec = lesson_spec(seeds=2)
    for _, row in best.dropna(subset=["m"]).iterrows():
        assert row["rho"] in spec.rhos_for(int(row["m"])) and row["rhos_tried"] == 4
    paired = at.dataframe[1].value.set_index("cell")
    assert paired.loc["m = 2", "diff_points"] > 0 and paired.loc["m = 64", "diff_points"] == 0
    assert paired.loc["SGD", "better"] == "0 of 2"
    assert any("Paired by seed against m = 64" in m.value for m in at.markdown)
    captions = " ".join(c.value for c in at.caption)
    assert "seeds [0, 1]" in captions and "runs completed" in captions
    # step 4 offers the measurement of each best-ρ model as a background run
    assert any(b.label.startswith("Measure tr V") for b in at.button)


def test_sweeps_page_renders_empty_and_with_a_finished_sweep(store_env):
    at = app(SWEEPS)
    assert any("No sweeps yet" in i.value for i in at.info)
    finished_lesson_sweep(store_env)
    at = app(SWEEPS)
    assert len(at.get("plotly_chart")) >= 3
    # the accuracy curve is the recorded sweep's: at each m the best ρ is the smallest of its grid (the
    # recorded accuracy falls with ρ), averaged over seeds 0 and 1 (+0.000 and +0.002)
    spec = lesson_spec(seeds=2)
    ms = sorted({m or spec.base.batch_size for m in spec.ms})
    best = [100 * (0.95 - 0.01 * m ** 0.5 - 0.05 * min(spec.rhos_for(m)) + 0.001) for m in ms]
    (curve,) = [t for t in chart_traces(at, "sweeps.acc") if t.get("mode") == "lines+markers"]
    assert plotly_array(curve["x"]) == ms and plotly_array(curve["y"]) == pytest.approx(best, rel=1e-9)
    assert plotly_array(curve["error_y"]["array"]) == pytest.approx([100 * 0.002 / 2 ** 0.5] * len(ms), rel=1e-9)


def test_trend_sentence_compares_the_difference_with_the_seed_spread():
    import pandas as pd

    from dashboard.msharp_view import trend_sentence

    clear = pd.DataFrame({"m": [2.0, 64.0], "test_acc_mean": [0.95, 0.90], "test_acc_std": [0.01, 0.02],
                          "n_seeds": [5, 5]})
    assert "+5.00 points, larger than the seed spread (2.00)" in trend_sentence(clear)
    noisy = clear.assign(test_acc_mean=[0.91, 0.90])
    assert "within the seed spread" in trend_sentence(noisy)
    assert "Not enough" in trend_sentence(clear.iloc[:1])


def test_paired_sentence_says_which_differences_exceed_their_spread():
    import pandas as pd

    from dashboard.msharp_view import paired_sentence, paired_table

    paired = pd.DataFrame({
        "method": ["sam", "msam", "nsam"], "m": [64.0, 8.0, float("nan")], "rho": [0.3, 0.1, 0.4],
        "reference_m": [64.0] * 3, "reference_rho": [0.3] * 3, "diff_mean": [0.0, 0.004, -0.012],
        "diff_std": [0.0, 0.005, 0.002], "n_pairs": [5, 5, 5], "n_better": [0, 3, 0],
    })
    text = paired_sentence(paired)
    assert text.startswith("Paired by seed against m = 64 at ρ = 0.3")
    assert "m = 8 +0.40 ± 0.50 (3 of 5 seeds better; within the spread)" in text
    assert "n-SAM -1.20 ± 0.20 (0 of 5 seeds better; beyond the spread)" in text
    assert "m = 64 +0.00" not in text
    assert list(paired_table(paired)["cell"]) == ["m = 64", "m = 8", "n-SAM"]
    assert "Not enough" in paired_sentence(paired.iloc[:1])


def test_per_m_grids_from_the_sweeps_form():
    from dashboard.msharp_view import parse_rhos_by_m

    assert parse_rhos_by_m('{"64": [0.2, 0.4], "2": [0.05]}') == {64: [0.2, 0.4], 2: [0.05]}
    assert parse_rhos_by_m("") == {}
    with pytest.raises(ValueError, match="rhos_by_m: keys"):
        parse_rhos_by_m('{"big": [0.1]}')
    with pytest.raises(ValueError, match=r"rhos_by_m\[4\]"):
        parse_rhos_by_m('{"4": 0.1}')
