"""The SAM class in real training loops, each feature against an fp32 / single-batch reference.

Oracles: `sharpness_gradient` (a separate implementation through torch.func) plus a base step;
hand-written momentum math for BatchNorm statistics; torch's own GradScaler on a plain optimizer
for the skipped-step bookkeeping; explicit chunked forwards on model copies for accumulation.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from samlab.config import preset
from samlab.optim import SAM, SAM_METHODS, sam_step, sample_scores, sharpness_gradient
from samlab.train import run
from tests.test_optim import RHO, batch, ce, make_bn_net, make_mlp

LR = 0.1


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_params_close(a: nn.Module | list, b: nn.Module | list, **tol) -> None:
    a = params_of(a) if isinstance(a, nn.Module) else a
    b = params_of(b) if isinstance(b, nn.Module) else b
    assert len(a) == len(b)
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v, **tol)


def reference_step(model: nn.Module, x, y, method: str = "sam", lr: float = LR, **kw) -> None:
    """sharpness_gradient (the functional implementation), then a plain SGD step."""
    sharpness_gradient(model, ce, x, y, method=method, rho=RHO, **kw)
    torch.optim.SGD(model.parameters(), lr=lr).step()


def sam_of(model: nn.Module, method: str = "sam", base=torch.optim.SGD, **kw) -> SAM:
    return SAM(model.parameters(), base, rho=RHO, method=method, model=model, **{"lr": LR, **kw})


@torch.no_grad()
def relative_displacement_error(run: nn.Module, ref: nn.Module, start: nn.Module) -> float:
    """‖w_run − w_ref‖ / ‖w_ref − w_0‖: the error relative to how far training moved the weights."""
    num = sum(((p - q) ** 2).sum() for p, q in zip(run.parameters(), ref.parameters()))
    den = sum(((q - s) ** 2).sum() for q, s in zip(ref.parameters(), start.parameters()))
    return math.sqrt(float(num) / float(den))


# -- mixed precision ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["sam", "usam", "asam"])
def test_a_gradient_scaler_unscales_each_pass_exactly_once(method):
    """fp32 forwards with a power-of-two loss scale: the steps equal unscaled SAM (usam's eps = rho g
    would be off by the scale factor if the first pass were unscaled zero times or twice)."""
    x, y = batch(n=16)
    model, ref = make_mlp(), make_mlp()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
    opt, ref_opt = sam_of(model, method), sam_of(ref, method)
    for _ in range(5):
        info = sam_step(opt, model, ce, x, y, scaler=scaler)
        sam_step(ref_opt, ref, ce, x, y)
        assert info["skipped"] == 0.0
    assert scaler.get_scale() == 2.0**14  # grew twice (growth_interval=2): no step was skipped
    assert_params_close(model, ref, rtol=1e-12, atol=1e-14)


def _overflow_step(inject_pass: int, value: float, base=torch.optim.AdamW):
    """A SAM step whose first or second pass gets an inf/NaN gradient, after one healthy step."""
    x, y = batch(n=16)
    model = make_mlp().float()
    x = x.float()
    opt = sam_of(model, base=base, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    sam_step(opt, model, ce, x, y, scaler=scaler)  # the base optimizer now has state (AdamW: step, moments)
    before = (params_of(model), copy.deepcopy(opt.state_dict()), scaler.get_scale())

    def pass_(n: int) -> None:
        scaler.scale(ce(model(x), y).mean()).backward()
        if n == inject_pass:
            model.fc2.weight.grad[0, 0] = value

    pass_(1)
    opt.first_step(zero_grad=True, scaler=scaler)
    pass_(2)
    stepped = opt.second_step(zero_grad=True, scaler=scaler)
    return model, opt, scaler, before, stepped


def _tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for key in sorted(tree, key=str) for t in _tensors(tree[key])]
    if isinstance(tree, (list, tuple)):
        return [t for item in tree for t in _tensors(item)]
    return []


def _torch_skip_reference(scale: float, value: float) -> dict:
    """What torch's own scaler does on a plain optimizer whose gradient overflows: its state after."""
    w = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    scaler.scale(w.sum()).backward()
    w.grad[0] = value
    scaler.step(opt)
    scaler.update()
    assert torch.equal(w.detach(), torch.ones(3))
    return scaler.state_dict()


