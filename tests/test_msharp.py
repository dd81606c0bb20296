"""m-sharpness against hand-written loops over micro-batches."""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch
from torch import nn

from samlab.losses import cross_entropy_per_sample, squared_error_per_sample
from samlab.msharp import m_sharpness, m_sharpness_curve
from samlab.reporting import RecordingReporter
from samlab.tasks.msharp import check_task


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def tiny_bn_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double()
    net.train()
    net(torch.randn(32, 5, dtype=torch.float64))  # non-trivial running statistics
    return net


def classification_data(n: int = 24, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    return x, y


def loss_at(model: nn.Module, x, y, loss_fn, shift: list[torch.Tensor] | None = None) -> torch.Tensor:
    """L_B(w + shift) by copying the model and moving its weights (no torch.func)."""
    moved = copy.deepcopy(model).eval()
    if shift is not None:
        with torch.no_grad():
            for p, s in zip(moved.parameters(), shift):
                p.add_(s)
    return loss_fn(moved(x), y).mean()


def sam_estimate_by_hand(model, x, y, loss_fn, rho) -> tuple[float, float]:
    """(L(w + ρ g/‖g‖) − L(w), ‖g‖) with autograd on a copy of the model."""
    probe = copy.deepcopy(model).eval()
    loss = loss_fn(probe(x), y).mean()
    grads = torch.autograd.grad(loss, list(probe.parameters()))
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
    shift = [rho * g / norm for g in grads]
    return float((loss_at(model, x, y, loss_fn, shift) - loss).detach()), float(norm)


@pytest.mark.parametrize("m", [1, 4, 6, 24])
def test_one_step_equals_a_hand_loop_over_microbatches(m):
    model, (x, y) = tiny_bn_net(), classification_data()
    rho = 0.3
    got = m_sharpness(model, cross_entropy_per_sample, x, y, m=m, rho=rho)
    expected = [
        sam_estimate_by_hand(model, x[j : j + m], y[j : j + m], cross_entropy_per_sample, rho)[0]
        for j in range(0, len(x) - m + 1, m)
    ]
    assert got["num_microbatches"] == len(expected)
    torch.testing.assert_close(torch.tensor(got["per_microbatch"]), torch.tensor(expected), rtol=1e-7, atol=1e-10)
    assert got["sharpness"] == pytest.approx(sum(expected) / len(expected), rel=1e-7)


def test_full_batch_m_sharpness_is_the_sam_estimate():
    model, (x, y) = tiny_mlp(), classification_data()
    got = m_sharpness(model, cross_entropy_per_sample, x, y, m=len(x), rho=0.1)
    expected, _ = sam_estimate_by_hand(model, x, y, cross_entropy_per_sample, 0.1)
    assert got["num_microbatches"] == 1
    assert got["sharpness"] == pytest.approx(expected, rel=1e-8)


def test_leftover_samples_sit_out_and_a_generator_permutes_before_cutting():
    model, (x, y) = tiny_mlp(), classification_data(n=26)
    plain = m_sharpness(model, cross_entropy_per_sample, x, y, m=4, rho=0.2)
    assert plain["num_microbatches"] == 6
    gen = torch.Generator().manual_seed(5)
    order = torch.randperm(26, generator=torch.Generator().manual_seed(5))
    shuffled = m_sharpness(model, cross_entropy_per_sample, x, y, m=4, rho=0.2, generator=gen)
    by_hand = m_sharpness(model, cross_entropy_per_sample, x[order], y[order], m=4, rho=0.2)
    assert shuffled["per_microbatch"] == pytest.approx(by_hand["per_microbatch"], rel=1e-10)
    assert shuffled["sharpness"] != pytest.approx(plain["sharpness"], rel=1e-6)


def test_convex_loss_gains_at_least_rho_times_the_gradient_norm_per_microbatch():
    # L_j convex ⇒ L_j(w + ρ g/‖g‖) ≥ L_j(w) + ρ‖g‖ (first-order lower bound): S_m ≥ 0 microbatch by microbatch.
    torch.manual_seed(3)
    model = nn.Linear(5, 1).double()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(20, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(20, generator=gen, dtype=torch.float64)
    got = m_sharpness(model, squared_error_per_sample, x, y, m=5, rho=0.05)
    for j, value in enumerate(got["per_microbatch"]):
        xs, ys = x[5 * j : 5 * j + 5], y[5 * j : 5 * j + 5]
        _, norm = sam_estimate_by_hand(model, xs, ys, squared_error_per_sample, 0.05)
        assert value >= 0.05 * norm - 1e-12


def test_m_sharpness_is_non_negative_in_expectation_on_a_non_convex_net():
    model, (x, y) = tiny_mlp(seed=7), classification_data(n=48, seed=8)
    rows = m_sharpness_curve(model, cross_entropy_per_sample, x, y, ms=[1, 4, 48], rho=0.01, partitions=5, seed=2)
    assert [r["m"] for r in rows] == [1, 4, 48]
    assert all(r["sharpness"] > 0 for r in rows)
    assert all(r["partitions"] == 5 for r in rows)


def test_curve_values_equal_hand_loops_and_the_mean_over_all_micro_batches():
    """m = n and m = 1 do not depend on the partition: the hand loop gives them exactly. At m = 3 every
    micro-batch of a random partition is a uniformly drawn 3-subset, so the curve estimates the mean over
    all C(12, 3) = 220 subsets; a partition's mean varies at most as much as one subset's value, hence the
    mean over 6 independent partitions lies within 4 sd / sqrt(6) of it."""
    model, (x, y) = tiny_mlp(seed=7), classification_data(n=12, seed=8)
    loss_fn, rho = cross_entropy_per_sample, 0.05
    rows = m_sharpness_curve(model, loss_fn, x, y, ms=[12, 3, 1], rho=rho, partitions=6, seed=2)
    assert [(r["m"], r["num_microbatches"], r["partitions"]) for r in rows] == [(12, 1, 6), (3, 4, 6), (1, 12, 6)]
    whole, _ = sam_estimate_by_hand(model, x, y, loss_fn, rho)
    singles = [sam_estimate_by_hand(model, x[i:i + 1], y[i:i + 1], loss_fn, rho)[0] for i in range(12)]
    assert rows[0]["sharpness"] == pytest.approx(whole, rel=1e-9)
    assert rows[2]["sharpness"] == pytest.approx(sum(singles) / 12, rel=1e-9)
    for row in (rows[0], rows[2]):
        assert row["sharpness_std_over_partitions"] == pytest.approx(0.0, abs=1e-12)
    loss = float(loss_at(model, x, y, loss_fn).detach())
    assert rows[0]["loss"] == pytest.approx(loss, rel=1e-12) and rows[2]["loss"] == pytest.approx(loss, rel=1e-12)
    assert rows[0]["perturbed_loss"] == pytest.approx(loss + whole, rel=1e-9)
    subsets = torch.tensor([sam_estimate_by_hand(model, x[list(c)], y[list(c)], loss_fn, rho)[0]
                            for c in itertools.combinations(range(12), 3)], dtype=torch.float64)
    mean, sd = float(subsets.mean()), float(subsets.std(unbiased=False))
    assert abs(rows[1]["sharpness"] - mean) <= 4 * sd / 6 ** 0.5
    assert rows[1]["sharpness_std_over_partitions"] <= 4 * sd


def test_more_ascent_steps_never_lower_the_estimate():
    model, (x, y) = tiny_mlp(seed=2), classification_data(seed=3)
    one = m_sharpness(model, cross_entropy_per_sample, x, y, m=4, rho=0.5, steps=1)
    many = m_sharpness(model, cross_entropy_per_sample, x, y, m=4, rho=0.5, steps=6, step_size=0.2)
    default = m_sharpness(model, cross_entropy_per_sample, x, y, m=4, rho=0.5, steps=6)
    for a, c in zip(one["per_microbatch"], default["per_microbatch"]):
        assert c >= a - 1e-12
    # smaller steps start lower than ρ ĝ but climb: on average they end above the one-step estimate
    assert many["sharpness"] > 0
    assert default["sharpness"] >= one["sharpness"]


def test_multi_step_ascent_finds_the_exact_maximum_of_a_linear_loss_with_a_step_that_overshoots():
    # L(w) = mean_i <x_i, w> is linear, so max over the ball is L(w) + ρ‖∇L‖, reached by ε = ρ ĝ.
    model = nn.Linear(4, 1, bias=False).double()
    x = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    identity = lambda out, target: out.reshape(-1)  # noqa: E731
    got = m_sharpness(model, identity, x, torch.zeros(8), m=8, rho=0.3, steps=4, step_size=0.9)
    assert got["sharpness"] == pytest.approx(0.3 * float(x.mean(0).norm()), rel=1e-9)


def test_the_model_is_left_unchanged_and_keeps_its_mode():
    model, (x, y) = tiny_bn_net(), classification_data()
    before = copy.deepcopy(model.state_dict())
    m_sharpness(model, cross_entropy_per_sample, x, y, m=6, rho=0.5, steps=3)
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_curve_reports_progress_and_stops_when_asked():
    model, (x, y) = tiny_mlp(), classification_data()
    reporter = RecordingReporter()
    rows = m_sharpness_curve(model, cross_entropy_per_sample, x, y, ms=[24, 6, 1], rho=0.1, reporter=reporter)
    assert [call[:2] for call in reporter.progress_calls] == [(1, 3), (2, 3), (3, 3)]
    assert len(rows) == 3
    stopper = RecordingReporter()
    stopper.stop_requested = True
    assert m_sharpness_curve(model, cross_entropy_per_sample, x, y, ms=[24, 6], rho=0.1, reporter=stopper) == []


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"m": 0}, "m:"), ({"m": 25}, "m:"), ({"rho": -1.0}, "rho:"), ({"steps": 0}, "steps:"), ({"step_size": 0.0}, "step_size:")],
)
def test_bad_arguments_name_the_field(kwargs, field):
    model, (x, y) = tiny_mlp(), classification_data()
    args = {"m": 4, "rho": 0.1} | kwargs
    with pytest.raises(ValueError, match=field):
        m_sharpness(model, cross_entropy_per_sample, x, y, **args)


