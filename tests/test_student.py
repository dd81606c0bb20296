"""The batched two-layer ReLU student against samlab's own trainer (a second implementation that must
agree), and its closed-form per-sample gradients against torch.func."""

from __future__ import annotations

import pytest
import torch

from samlab import train
from samlab.config import DataConfig, ModelConfig, RunConfig
from samlab.data import load_dataset
from samlab.models import build_model
from samlab.noise import per_sample_grads
from samlab.student import StudentRun, per_sample_gradients, train_students

DATA = {"name": "relu-teacher", "n_train": 12, "n_test": 50, "n_features": 4, "sparsity": 2}


def trainer_run(method: str, rho: float, m: int | None, steps: int, *, rule_method: str | None = None,
                lam: float = 0.0) -> dict:
    cfg = RunConfig.from_dict({
        "data": DATA, "model": {"name": "relu-net", "width": 6, "init_scale": 0.5},
        "optim": {"method": rule_method or method, "rho": rho, "m": m, "lr": 0.2, "momentum": 0.0,
                  "weight_decay": 0.0, "impl": "loop", "lam": lam, "estimator": "exact"},
        "schedule": {"name": "constant"}, "epochs": steps, "batch_size": 12, "device": "cpu",
        "checkpoint_every": 0, "eval_every": steps, "log_every": steps, "seed": 3,
    })
    return train.run(cfg).summary


@pytest.mark.parametrize(("method", "m", "rho", "rule", "trainer_method", "lam"), [
    ("sgd", 12, 0.0, "normalized", "sgd", 0.0),
    ("sam", 12, 0.2, "normalized", "sam", 0.0),
    ("msam", 3, 0.2, "normalized", "msam", 0.0),
    ("msam", 1, 0.1, "normalized", "msam", 0.0),
    ("sam", 12, 0.5, "unnormalized", "usam", 0.0),
    ("rwsam", 12, 0.2, "normalized", "rwsam", 3.0),
])
def test_student_follows_the_trainer(method, m, rho, rule, trainer_method, lam):
    steps = 25
    data = load_dataset(DataConfig(**DATA))
    (got,) = train_students(data, [StudentRun(method, m, rho, 3, lam)], width=6, init_scale=0.5, lr=0.2,
                            steps=steps, rule=rule, dtype=torch.float64)
    want = trainer_run(method, rho, None if m == 12 else m, steps, rule_method=trainer_method, lam=lam)
    assert got["test_loss"] == pytest.approx(want["final_test_loss"], rel=1e-4)
    assert got["train_loss"] == pytest.approx(want["final_train_loss"], rel=1e-4)


def test_closed_form_per_sample_gradients_match_torch_func():
    data = load_dataset(DataConfig(**DATA))
    model = build_model(ModelConfig(name="relu-net", width=6, init_scale=0.5), (4,), 1, seed=1).double()
    x, y = data.x_train.double(), data.y_train.double()
    expected = per_sample_grads(model, lambda out, t: 0.5 * (out - t) ** 2, x, y)
    got = per_sample_gradients(model.hidden.detach(), model.out.detach(), x, y)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_configurations_do_not_interact():
    data = load_dataset(DataConfig(**DATA))
    runs = [StudentRun("msam", 3, 0.2, 1), StudentRun("msam", 3, 0.05, 2), StudentRun("sgd", 12, 0.0, 1)]
    together = train_students(data, runs, width=6, init_scale=0.5, lr=0.2, steps=10, dtype=torch.float64)
    alone = [train_students(data, [r], width=6, init_scale=0.5, lr=0.2, steps=10, dtype=torch.float64)[0]
             for r in runs]
    for a, b in zip(together, alone):
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-12)


@pytest.mark.parametrize(("run", "match"), [
    (StudentRun("usam", 12, 0.1, 0), "method"),
    (StudentRun("sam", 4, 0.1, 0), "m = n"),
    (StudentRun("msam", 5, 0.1, 0), "divide"),
    (StudentRun("msam", 4, -0.1, 0), "ρ"),
])
def test_bad_runs_are_refused(run, match):
    data = load_dataset(DataConfig(**DATA))
    with pytest.raises(ValueError, match=match):
        train_students(data, [run], width=6, init_scale=0.5, lr=0.2, steps=1)