@pytest.mark.parametrize("value", [math.inf, math.nan])
@pytest.mark.parametrize("inject_pass", [1, 2])
def test_an_overflow_in_either_pass_skips_the_step_and_touches_nothing(inject_pass, value):
    model, opt, scaler, (weights, state, scale), stepped = _overflow_step(inject_pass, value)
    assert not stepped
    assert all(torch.equal(a, b) for a, b in zip(params_of(model), weights, strict=True))
    after = opt.state_dict()
    assert after["base"]["param_groups"] == state["base"]["param_groups"]
    assert not _tensors(after["sam"]["state"]) and not _tensors(state["sam"]["state"])  # nothing left mid-step
    old, new = _tensors(state["base"]["state"]), _tensors(after["base"]["state"])
    assert len(old) == len(new) > 0 and all(torch.equal(a, b) for a, b in zip(old, new, strict=True))
    # the scaler backs off exactly as torch's own skipped step does (scale x 0.5, growth tracker reset)
    assert scaler.state_dict() == _torch_skip_reference(scale, value)
    # and the next step runs normally again
    x, y = batch(n=16)
    assert sam_step(opt, model, ce, x.float(), y, scaler=scaler)["skipped"] == 0.0
    assert not all(torch.equal(a, b) for a, b in zip(params_of(model), weights, strict=True))


def test_no_overflow_no_skip():
    model, opt, scaler, (weights, _, scale), stepped = _overflow_step(inject_pass=0, value=0.0)
    assert stepped and scaler.get_scale() == scale
    assert not all(torch.equal(a, b) for a, b in zip(params_of(model), weights, strict=True))


# bf16 keeps 8 significant bits (relative rounding 2^-9), fp16 11 bits: after 5 steps the weights may
# differ from fp32 by these fractions of the distance training moved them (measured: 0.2 % and 0.03 %).
AUTOCAST_TOLERANCE = {torch.bfloat16: 0.02, torch.float16: 0.005}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_chunk", [False, True])
def test_autocast_matches_fp32_within_the_stated_tolerance(dtype, per_chunk):
    x, y = batch(n=32)
    start = make_mlp().float()
    model, ref = copy.deepcopy(start), copy.deepcopy(start)
    opt, ref_opt = sam_of(model), sam_of(ref)
    scaler = torch.amp.GradScaler("cpu") if dtype == torch.float16 else None
    for _ in range(5):
        info = sam_step(opt, model, ce, x.float(), y, autocast=dtype, scaler=scaler, accumulate=4,
                        per_chunk=per_chunk)
        sam_step(ref_opt, ref, ce, x.float(), y, accumulate=4, per_chunk=per_chunk)
        assert info["skipped"] == 0.0 and math.isfinite(info["loss"])
    error = relative_displacement_error(model, ref, start)
    assert 0.0 < error < AUTOCAST_TOLERANCE[dtype], error  # > 0: the forwards really ran in low precision


# -- the engine's precision setting ---------------------------------------------------------------------
ENGINE_SETS = ["epochs=1", "data.n_train=256", "batch_size=32", "optim.method=sam", "optim.rho=0.1",
               "device=cpu", "checkpoint_every=0", "schedule.name=constant"]


@pytest.fixture(scope="module")
def engine_fp32():
    return run(preset("digits-mlp", ENGINE_SETS))