def test_check_task_fills_defaults_and_names_bad_fields():
    params = check_task({"checkpoint": "run/checkpoint.pt", "ms": [4, 16, 4], "rho": 0.1})
    assert params["ms"] == [16, 4] and params["steps"] == 1 and params["rho"] == 0.1
    with pytest.raises(ValueError, match="checkpoint:"):
        check_task({"ms": [4]})
    with pytest.raises(ValueError, match="ms:"):
        check_task({"checkpoint": "c.pt", "ms": [0]})
    with pytest.raises(ValueError, match="colour"):
        check_task({"checkpoint": "c.pt", "colour": 1})


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory) -> str:
    """A digits MLP trained for one epoch on 64 samples."""
    from samlab.config import preset
    from samlab.train import run

    cfg = preset("digits-mlp", {"data.n_train": 64, "data.n_test": 32, "epochs": 1, "batch_size": 16,
                                "model.width": 8, "device": "cpu"})
    return str(run(cfg, workdir=tmp_path_factory.mktemp("msharp-train")).checkpoint)


def test_task_measures_a_checkpoint_and_resumes_from_its_partial_result(tmp_path, trained_checkpoint):
    from samlab.tasks.msharp import PARTIAL_FILE, run_task

    params = {"checkpoint": trained_checkpoint, "ms": [32, 4, 1], "rho": 0.05, "n_samples": 32,
              "partitions": 2}
    reporter = RecordingReporter()
    result = run_task(params, reporter, tmp_path / "task", resume=False)
    assert [r["m"] for r in result["sharpness_curve"]] == [32, 4, 1]
    assert [r["m"] for r in result["noise_curve"]] == [32, 4, 1]
    assert result["n"] == 32 and len(result["noise"]["sample_grad_norms"]) == 32
    assert reporter.results and reporter.progress_calls[-1][:2] == (3, 3)
    # a resumed task keeps what was measured and computes only the missing m values
    saved = json.loads((tmp_path / "task" / PARTIAL_FILE).read_text())
    saved["sharpness_curve"] = saved["sharpness_curve"][:1]
    (tmp_path / "task" / PARTIAL_FILE).write_text(json.dumps(saved))
    resumed = run_task(params, RecordingReporter(), tmp_path / "task", resume=True)
    assert resumed["sharpness_curve"] == result["sharpness_curve"]  # seeded: the same numbers
    assert resumed["noise"]["trace_v"] == result["noise"]["trace_v"]


