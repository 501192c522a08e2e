"""SAM against hand-written updates: rho=0 is AdamW, rho>0 is the two-pass update.

The reference side of each test uses plain autograd and a plain AdamW on a copy of
the model; BatchNorm statistics are saved and restored by hand around pass two.
"""

from __future__ import annotations

import copy

import pytest
import torch

from detector_core.method.losses import detector_loss
from detector_core.method.model import DetectorMLP
from detector_core.method.sam import SAM, bn_stats_frozen
from detector_core.method.training import OptimConfig, build_optimizer, build_scheduler, training_step

ADAMW = dict(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.01)


def _data(seed=0, n=64, d=12):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    y = (x[:, 0] + 0.5 * torch.randn(n, generator=gen) > 0).long()
    return x, y


def _model(d=12, seed=0):
    torch.manual_seed(seed)
    return DetectorMLP(d, hidden_dim=16, dropout=0.0).double()


def _loss(model, x, y):
    return detector_loss(model(x.double()), y, kind="cvar_auc")


def _bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def test_rho_zero_equals_adamw():
    x, y = _data()
    sam_model, ref_model = _model(), _model()
    cfg = OptimConfig(rho=0.0, lr=ADAMW["lr"], sam=True)
    sam_opt = build_optimizer(sam_model, cfg)
    ref_opt = torch.optim.AdamW(ref_model.parameters(), **ADAMW)
    for _ in range(5):
        training_step(sam_model, sam_opt, x.double(), y, cfg)
        ref_opt.zero_grad()
        _loss(ref_model, x, y).backward()
        ref_opt.step()
    for (name, a), b in zip(sam_model.state_dict().items(), ref_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_two_pass_update_matches_hand_written():
    x, y = _data(1)
    rho = 0.05
    sam_model, ref_model = _model(seed=1), _model(seed=1)
    cfg = OptimConfig(rho=rho, lr=ADAMW["lr"], sam=True)
    sam_opt = build_optimizer(sam_model, cfg)
    ref_opt = torch.optim.AdamW(ref_model.parameters(), **ADAMW)
    params = list(ref_model.parameters())
    for _ in range(4):
        training_step(sam_model, sam_opt, x.double(), y, cfg)

        ref_opt.zero_grad()
        _loss(ref_model, x, y).backward()
        g1 = [p.grad.clone() for p in params]
        norm = torch.sqrt(sum((g * g).sum() for g in g1))
        saved_w = [p.detach().clone() for p in params]
        saved_bn = _bn_state(ref_model)
        with torch.no_grad():
            for p, g in zip(params, g1):
                p.add_(rho * g / (norm + 1e-12))
        ref_opt.zero_grad()
        _loss(ref_model, x, y).backward()
        with torch.no_grad():
            for p, w in zip(params, saved_w):
                p.copy_(w)
        ref_model.load_state_dict({**ref_model.state_dict(), **saved_bn})
        ref_opt.step()
    # Biases of Linear layers that feed BatchNorm get a ~1e-17 gradient (BN removes
    # them), which AdamW's normalisation turns into ~1e-10 noise; a wrong update moves
    # weights by ~lr = 1e-2, so 1e-8 still tells the two apart.
    for (name, a), b in zip(sam_model.state_dict().items(), ref_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-8, msg=name)


def test_perturbation_is_rho_along_gradient():
    x, y = _data(2)
    model = _model(seed=2)
    opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.1, **ADAMW)
    before = [p.detach().clone() for p in model.parameters()]
    _loss(model, x, y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.first_step()
    e = [p.detach() - b for p, b in zip(model.parameters(), before)]
    e_norm = torch.sqrt(sum((t * t).sum() for t in e))
    assert float(e_norm) == pytest.approx(0.1, rel=1e-9)
    cos = sum((a * b).sum() for a, b in zip(e, grads)) / (e_norm * torch.sqrt(sum((g * g).sum() for g in grads)))
    assert float(cos) == pytest.approx(1.0, rel=1e-9)
    opt.second_step()
    # Back at w before AdamW moved it: the update is AdamW's alone, checked above.


def test_batchnorm_statistics_move_in_pass_one_only():
    x, y = _data(3)
    model, probe = _model(seed=3), _model(seed=3)
    cfg = OptimConfig(rho=0.5, lr=1e-2, sam=True)
    training_step(model, build_optimizer(model, cfg), x.double(), y, cfg)
    probe.train()
    with torch.no_grad():
        probe(x.double())  # exactly one BN update at the initial weights
    for k, v in _bn_state(probe).items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_bn_stats_frozen_restores_momentum_and_counter():
    model = _model()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    bns[0].momentum = None  # cumulative average mode
    before = _bn_state(model)
    with bn_stats_frozen(model):
        model(torch.randn(8, 12).double())
    for k, v in _bn_state(model).items():
        assert torch.equal(v, before[k]), k
    assert bns[0].momentum is None and bns[1].momentum == 0.1


def test_state_dict_round_trip_resumes_exactly():
    x, y = _data(4)
    cfg = OptimConfig(rho=0.05, lr=1e-2, sam=True, epochs=8)
    model = _model(seed=4)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    for _ in range(3):
        training_step(model, opt, x.double(), y, cfg)
        sched.step()
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    assert any("exp_avg" in s for s in ckpt["opt"]["state"].values()), "AdamW moments missing from SAM state"

    resumed = _model(seed=99)
    r_opt = build_optimizer(resumed, cfg)
    r_sched = build_scheduler(r_opt, cfg)
    resumed.load_state_dict(ckpt["model"])
    r_opt.load_state_dict(ckpt["opt"])
    r_sched.load_state_dict(ckpt["sched"])
    for _ in range(2):
        training_step(model, opt, x.double(), y, cfg)
        sched.step()
        training_step(resumed, r_opt, x.double(), y, cfg)
        r_sched.step()
    assert r_opt.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    assert r_opt.param_groups is r_opt.base_optimizer.param_groups
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_dnf_reference_recipe_pieces():
    """Adam for the recipe; each row flipped or not, about half; PlateauStop's lr sequence on a hand-made accuracy curve."""
    from detector_core.method.training import RECIPE_OPTIM, PlateauStop, random_hflip

    model = torch.nn.Linear(4, 1)
    opt = build_optimizer(model, OptimConfig(**{k: v for k, v in RECIPE_OPTIM["dnf-reference"].items() if k != "batch_size"}))
    assert type(opt) is torch.optim.Adam and opt.param_groups[0]["lr"] == 1e-4 and opt.param_groups[0]["weight_decay"] == 0.0

    x = torch.randn(400, 3 * 2 * 5)
    y = random_hflip(x, (3, 2, 5), torch.Generator().manual_seed(0)).view(400, 3, 2, 5)
    images = x.view(400, 3, 2, 5)
    flipped = torch.tensor([torch.equal(y[i], images[i].flip(-1)) for i in range(400)])
    kept = torch.tensor([torch.equal(y[i], images[i]) for i in range(400)])
    assert bool((flipped ^ kept).all()) and 150 < int(flipped.sum()) < 250

    # patience 2: 0.5, 0.6 (better), 0.6005 (not by > 0.001), 0.6 -> cut to 1e-5 and a fresh stopper with margin
    # 0.002; 0.61 (its first: best), 0.611 (not by > 0.002), 0.611 -> cut to 1e-6; 0.7, 0.7, 0.7 -> 1e-7 < 1e-6: stop.
    stop, lr, seen = PlateauStop(patience=2), 1e-4, []
    for acc in (0.5, 0.6, 0.6005, 0.6, 0.61, 0.611, 0.611, 0.7, 0.7, 0.7):
        lr, done = stop.step(acc, lr)
        seen.append((lr, done))
    assert [round(v, 12) for v, _ in seen] == [1e-4, 1e-4, 1e-4, 1e-5, 1e-5, 1e-5, 1e-6, 1e-6, 1e-6, 1e-7]
    assert [d for _, d in seen] == [False] * 9 + [True]
    restored = PlateauStop()
    restored.load_state_dict(stop.state_dict())
    assert restored.done and restored.margin == 0.002
