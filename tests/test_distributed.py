"""Data-parallel SAM on CPU with gloo and 2 real processes, against single-process m-SAM.

Oracle: with each rank perturbing with its own shard's gradient, the averaged step over the global
batch is m-SAM with m = per-rank batch (samlab.optim.sharpness_gradient, impl="loop", one process);
with synchronized perturbations it is plain SAM over the global batch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from samlab.config import preset
from samlab.distributed import DataParallel, check_parallel_config
from samlab.optim import SAM, sam_step, sharpness_gradient
from samlab.train import run
from tests.helpers import free_port
from tests.oracles import first_pass_gradient, msam_by_copies, sam_by_copy

REPO = Path(__file__).resolve().parent.parent
WORLD = 2
BATCH = 16
RHO = 0.2


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 5, generator=gen), torch.randint(0, 3, (BATCH,), generator=gen)


def _model(batch_norm: bool) -> nn.Module:
    torch.manual_seed(0)
    norm = [nn.BatchNorm1d(8)] if batch_norm else []
    return nn.Sequential(nn.Linear(5, 8), *norm, nn.Tanh(), nn.Linear(8, 3))


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, y, reduction="none")


def _one_step(dp: DataParallel, batch_norm: bool) -> dict:
    """One data-parallel SAM step on this rank, recording the gradient the first pass produced."""
    model = _model(batch_norm)
    x, y = dp.shard(*_data())
    seen: dict[str, list[torch.Tensor]] = {}

    def recording_hook(ascent):
        seen["first_pass"] = [g.clone() for g in ascent]
        out = dp.ascent_hook(ascent) if dp.ascent_hook is not None else ascent
        seen["perturbed_with"] = [g.clone() for g in out]
        return out

    info = dp.average(model, sharpness_gradient(model, _loss, x, y, method="sam", rho=RHO,
                                                ascent_hook=recording_hook))
    grads = [p.grad.clone() for p in model.parameters()]
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    return {**seen, "grads": grads, "params": [p.detach().clone() for p in model.parameters()],
            "buffers": [b.clone() for b in model.buffers()], "info": info}


def _rank_main(rank: int, port: int, out_dir: str, body) -> None:
    """One rank of a gloo group: saves what body(rank) returns."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.save(body(rank), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run_ranks(tmp_path_factory, body) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    # fork, not spawn: the ranks start from this process's imports in a fraction of the time
    mp.start_processes(_rank_main, args=(free_port(), str(out), body), nprocs=WORLD, join=True, start_method="fork")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _data_parallel_steps(rank: int) -> dict:
    results = {f"{mode}{'_bn' if bn else ''}": _one_step(DataParallel(sync_perturbation=mode == "sync"), bn)
               for mode in ("own", "sync") for bn in (False, True)}
    results["stop"] = [DataParallel().agree_stop(asked=rank == 1), DataParallel().agree_stop(asked=False)]
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return _run_ranks(tmp_path_factory, _data_parallel_steps)


def _close(a: list[torch.Tensor], b: list[torch.Tensor], atol: float = 1e-6) -> bool:
    return all(torch.allclose(u, v, atol=atol, rtol=1e-5) for u, v in zip(a, b, strict=True))


def _oracle(method: str, **kw) -> list[torch.Tensor]:
    model = _model(batch_norm=False)
    x, y = _data()
    sharpness_gradient(model, _loss, x, y, method=method, rho=RHO, **kw)
    return [p.grad for p in model.parameters()]


def test_first_pass_gradients_differ_across_ranks_and_parameters_agree_after_the_step(ranks):
    r0, r1 = ranks[0]["own"], ranks[1]["own"]
    assert not _close(r0["first_pass"], r1["first_pass"], atol=1e-4)  # each rank: its own shard
    assert not _close(r0["perturbed_with"], r1["perturbed_with"], atol=1e-4)  # ... and perturbs with it
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(r0["grads"], r1["grads"], strict=True))


