import json
import math
import subprocess
import sys

import pytest
import torch

from samlab.checkpoints import list_snapshots, load_trained
from samlab.config import preset
from samlab.data import load_dataset
from samlab.reporting import RecordingReporter
from samlab.tasks.train import run_task
from samlab.train import evaluate, learning_rate, run


def tiny(*overrides):
    base = ["data.n_train=256", "data.n_test=128", "epochs=2", "batch_size=64", "model.width=16",
            "optim.lr=0.05", "log_every=1", "device=cpu"]  # bit-identity checks: one device for every run
    return preset("digits-mlp", base + list(overrides))


class StopAfter(RecordingReporter):
    def __init__(self, steps):
        super().__init__()
        self.steps = steps

    def should_stop(self):
        return sum(1 for kind, _, _ in self.rows if kind == "step") >= self.steps


def weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_a_tiny_run_completes_reports_metrics_and_learns():
    rec = RecordingReporter()
    result = run(tiny("optim.method=sam", "optim.rho=0.05", "optim.lr=0.1", "epochs=4"), rec)
    assert result.status == "completed"
    steps = [r for r in rec.rows if r[0] == "step"]
    epochs = [r for r in rec.rows if r[0] == "epoch"]
    assert [s for _, s, _ in steps] == list(range(1, 4 * 4 + 1))  # 256 / 64 = 4 steps per epoch
    assert [e for _, e, _ in epochs] == [1, 2, 3, 4]
    first = steps[0][2]
    assert set(first) >= {"train_loss", "perturbed_loss", "sharpness", "grad_norm", "lr", "step_time"}
    assert first["sharpness"] == pytest.approx(first["perturbed_loss"] - first["train_loss"])
    s = result.summary
    assert s["final_test_acc"] > 0.3  # 10 classes: chance is 0.1, and this is 16 steps
    assert steps[-1][2]["train_loss"] < 0.9 * first["train_loss"]
    assert s["generalization_gap"] == pytest.approx(s["final_train_acc"] - s["final_test_acc"])
    assert rec.progress_calls[-1][:2] == (16, 16)


def test_summary_accuracies_match_an_independent_evaluation():
    result = run(tiny())
    data = load_dataset(tiny().data)
    ev = evaluate(result.model, data.x_test, data.y_test, "classification")
    assert ev["acc"] == pytest.approx(result.summary["final_test_acc"])
    correct = (result.model.eval()(data.x_test).argmax(1) == data.y_test).float().mean().item()
    assert correct == pytest.approx(ev["acc"])


def test_same_config_and_seed_give_bit_identical_weights_on_cpu():
    a = run(tiny("optim.method=rwsam", "optim.lam=1.0")).model
    b = run(tiny("optim.method=rwsam", "optim.lam=1.0")).model
    assert torch.equal(weights(a), weights(b))
    c = run(tiny("optim.method=rwsam", "optim.lam=1.0", "seed=1")).model
    assert not torch.equal(weights(a), weights(c))


@pytest.mark.parametrize(
    "method",
    [["optim.method=sgd"], ["optim.method=rwsam", "optim.lam=2.0"], ["optim.method=nsam", "optim.nsam_batch=64"],
     ["optim.method=msam", "optim.m=16", "optim.impl=loop"],
     ["optim.method=usam", "precision=fp16", "optim.accumulate=2"]],  # the SAM class path, its scaler resumed
)
def test_cancel_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path, method):
    cfg = tiny(*method, "epochs=3")
    full = run(cfg, workdir=tmp_path / "full")
    stopped = run(cfg, StopAfter(6), workdir=tmp_path / "split")  # stops inside epoch 2
    assert stopped.status == "cancelled" and stopped.summary["steps"] == 6
    resumed = run(cfg, workdir=tmp_path / "split", resume=True)
    assert resumed.status == "completed" and resumed.summary["steps"] == 12
    assert torch.equal(weights(full.model), weights(resumed.model))
    assert resumed.summary["final_test_acc"] == full.summary["final_test_acc"]


def test_resume_without_or_with_a_corrupt_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="resume: no checkpoint"):
        run(tiny(), workdir=tmp_path, resume=True)
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="checkpoint: cannot read"):
        run(tiny(), workdir=tmp_path, resume=True)