# 8 steps of the digits MLP (lr 0.1, momentum 0.9) amplify rounding more than the 5 steps above;
# measured: bf16 2.4 %, fp16 1.9 % of the distance the fp32 run moved.
@pytest.mark.parametrize(("precision", "tolerance"), [("bf16", 0.1), ("fp16", 0.05)])
def test_engine_precision_runs_the_mixed_precision_path_on_the_cpu(engine_fp32, precision, tolerance):
    torch.manual_seed(0)
    start = run(preset("digits-mlp", [*ENGINE_SETS, "optim.lr=1e-12"])).model  # the initial weights, to 1e-12
    result = run(preset("digits-mlp", [*ENGINE_SETS, f"precision={precision}"]))
    assert result.status == "completed"
    error = relative_displacement_error(result.model, engine_fp32.model, start)
    assert 0.0 < error < tolerance, error


def test_engine_fp16_records_the_scale_and_checkpoints_the_scaler(tmp_path):
    from samlab.reporting import Reporter

    class Recorder(Reporter):
        def __init__(self):
            super().__init__()
            self.rows = []

        def metrics(self, kind, step, values):
            self.rows.append(values)

    rec = Recorder()
    result = run(preset("digits-mlp", [*ENGINE_SETS, "precision=fp16", "checkpoint_every=1"]), rec, workdir=tmp_path)
    assert {row.get("skipped") for row in rec.rows if "loss_scale" in row} == {0.0}
    assert [row["loss_scale"] for row in rec.rows if "loss_scale" in row][-1] == 65536.0
    saved = torch.load(result.checkpoint, weights_only=True)
    assert saved["scaler"]["scale"] == 65536.0 and saved["scaler"]["_growth_tracker"] == 8


# -- gradient accumulation -------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["sam", "asam", "usam"])
@pytest.mark.parametrize("k", [2, 4])
def test_accumulation_is_sam_on_the_concatenated_batch(method, k):
    x, y = batch(n=16)
    model, ref = make_mlp(), make_mlp()
    opt = sam_of(model, method)
    for _ in range(3):
        sam_step(opt, model, ce, x, y, accumulate=k)
        reference_step(ref, x, y, method)
    assert_params_close(model, ref, rtol=1e-10, atol=1e-12)


def test_accumulation_with_batch_norm_in_eval_mode_is_sam_on_the_concatenated_batch():
    x, y = batch(n=16, shape=(1, 4, 4))
    model, ref = make_bn_net().eval(), make_bn_net().eval()
    sam_step(sam_of(model), model, ce, x, y, accumulate=4)
    reference_step(ref, x, y)
    assert_params_close(model, ref, rtol=1e-10, atol=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), ref.buffers()))


def _ghost_batch_norm_sam(x, y, k: int):
    """Oracle for train-mode BatchNorm: L(w) = mean_j L_{B_j}(w), each chunk normalised with its own
    statistics; eps from its gradient; descent at w + eps; running statistics from the k chunk
    forwards at w, one after another (on explicit model copies, with plain autograd)."""
    at_w = make_bn_net()
    sum(ce(at_w(xc), yc).mean() / k for xc, yc in zip(x.chunk(k), y.chunk(k))).backward()
    g = [p.grad for p in at_w.parameters()]
    norm = torch.sqrt(sum((t**2).sum() for t in g))
    perturbed = make_bn_net()
    with torch.no_grad():
        for p, t in zip(perturbed.parameters(), g):
            p.add_(RHO * t / norm)
    sum(ce(perturbed(xc), yc).mean() / k for xc, yc in zip(x.chunk(k), y.chunk(k))).backward()
    w = params_of(make_bn_net())
    return [a - LR * p.grad for a, p in zip(w, perturbed.parameters())], [b.clone() for b in at_w.buffers()]