def test_the_averaged_step_is_single_process_msam_with_m_the_per_rank_batch(ranks):
    expected = _oracle("msam", m=BATCH // WORLD, impl="loop")
    assert _close(ranks[0]["own"]["grads"], expected)
    # the metrics are the means over ranks: the global batch's unperturbed loss
    model, (x, y) = _model(False), _data()
    assert ranks[0]["own"]["info"]["loss"] == pytest.approx(_loss(model(x), y).mean().item(), abs=1e-6)
    assert ranks[0]["own"]["info"] == ranks[1]["own"]["info"]
    # and it is not plain SAM over the global batch
    assert not _close(ranks[0]["own"]["grads"], _oracle("sam"), atol=1e-4)


def test_synchronized_perturbation_is_plain_sam_over_the_global_batch(ranks):
    r0, r1 = ranks[0]["sync"], ranks[1]["sync"]
    assert not _close(r0["first_pass"], r1["first_pass"], atol=1e-4)
    assert _close(r0["perturbed_with"], r1["perturbed_with"], atol=0.0)  # one eps for every rank
    model, (x, y) = _model(False), _data()
    full = torch.autograd.grad(_loss(model(x), y).mean(), list(model.parameters()))
    assert _close(r0["perturbed_with"], list(full))
    assert _close(r0["grads"], _oracle("sam"))
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"], strict=True))


def test_batch_norm_statistics_stay_per_rank(ranks):
    for mode in ("own_bn", "sync_bn"):
        r0, r1 = ranks[0][mode], ranks[1][mode]
        assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"], strict=True))
        running_mean0, running_mean1 = r0["buffers"][0], r1["buffers"][0]
        assert not torch.allclose(running_mean0, running_mean1)  # each rank saw its own shard


def _shards() -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = _data()
    per = BATCH // WORLD
    return [(x[r * per:(r + 1) * per], y[r * per:(r + 1) * per]) for r in range(WORLD)]


def test_batch_norm_steps_match_deep_copies_perturbed_in_place(ranks):
    """Independent oracle (tests/oracles.py): one deep copy per shard in train mode, perturbed in place."""
    model = _model(batch_norm=True)
    # each rank perturbs with its own shard's gradient: m-SAM with m = the per-rank batch
    own, _ = msam_by_copies(model, _loss, *_data(), rho=RHO, m=BATCH // WORLD)
    assert _close(ranks[0]["own_bn"]["grads"], own)
    # synchronized: one eps from the mean of the shards' first-pass gradients (each with its shard's statistics)
    firsts = [first_pass_gradient(model, _loss, x, y) for x, y in _shards()]
    ascent = [torch.stack(gs).mean(0) for gs in zip(*firsts)]
    assert _close(ranks[0]["sync_bn"]["perturbed_with"], ascent)
    parts = [sam_by_copy(model, _loss, x, y, RHO, ascent=ascent) for x, y in _shards()]
    assert _close(ranks[0]["sync_bn"]["grads"], [torch.stack(gs).mean(0) for gs in zip(*(p[0] for p in parts))])
    # and each rank's running statistics are those of one plain forward of its shard
    for rank, (_, buffers) in enumerate(parts):
        for mode in ("own_bn", "sync_bn"):
            for got, want in zip(ranks[rank][mode]["buffers"], buffers.values(), strict=True):
                torch.testing.assert_close(got, want, msg=f"rank {rank} {mode}")


def test_a_stop_asked_on_one_rank_stops_every_rank(ranks):
    assert ranks[0]["stop"] == [True, False] and ranks[1]["stop"] == [True, False]


def test_parallel_config_checks_name_the_field():
    cfg = preset("digits-mlp", ["batch_size=30", "optim.method=msam", "optim.m=5", "optim.rho=0.1"])
    with pytest.raises(ValueError, match="batch_size: 30 must be divisible"):
        check_parallel_config(cfg, 4)
    with pytest.raises(ValueError, match="optim.m: m=10 must divide the per-process batch 15"):
        check_parallel_config(cfg.with_overrides({"batch_size": 60, "optim.m": 10}), 4)
    assert check_parallel_config(cfg.with_overrides({"batch_size": 60}), 4).batch_size == 60
    with pytest.raises(ValueError, match="nproc"):
        check_parallel_config(cfg, 0)
    with pytest.raises(ValueError, match="not initialized"):
        DataParallel()
    x, y = _data()
    with pytest.raises(ValueError, match="ascent_hook: transforms a single perturbation"):
        sharpness_gradient(_model(False), _loss, x, y, method="msam", m=4, rho=RHO, ascent_hook=lambda g: g)
    with pytest.raises(ValueError, match="ascent_hook: must be a callable"):
        sharpness_gradient(_model(False), _loss, x, y, method="sam", rho=RHO, ascent_hook=3)


# -- the SAM class under DistributedDataParallel ----------------------------------------------------------
LR = 0.5


def _ddp_sam_step(case: str) -> dict:
    """One step of the SAM class on this rank's shard, the model wrapped in DistributedDataParallel."""
    model = nn.parallel.DistributedDataParallel(_model(batch_norm=False))
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, model=model, lr=LR)
    x, y = DataParallel().shard(*_data())
    out = {}
    if case in ("helper", "backward_only"):
        if case == "helper":
            with opt.no_sync():  # forward and backward
                _loss(model(x), y).mean().backward()
        else:  # the usual mistake: DDP decided at forward time to synchronize this backward
            losses = _loss(model(x), y)
            with opt.no_sync():
                losses.mean().backward()
        out["first_pass"] = [p.grad.clone() for p in model.parameters()]
        opt.first_step(zero_grad=True)
        _loss(model(x), y).mean().backward()
        opt.second_step()
    else:
        sam_step(opt, model, _loss, x, y, accumulate=2, per_chunk=case == "per_chunk")
    out["params"] = [p.detach().clone() for p in model.parameters()]
    return out


def _sam_class_steps(rank: int) -> dict:
    return {case: _ddp_sam_step(case) for case in ("helper", "backward_only", "accumulate", "per_chunk")}


@pytest.fixture(scope="module")
def ddp_ranks(tmp_path_factory) -> list[dict]:
    return _run_ranks(tmp_path_factory, _sam_class_steps)


def _after_step(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach() - LR * g for p, g in zip(_model(False).parameters(), grads, strict=True)]


def test_no_sync_keeps_the_first_pass_per_replica_and_the_step_is_msam(ddp_ranks):
    r0, r1 = ddp_ranks[0]["helper"], ddp_ranks[1]["helper"]
    assert not _close(r0["first_pass"], r1["first_pass"], atol=1e-4)  # each replica: its own shard
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"], strict=True))
    assert _close(r0["params"], _after_step(_oracle("msam", m=BATCH // WORLD, impl="loop")))


def test_wrapping_only_the_backward_still_synchronizes_the_first_pass(ddp_ranks):
    r0, r1 = ddp_ranks[0]["backward_only"], ddp_ranks[1]["backward_only"]
    assert _close(r0["first_pass"], r1["first_pass"], atol=0.0)  # all-reduced: one perturbation for all
    assert _close(r0["params"], _after_step(_oracle("sam")))  # plain SAM over the global batch


def test_sam_step_under_ddp_accumulates_before_the_one_all_reduce(ddp_ranks):
    per_rank = BATCH // WORLD
    for case, m in (("accumulate", per_rank), ("per_chunk", per_rank // 2)):
        r0, r1 = ddp_ranks[0][case], ddp_ranks[1][case]
        assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"], strict=True)), case
        assert _close(r0["params"], _after_step(_oracle("msam", m=m, impl="loop"))), case


@pytest.mark.slow
def test_torchrun_training_equals_single_process_msam(tmp_path):
    """`python -m samlab train --nproc 2` (torchrun, gloo) ends with the weights of one-process m-SAM."""
    sets = ["epochs=1", "data.n_train=128", "batch_size=32", "optim.method=sam", "optim.rho=0.1",
            "device=cpu", "log_every=1"]
    command = [sys.executable, "-m", "samlab", "train", "--preset", "digits-mlp", "--nproc", "2",
               "--workdir", str(tmp_path / "ddp"), "--json"]
    for item in sets:
        command += ["--set", item]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["status"] == "completed" and summary["steps"] == 4
    single = preset("digits-mlp", [*sets, "optim.method=msam", "optim.m=16", "optim.impl=loop"])
    result = run(single, workdir=tmp_path / "single")
    ddp = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)["model"]
    one = torch.load(result.checkpoint, weights_only=True)["model"]
    assert ddp.keys() == one.keys()
    for key in one:
        torch.testing.assert_close(ddp[key], one[key], atol=1e-5, rtol=1e-5)
    assert summary["final_test_acc"] == pytest.approx(result.summary["final_test_acc"], abs=1e-6)
