"""Two DDP workers (gloo, real processes) against one process on the same global batch.

The workers run exactly what a Ray Train worker runs (``batch_loss`` / ``training_step``
with ``all_gather_batch`` under DistributedDataParallel). The single-process side runs
the plain model on the whole global batch, split into the same two chunks for the
forward pass only, since BatchNorm uses per-worker statistics (jobs/train.py says why);
with dropout on, each chunk draws from its own worker's random stream (the workers seed
per rank, as jobs/train.py does), so the masks are the ones the workers drew. With
SyncBatchNorm (CUDA only in torch: two GPUs and NCCL) the single process is the plain model
on the whole batch, unchunked.
"""

from __future__ import annotations

import contextlib
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from detector_core.method.model import DetectorMLP
from detector_core.method.training import OptimConfig, all_gather_batch, batch_loss, build_optimizer, training_step

D, N, STEPS = 10, 48, 4


class Chunked(nn.Module):
    """Forward a batch as ``k`` chunks (one per simulated worker) and concatenate.

    Chunk ``r`` runs on worker ``r``'s random stream (``rank_seed(r)``, carried from call to
    call), so its dropout masks are the ones that worker draws.
    """

    def __init__(self, model: nn.Module, k: int) -> None:
        super().__init__()
        self.model, self.k = model, k
        self.states = []
        for r in range(k):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(rank_seed(r))
                self.states.append(torch.get_rng_state())

    def forward(self, x):
        out = []
        for r, c in enumerate(x.chunk(self.k)):
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(self.states[r])
                out.append(self.model(c))
                self.states[r] = torch.get_rng_state()
        return torch.cat(out)


def rank_seed(rank: int) -> int:
    return 1_000_003 + rank  # jobs/train.py: seed * 1_000_003 + rank, seed 1


def _data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS, N, D, generator=gen, dtype=torch.float64)
    y = (torch.rand(STEPS, N, generator=gen) < 0.7).double()
    torch.manual_seed(1)
    init = DetectorMLP(D, hidden_dim=16, dropout=0.0).double().state_dict()
    return x, y, init


def _worker(rank: int, world: int, port: int, out: str, unsynced_perturbation: bool, dropout: float = 0.0, sync_bn: bool = False) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if sync_bn else "gloo", rank=rank, world_size=world)
    try:
        x, y, init = _data()
        model = DetectorMLP(D, hidden_dim=16, dropout=dropout).double()
        model.load_state_dict(init)
        if sync_bn:
            x, y = x.cuda(rank), y.cuda(rank)
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model).cuda(rank)
        ddp = DDP(model, device_ids=[rank] if sync_bn else None)
        torch.manual_seed(rank_seed(rank))
        cfg = OptimConfig(sam=True, rho=0.05, lr=1e-2)
        b = N // world
        sl = slice(rank * b, (rank + 1) * b)
        # One plain backward: the averaged gradient of the global loss.
        batch_loss(ddp, x[0, sl], y[0, sl], cfg, all_gather_batch).backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        model.zero_grad()
        opt = build_optimizer(model, cfg)
        first = ddp.no_sync if unsynced_perturbation else contextlib.nullcontext
        for s in range(STEPS):
            training_step(ddp, opt, x[s, sl], y[s, sl], cfg, gather=all_gather_batch, first_pass_context=first)
        params = {k: p.detach().cpu() for k, p in model.named_parameters()}
        torch.save({"grads": {k: g.cpu() for k, g in grads.items()}, "params": params}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run(tmp_path, unsynced_perturbation: bool, dropout: float = 0.0, sync_bn: bool = False):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path), unsynced_perturbation, dropout, sync_bn), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _single_process(dropout: float = 0.0, whole_batch_bn: bool = False):
    x, y, init = _data()
    model = DetectorMLP(D, hidden_dim=16, dropout=dropout).double()
    model.load_state_dict(init)
    if whole_batch_bn:
        x, y, model = x.cuda(), y.cuda(), model.cuda()
    chunked = model if whole_batch_bn else Chunked(model, 2)
    cfg = OptimConfig(sam=True, rho=0.05, lr=1e-2)
    batch_loss(chunked, x[0], y[0], cfg).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    opt = build_optimizer(model, cfg)
    for s in range(STEPS):
        training_step(chunked, opt, x[s], y[s], cfg)
    return {k: g.cpu() for k, g in grads.items()}, {k: p.detach().cpu() for k, p in model.named_parameters()}


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_two_workers_give_the_single_process_gradient_and_sam_steps(tmp_path, dropout):
    ranks = _run(tmp_path, unsynced_perturbation=False, dropout=dropout)
    grads, params = _single_process(dropout)
    _same(ranks, grads, params)
    if dropout:  # the masks matter: the same steps without dropout end elsewhere
        _, plain = _single_process(0.0)
        assert max(float((params[k] - plain[k]).abs().max()) for k in params) > 1e-4


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="SyncBatchNorm needs CUDA: two GPUs and NCCL")
def test_sync_bn_workers_give_the_whole_batch_single_process(tmp_path):
    ranks = _run(tmp_path, unsynced_perturbation=False, sync_bn=True)
    grads, params = _single_process(whole_batch_bn=True)
    _same(ranks, grads, params)


def _same(ranks, grads, params):
    for r in ranks:
        for k in grads:
            torch.testing.assert_close(r["grads"][k], grads[k], rtol=1e-9, atol=1e-12, msg=f"gradient {k}")
        # AdamW's normalisation turns ~1e-17 gradients of pre-BN biases into ~1e-10 noise.
        for k in params:
            torch.testing.assert_close(r["params"][k], params[k], rtol=1e-7, atol=1e-8, msg=f"weights {k}")
    for k in params:
        assert torch.equal(ranks[0]["params"][k], ranks[1]["params"][k]), k


def test_unsynced_perturbation_keeps_workers_identical(tmp_path):
    ranks = _run(tmp_path, unsynced_perturbation=True)
    _, params = _single_process()
    for k in params:
        assert torch.equal(ranks[0]["params"][k], ranks[1]["params"][k]), k
    # the unsynced perturbation really differs from the global perturbation (so the test above has teeth).
    diff = max(float((ranks[0]["params"][k] - params[k]).abs().max()) for k in params)
    assert diff > 1e-6


def test_per_worker_loss_mean_is_not_the_global_loss():
    """Why the gather exists: mean of per-worker CVaR+AUC != CVaR+AUC of the global batch."""
    x, y, init = _data()
    model = DetectorMLP(D, hidden_dim=16, dropout=0.0).double()
    model.load_state_dict(init)
    cfg = OptimConfig()
    z = Chunked(model, 2)(x[0])
    from detector_core.method.losses import detector_loss

    whole = detector_loss(z, y[0])
    halves = (detector_loss(z[: N // 2], y[0, : N // 2]) + detector_loss(z[N // 2 :], y[0, N // 2 :])) / 2
    assert abs(float(whole) - float(halves)) > 1e-4
    assert cfg.loss == "cvar_auc"


@pytest.fixture(autouse=True)
def _no_ray_env(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
