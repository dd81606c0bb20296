"""The ghost-BatchNorm control (BatchNorm statistics per micro-batch, one perturbation) and RW-SAM's
weights, each against an oracle written here with plain torch.autograd and deep copies of the model."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from samlab.config import OptimConfig, RunConfig
from samlab.optim import sharpness_gradient
from samlab.optim.reweighted import DEFAULT_LAM, reweighting
from tests.test_optim import TinyBNNet as BNNet

RHO = 0.3
DTYPE = torch.float64


class PlainNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x.flatten(1))))


def ce(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


def make(cls=BNNet, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = cls().to(DTYPE)
    if isinstance(net, BNNet):
        with torch.no_grad():
            net.bn.running_mean.uniform_(-1, 1)
            net.bn.running_var.uniform_(0.5, 2)
    return net


def batch(n: int = 8, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 4, 4, generator=gen, dtype=DTYPE), torch.randint(0, 3, (n,), generator=gen)


def grads_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def oracle_ghost(model: nn.Module, x, y, m: int, rho: float = RHO) -> list[torch.Tensor]:
    """Each micro-batch through its own deep copy of the model (own BatchNorm statistics); one ε."""
    names = [n for n, _ in model.named_parameters()]

    def ghost_loss(weights):
        parts = []
        for j in range(0, x.shape[0], m):
            replica = copy.deepcopy(model)
            parts.append(ce(functional_call(replica, dict(zip(names, weights)), (x[j:j + m],)), y[j:j + m]))
        return torch.cat(parts).mean()

    w = [p.detach().clone().requires_grad_() for p in model.parameters()]
    g = torch.autograd.grad(ghost_loss(w), w)
    norm = torch.sqrt(sum((t ** 2).sum() for t in g))
    shifted = [(a + rho * t / norm).detach().requires_grad_() for a, t in zip(w, g)]
    return list(torch.autograd.grad(ghost_loss(shifted), shifted))


def test_ghostbn_matches_the_per_micro_batch_oracle():
    x, y = batch()
    model = make()
    expected = oracle_ghost(model, x, y, m=2)
    sharpness_gradient(model, ce, x, y, method="ghostbn", rho=RHO, m=2)
    for got, want in zip(grads_of(model), expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_ghostbn_with_m_equal_to_the_batch_is_sam():
    x, y = batch()
    sam, ghost = make(), make()
    a = sharpness_gradient(sam, ce, x, y, method="sam", rho=RHO)
    b = sharpness_gradient(ghost, ce, x, y, method="ghostbn", rho=RHO, m=8)
    for g_a, g_b in zip(grads_of(sam), grads_of(ghost)):
        assert torch.equal(g_a, g_b)
    assert a == b
    for buf_a, buf_b in zip(sam.buffers(), ghost.buffers()):
        assert torch.equal(buf_a, buf_b)


@pytest.mark.parametrize("m", [1, 2, 4])
def test_ghostbn_normalises_like_msam(m):
    """Same per-micro-batch statistics as m-SAM: the unperturbed losses and the running statistics agree,
    while the descent gradients differ (one perturbation against k of them)."""
    x, y = batch()
    msam, ghost = make(), make()
    a = sharpness_gradient(msam, ce, x, y, method="msam", rho=RHO, m=m, impl="loop")
    b = sharpness_gradient(ghost, ce, x, y, method="ghostbn", rho=RHO, m=m)
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-12)
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-10)  # ‖(1/k) Σ_j g_j‖ in both
    for buf_a, buf_b in zip(msam.buffers(), ghost.buffers()):
        torch.testing.assert_close(buf_a, buf_b, rtol=1e-12, atol=1e-14)
    assert not all(torch.allclose(g, h) for g, h in zip(grads_of(msam), grads_of(ghost)))


def test_ghostbn_without_batchnorm_is_sam_for_every_m():
    x, y = batch()
    sam, ghost = make(PlainNet), make(PlainNet)
    sharpness_gradient(sam, ce, x, y, method="sam", rho=RHO)
    sharpness_gradient(ghost, ce, x, y, method="ghostbn", rho=RHO, m=2)
    for g_a, g_b in zip(grads_of(sam), grads_of(ghost)):
        torch.testing.assert_close(g_a, g_b, rtol=1e-12, atol=1e-14)


def test_ghostbn_needs_m_dividing_the_batch():
    x, y = batch()
    with pytest.raises(ValueError, match="m: ghostbn needs"):
        sharpness_gradient(make(), ce, x, y, method="ghostbn", rho=RHO, m=3)
    with pytest.raises(ValueError, match="optim.m: ghostbn needs"):
        RunConfig.from_dict({"optim": {"method": "ghostbn"}}).validate()


# -- RW-SAM ----------------------------------------------------------------------------------------
def test_rwsam_weights_match_a_hand_computation():
    """p = softmax(λ s) for s = (1, 2, 4), λ = 0.5: exp(0.5), exp(1), exp(2) over their sum."""
    p = reweighting(torch.tensor([1.0, 2.0, 4.0], dtype=DTYPE), 0.5)
    total = math.exp(0.5) + math.exp(1.0) + math.exp(2.0)
    expected = [math.exp(0.5) / total, math.exp(1.0) / total, math.exp(2.0) / total]
    assert p.tolist() == pytest.approx(expected, rel=1e-12)
    assert reweighting(torch.tensor([3.0, 7.0], dtype=DTYPE), 0.0).tolist() == [0.5, 0.5]


def test_rwsam_ascent_weights_enter_only_the_perturbation():
    """With exact scores, RW-SAM = ∇L_B(w + ρ g_p/‖g_p‖), g_p = Σ p_i ∇f_i with p from the per-sample
    gradient norms computed one sample at a time here; the descent uses the uniform batch mean."""
    x, y = batch()
    net, lam = make(PlainNet), 0.7
    w = [p.detach().clone() for p in net.parameters()]
    names = [n for n, _ in net.named_parameters()]

    def losses_at(weights):
        return ce(functional_call(net, dict(zip(names, weights)), (x,)), y)

    norms = []
    for i in range(x.shape[0]):
        leaves = [t.clone().requires_grad_() for t in w]
        gi = torch.autograd.grad(losses_at(leaves)[i], leaves)
        norms.append(torch.sqrt(sum((t ** 2).sum() for t in gi)))
    p = torch.exp(lam * torch.stack(norms))
    p = p / p.sum()
    leaves = [t.clone().requires_grad_() for t in w]
    gp = torch.autograd.grad((losses_at(leaves) * p).sum(), leaves)
    norm = torch.sqrt(sum((t ** 2).sum() for t in gp))
    shifted = [(a + RHO * t / norm).requires_grad_() for a, t in zip(w, gp)]
    expected = torch.autograd.grad(losses_at(shifted).mean(), shifted)
    sharpness_gradient(net, ce, x, y, method="rwsam", rho=RHO, lam=lam, estimator="exact")
    for got, want in zip(grads_of(net), expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_rwsam_default_lambda_is_not_zero():
    assert DEFAULT_LAM > 0
    assert OptimConfig().lam == DEFAULT_LAM