def test_accumulation_with_train_mode_batch_norm_is_ghost_batch_sam():
    x, y = batch(n=16, shape=(1, 4, 4))
    model = make_bn_net()
    sam_step(sam_of(model), model, ce, x, y, accumulate=4)
    weights, buffers = _ghost_batch_norm_sam(x, y, 4)
    assert_params_close(params_of(model), weights, rtol=1e-10, atol=1e-12)
    for buf, expected in zip(model.buffers(), buffers, strict=True):
        torch.testing.assert_close(buf, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("impl", ["loop", "vmap"])
@pytest.mark.parametrize("bn", [False, True])
def test_per_chunk_perturbation_is_msam_with_m_the_chunk_size(impl, bn):
    shape = (1, 4, 4) if bn else (5,)
    x, y = batch(n=16, shape=shape)
    make = make_bn_net if bn else make_mlp
    model, ref = make(), make()
    opt = sam_of(model, "msam")
    for _ in range(3):
        sam_step(opt, model, ce, x, y, accumulate=4, per_chunk=True)
        reference_step(ref, x, y, "msam", m=4, impl=impl)
    assert_params_close(model, ref, rtol=1e-10, atol=1e-12)
    # and it is not SAM over the whole batch
    whole = make()
    for _ in range(3):
        reference_step(whole, x, y, "sam")
    assert not torch.allclose(params_of(model)[0], params_of(whole)[0], atol=1e-6)


def test_per_chunk_running_statistics_see_the_chunks_one_after_another():
    x, y = batch(n=16, shape=(1, 4, 4))
    model = make_bn_net()
    sam_step(sam_of(model), model, ce, x, y, accumulate=4, per_chunk=True)
    plain = make_bn_net()
    with torch.no_grad():
        for xc in x.chunk(4):
            plain(xc)
    for buf, expected in zip(model.buffers(), plain.buffers(), strict=True):
        torch.testing.assert_close(buf, expected, rtol=1e-12, atol=1e-14)


# -- clipping and schedulers ----------------------------------------------------------------------------
def test_clipping_acts_on_the_descent_gradient_only():
    """usam with clipping: eps = rho g from the unclipped g, the descent gradient d clipped to norm c."""
    x, y = batch(n=16)
    model, probe = make_mlp(), make_mlp()
    w = params_of(probe)
    sharpness_gradient(probe, ce, x, y, method="usam", rho=RHO)  # the unclipped descent gradient d
    d = [p.grad for p in probe.parameters()]
    d_norm = float(torch.sqrt(sum((t**2).sum() for t in d)))
    clip = 0.25 * d_norm
    sam_step(sam_of(model, "usam"), model, ce, x, y, clip_grad_norm=clip)
    expected = [a - LR * t * clip / (d_norm + 1e-6) for a, t in zip(w, d)]  # clip_grad_norm_'s coefficient
    assert_params_close(params_of(model), expected, rtol=1e-10, atol=1e-12)


def test_schedulers_step_once_per_sam_step():
    x, y = batch(n=16)
    model = make_mlp()
    opt = sam_of(model, "msam", base=torch.optim.AdamW, lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when a scheduler steps before its optimizer
        for _ in range(5):
            sam_step(opt, model, ce, x, y, accumulate=4, per_chunk=True)
            lrs.append(opt.base_optimizer.param_groups[0]["lr"])
            sched.step()
    assert lrs == pytest.approx([1e-2, 1e-2, 5e-3, 5e-3, 2.5e-3])
    steps = {float(s["step"]) for s in opt.base_optimizer.state_dict()["state"].values()}
    assert steps == {5.0}  # the base optimizer stepped once per SAM step, not once per micro-batch


# -- BatchNorm statistics and state_dict ----------------------------------------------------------------
def _two_step(model: nn.Module, opt: SAM, x, y) -> None:
    ce(model(x), y).mean().backward()
    opt.first_step(zero_grad=True)
    ce(model(x), y).mean().backward()
    opt.second_step(zero_grad=True)


def test_batch_norm_statistics_come_from_the_unperturbed_pass_only():
    """One update with momentum a: r <- (1 − a) r + a * (statistic of the batch at w), counted once."""
    x, y = batch(n=8, shape=(1, 4, 4))
    model = make_bn_net()
    a = model.bn.momentum
    r_mean, r_var = model.bn.running_mean.clone(), model.bn.running_var.clone()
    with torch.no_grad():
        features = model.conv(x).transpose(0, 1).flatten(1)  # channels x (N * H * W), at w
    _two_step(model, SAM(model.parameters(), torch.optim.SGD, rho=RHO, model=model, lr=LR), x, y)
    torch.testing.assert_close(model.bn.running_mean, (1 - a) * r_mean + a * features.mean(1))
    torch.testing.assert_close(model.bn.running_var, (1 - a) * r_var + a * features.var(1, unbiased=True))
    assert int(model.bn.num_batches_tracked) == 1
    # without model= the class cannot see the buffers: the perturbed pass updates them a second time
    unaware = make_bn_net()
    _two_step(unaware, SAM(unaware.parameters(), torch.optim.SGD, rho=RHO, lr=LR), x, y)
    assert int(unaware.bn.num_batches_tracked) == 2
    assert not torch.allclose(unaware.bn.running_mean, model.bn.running_mean)
    assert_params_close(unaware, model, rtol=0, atol=0)  # the weights do not depend on it


def _training(model, opt, scaler, x, y, steps):
    for _ in range(steps):
        sam_step(opt, model, ce, x, y, accumulate=2, scaler=scaler)


@pytest.mark.parametrize("method", ["sam", "usam", "asam"])
def test_state_dict_round_trip_restores_identical_next_steps(method):
    x, y = batch(n=8, shape=(1, 4, 4))
    x = x.float()

    def fresh(seed=0):
        model = make_bn_net(seed).float()
        opt = SAM([{"params": [model.conv.weight, model.conv.bias], "rho": 0.1},
                   {"params": [p for n, p in model.named_parameters() if not n.startswith("conv.")]}],
                  torch.optim.AdamW, rho=RHO, method=method, model=model, lr=1e-2, weight_decay=1e-3)
        return model, opt, torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)

    straight, opt, scaler = fresh()
    _training(straight, opt, scaler, x, y, 6)

    first, opt1, scaler1 = fresh()
    _training(first, opt1, scaler1, x, y, 3)
    saved = copy.deepcopy({"model": first.state_dict(), "opt": opt1.state_dict(), "scaler": scaler1.state_dict()})
    resumed, opt2, scaler2 = fresh(seed=7)
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    scaler2.load_state_dict(saved["scaler"])
    _training(resumed, opt2, scaler2, x, y, 3)
    for p, q in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    for p, q in zip(straight.buffers(), resumed.buffers(), strict=True):
        assert torch.equal(p, q)
    assert opt2.param_groups[0]["rho"] == 0.1 and opt2.param_groups[1]["rho"] == RHO


def test_state_dict_between_the_two_steps_keeps_the_unperturbed_weights():
    x, y = batch(n=8)
    model = make_mlp()
    opt = sam_of(model, momentum=0.9)
    _two_step(model, opt, x, y)
    ce(model(x), y).mean().backward()
    w = params_of(model)
    opt.first_step(zero_grad=True)
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    ce(model(x), y).mean().backward()
    opt.second_step(zero_grad=True)

    other = make_mlp(seed=3)
    other.load_state_dict(saved["model"])
    other_opt = sam_of(other, momentum=0.9)
    other_opt.load_state_dict(saved["opt"])
    assert not all(torch.equal(a, b) for a, b in zip(params_of(other), w))  # perturbed weights were saved
    ce(other(x), y).mean().backward()
    other_opt.second_step(zero_grad=True)
    for p, q in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(p, q)


# -- every method of the family through the class ----------------------------------------------------------
def test_every_perturbing_method_runs_through_the_class():
    assert set(SAM_METHODS) == {"sam", "asam", "usam", "nsam", "msam", "rwsam"}
    x, y = batch(n=16)
    xp, yp = batch(n=24, seed=5)
    lam = 2.0
    for method in SAM_METHODS:
        model, ref = make_mlp(), make_mlp()
        opt = sam_of(model, method)
        if method == "msam":
            sam_step(opt, model, ce, x, y, accumulate=4, per_chunk=True)
            reference_step(ref, x, y, method, m=4)
        else:
            if method == "nsam":  # the first pass: the independent batch
                ce(model(xp), yp).mean().backward()
            elif method == "rwsam":  # the first pass: sum_i p_i f_i, p = softmax(lam * s)
                p = torch.softmax(lam * sample_scores(model, ce, x, y, estimator="exact"), 0)
                (ce(model(x), y) @ p).backward()
            else:
                ce(model(x), y).mean().backward()
            opt.first_step(zero_grad=True)
            ce(model(x), y).mean().backward()
            opt.second_step(zero_grad=True)
            reference_step(ref, x, y, method, perturb_batch=(xp, yp), lam=lam, estimator="exact")
        assert_params_close(model, ref, rtol=1e-10, atol=1e-12, msg=method)


# -- boundaries ------------------------------------------------------------------------------------------
def test_bad_arguments_name_the_field():
    model, (x, y) = make_mlp(), batch(n=8)
    opt = sam_of(model)
    with pytest.raises(ValueError, match="^accumulate:"):
        sam_step(opt, model, ce, x, y, accumulate=3)
    with pytest.raises(ValueError, match="^autocast:"):
        sam_step(opt, model, ce, x, y, autocast=torch.float64)
    with pytest.raises(ValueError, match="^optimizer:"):
        sam_step(torch.optim.SGD(model.parameters(), lr=LR), model, ce, x, y)
    with pytest.raises(ValueError, match="^clip_grad_norm:"):
        sam_step(opt, model, ce, x, y, clip_grad_norm=0.0)
    with pytest.raises(ValueError, match="^method:"):
        SAM(model.parameters(), torch.optim.SGD, method="sgd", lr=LR)
    with pytest.raises(ValueError, match="^adaptive:"):
        SAM(model.parameters(), torch.optim.SGD, adaptive=True, method="usam", lr=LR)
    with pytest.raises(ValueError, match="^model:"):
        SAM(model.parameters(), torch.optim.SGD, model="net", lr=LR)
    ce(model(x), y).mean().backward()
    opt.first_step(zero_grad=True)
    ce(model(x), y).mean().backward()
    with pytest.raises(ValueError, match="^first_step: the weights are still perturbed"):
        opt.first_step()
    mixed = SAM([{"params": [model.fc1.weight], "method": "usam"}, {"params": [model.fc2.weight]}],
                torch.optim.SGD, lr=LR)
    ce(model(x), y).mean().backward()
    with pytest.raises(ValueError, match="^method: every param group"):
        mixed.first_step()


@pytest.mark.parametrize(
    ("sets", "field"),
    [
        (["optim.accumulate=3"], "optim.accumulate"),
        (["optim.accumulate=0"], "optim.accumulate"),
        (["optim.accumulate=2", "optim.method=rwsam"], "optim.accumulate"),
        (["optim.accumulate=2", "optim.method=msam", "optim.m=4"], "optim.accumulate"),
        (["precision=fp16", "optim.method=nsam"], "precision"),
        (["precision=fp64"], "precision"),
    ],
)
def test_engine_config_checks_name_the_field(sets, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        preset("digits-mlp", ["batch_size=32", *sets])


def test_data_parallel_runs_refuse_the_class_path():
    from samlab.distributed import check_parallel_config

    with pytest.raises(ValueError, match="^optim.accumulate: data-parallel"):
        check_parallel_config(preset("digits-mlp", ["batch_size=32", "optim.method=sam", "optim.accumulate=2"]), 2)
    with pytest.raises(ValueError, match="^precision: data-parallel"):
        check_parallel_config(preset("digits-mlp", ["batch_size=32", "optim.method=sam", "precision=fp16"]), 2)


def test_engine_accumulation_equals_one_batch():
    one = run(preset("digits-mlp", ENGINE_SETS))
    four = run(preset("digits-mlp", [*ENGINE_SETS, "optim.accumulate=4"]))
    assert_params_close(one.model, four.model, rtol=1e-5, atol=1e-6)
    assert four.summary["final_test_acc"] == pytest.approx(one.summary["final_test_acc"], abs=1e-9)