def test_task_values_equal_the_library_on_the_same_samples(tmp_path, trained_checkpoint):
    """n_samples = the whole train set, so the subset is the train set whatever the sampling: everything
    that does not depend on the order of the samples (gradient noise, S_m at m = n and m = 1, E‖∇L_I‖
    there) is checked against gradient_noise, m_sharpness and the hand loop on the train set as loaded;
    m = 8 against m_sharpness_curve with the task's seed on the task's seeded subset."""
    from samlab.checkpoints import load_trained
    from samlab.noise import gradient_noise
    from samlab.tasks.msharp import run_task
    from samlab.tasks.protocol import seeded_subset

    params = {"checkpoint": trained_checkpoint, "ms": [64, 8, 1], "rho": 0.05, "n_samples": 64, "partitions": 3,
              "seed": 1}
    result = run_task(params, RecordingReporter(), tmp_path / "task", resume=False)
    trained = load_trained(trained_checkpoint)
    model, loss_fn, x, y = trained.model, trained.loss_fn, trained.data.x_train, trained.data.y_train
    assert result["n"] == len(x) == 64

    noise = gradient_noise(model, loss_fn, x, y)
    for key in ("trace_v", "full_grad_norm", "mean_sample_grad_norm"):
        assert result["noise"][key] == pytest.approx(noise[key], rel=1e-5), key
    assert sorted(result["noise"]["sample_grad_norms"]) == pytest.approx(sorted(noise["sample_grad_norms"]), rel=1e-5)
    curve = {r["m"]: r for r in result["noise_curve"]}
    assert curve[1]["mean"] == pytest.approx(noise["mean_sample_grad_norm"], rel=1e-5)
    assert curve[64]["mean"] == pytest.approx(noise["full_grad_norm"], rel=1e-5)
    # triangle inequality and convexity of the norm: ‖∇L‖ ≤ mean over a partition of ‖∇L_I‖ ≤ mean ‖∇f_i‖
    assert noise["full_grad_norm"] * (1 - 1e-5) <= curve[8]["mean"] <= noise["mean_sample_grad_norm"] * (1 + 1e-5)
    assert all(row["trace_v"] == pytest.approx(noise["trace_v"], rel=1e-5) for row in curve.values())

    sharp = {r["m"]: r for r in result["sharpness_curve"]}
    assert sharp[64]["sharpness"] == pytest.approx(m_sharpness(model, loss_fn, x, y, m=64, rho=0.05)["sharpness"],
                                                   rel=1e-4, abs=1e-7)
    whole, _ = sam_estimate_by_hand(model, x, y, loss_fn, 0.05)
    assert sharp[64]["sharpness"] == pytest.approx(whole, rel=1e-3, abs=1e-6)
    per_sample = [sam_estimate_by_hand(model, x[i:i + 1], y[i:i + 1], loss_fn, 0.05)[0] for i in range(64)]
    assert sharp[1]["sharpness"] == pytest.approx(sum(per_sample) / 64, rel=1e-3, abs=1e-6)
    xs, ys = seeded_subset(x, y, 64, 1)
    (row,) = m_sharpness_curve(model, loss_fn, xs, ys, ms=[8], rho=0.05, partitions=3, seed=1)
    assert sharp[8] == row


def test_task_on_a_train_set_smaller_than_n_samples_names_the_sizes_that_fit(tmp_path, trained_checkpoint):
    """The defaults (n_samples 512, m up to 256) on a 64-sample train set: one clear error before any work,
    suggesting micro-batch sizes that divide the 64 samples; those run."""
    from samlab.tasks.msharp import micro_batch_sizes, run_task

    assert micro_batch_sizes(64) == [64, 16, 8, 2, 1] and micro_batch_sizes(60) == [60, 20, 6, 2, 1]
    assert micro_batch_sizes(7) == [7, 1] and micro_batch_sizes(1) == [1]
    with pytest.raises(ValueError, match=r"ms: m = 256 is more than the 64 samples .* ms=\[64, 16, 8, 2, 1\]"):
        run_task({"checkpoint": trained_checkpoint}, RecordingReporter(), tmp_path / "task", resume=False)
    assert not (tmp_path / "task").exists()
    result = run_task({"checkpoint": trained_checkpoint, "ms": micro_batch_sizes(64), "partitions": 2},
                      RecordingReporter(), tmp_path / "task", resume=False)
    assert [row["m"] for row in result["sharpness_curve"]] == [64, 16, 8, 2, 1]