def test_divergence_stops_the_run_with_status_diverged():
    rec = RecordingReporter()
    result = run(tiny("optim.method=sgd", "optim.lr=1e6", "optim.momentum=0.0", "schedule.name=constant"), rec)
    assert result.status == "diverged"
    last = [r for r in rec.rows if r[0] == "step"][-1][2]
    assert not (math.isfinite(last["train_loss"]) and math.isfinite(last["grad_norm"]))


def test_checkpoint_and_snapshots_restore_the_trained_model(tmp_path):
    result = run(tiny("epochs=2"), workdir=tmp_path)
    snaps = list_snapshots(tmp_path)
    assert [p.name for p in snaps] == ["epoch_0001.pt", "epoch_0002.pt"]
    trained = load_trained(result.checkpoint)
    assert trained.epoch == 2 and trained.step == 8
    assert torch.equal(weights(trained.model), weights(result.model))
    x = trained.data.x_test
    assert torch.allclose(trained.model(x), result.model.eval()(x))


def test_learning_rate_schedules():
    cfg = preset("digits-cnn", ["epochs=10", "optim.lr=0.1", "schedule.name=cosine", "schedule.warmup_epochs=1"])
    assert learning_rate(cfg, 0, 10) == pytest.approx(0.01)  # warm-up: (step + 1) / 10 of lr
    assert learning_rate(cfg, 9, 10) == pytest.approx(0.1)
    assert learning_rate(cfg, 10, 10) == pytest.approx(0.1)  # cosine starts after warm-up
    assert learning_rate(cfg, 55, 10) == pytest.approx(0.05)  # half-way through the decay
    step = preset("digits-cnn", ["optim.lr=0.1", "schedule.name=step", "schedule.step_every=2",
                                 "schedule.gamma=0.5"])
    assert [learning_rate(step, s, 10) for s in (0, 19, 20, 40)] == pytest.approx([0.1, 0.1, 0.05, 0.025])


def test_bf16_autocast_runs_on_the_cpu_too():
    result = run(tiny("precision=bf16", "epochs=1", "device=cpu"))
    assert result.status == "completed" and result.summary["device"] == "cpu"


def test_run_task_returns_status_and_summary(tmp_path):
    out = run_task(tiny().to_dict(), RecordingReporter(), tmp_path, False)
    assert out["status"] == "completed" and out["checkpoint"].endswith("checkpoint.pt")


def test_cli_train_prints_a_json_summary_and_refuses_bad_values():
    cmd = [sys.executable, "-m", "samlab", "train", "--preset", "digits-mlp", "--set", "epochs=1",
           "--set", "data.n_train=128", "--set", "batch_size=64", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["status"] == "completed" and summary["steps"] == 2
    bad = subprocess.run(cmd[:-1] + ["--set", "optim.rho=-1"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert "error: optim.rho: must be in [0, inf]" in bad.stderr and "Traceback" not in bad.stderr


def test_curvature_and_noise_are_logged_every_n_steps_on_a_fixed_subset():
    rec = RecordingReporter()
    run(tiny("hessian_every=3", "noise_every=4", "hessian_samples=64", "log_every=100"), rec)
    rows = {step: values for kind, step, values in rec.rows if kind == "step"}
    assert sorted(s for s, v in rows.items() if "lambda_max" in v) == [3, 6]
    assert sorted(s for s, v in rows.items() if "trace_v" in v) == [4, 8]
    assert all(rows[s]["lambda_max"] > 0 for s in (3, 6))
    assert all(rows[s]["trace_v"] > 0 for s in (4, 8))


def test_every_metric_is_reported_and_synced_before_each_checkpoint(tmp_path):
    class SyncLog(RecordingReporter):
        def __init__(self):
            super().__init__()
            self.synced_at = []

        def sync(self):
            self.synced_at.append(max((s for k, s, _ in self.rows if k == "step"), default=0))

    rec = SyncLog()
    run(tiny("epochs=3", "log_every=2"), rec, workdir=tmp_path)
    # one sync per epoch checkpoint plus the final one, each after that epoch's last step was reported
    assert rec.synced_at == [4, 8, 12, 12]
