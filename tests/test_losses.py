"""CVaR and the pairwise AUC loss against independent computations.

CVaR is checked against the minimum of its variational formula found by brute force
over lambda (the objective is piecewise linear and convex, so the minimum sits at one
of the losses), its gradient against autograd of that formula at the minimiser; the
AUC loss against an explicit double loop over (generated, real) pairs.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from detector_core.method.losses import cvar, detector_loss, pairwise_auc_loss


def variational_cvar(losses: torch.Tensor, alpha: float) -> tuple[float, float]:
    """(min value, argmin lambda) of lambda + 1/alpha * mean(max(l - lambda, 0)), brute force."""
    l = losses.double()
    grid = torch.cat([l, torch.linspace(float(l.min()) - 1, float(l.max()) + 1, 2001, dtype=torch.float64)])
    values = grid + torch.clamp(l[None, :] - grid[:, None], min=0).mean(1) / alpha
    i = int(torch.argmin(values))
    return float(values[i]), float(grid[i])


@pytest.mark.parametrize("n", [1, 2, 5, 7, 10, 33, 128])
@pytest.mark.parametrize("alpha", [0.05, 0.3, 0.5, 0.7, 0.8, 1.0])
def test_cvar_matches_variational_minimum(n, alpha):
    gen = torch.Generator().manual_seed(n * 1000 + int(alpha * 100))
    losses = torch.rand(n, generator=gen, dtype=torch.float64) * 3
    expected, _ = variational_cvar(losses, alpha)
    assert float(cvar(losses, alpha)) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_cvar_with_ties_and_fractional_alpha_n():
    losses = torch.tensor([2.0, 2.0, 2.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.0], dtype=torch.float64)
    for alpha in (0.1, 0.25, 0.4, 0.55, 0.8, 0.95):
        expected, _ = variational_cvar(losses, alpha)
        assert float(cvar(losses, alpha)) == pytest.approx(expected, rel=1e-9)


def test_cvar_hand_case_fractional():
    # n = 4, alpha = 0.6: m = 2.4, top two count fully, the third with weight 0.4.
    losses = torch.tensor([4.0, 1.0, 3.0, 2.0])
    assert float(cvar(losses, 0.6)) == pytest.approx((4 + 3 + 0.4 * 2) / 2.4)
    assert float(cvar(losses, 1.0)) == pytest.approx(2.5)


def test_cvar_gradient_matches_variational_gradient():
    gen = torch.Generator().manual_seed(3)
    for n, alpha in [(10, 0.8), (7, 0.5), (33, 0.3), (5, 1.0)]:
        losses = torch.rand(n, generator=gen, dtype=torch.float64).requires_grad_(True)
        (g,) = torch.autograd.grad(cvar(losses, alpha), losses)
        _, lam = variational_cvar(losses.detach(), alpha)
        # Gradient of the formula at its minimiser, with lambda held fixed (envelope theorem);
        # where lambda equals one of the losses that example carries the fractional remainder.
        l = losses.detach()
        above = (l > lam + 1e-12).double()
        expected = above / (alpha * n)
        at = (l - lam).abs() <= 1e-12
        if at.any():
            expected[at] = (1.0 - above.sum() / (alpha * n)) / at.sum()
        torch.testing.assert_close(g, expected, rtol=1e-9, atol=1e-12)


def test_cvar_runs_without_host_sync_semantics():
    # Works on a tensor that requires grad and keeps device and dtype.
    x = torch.rand(16, dtype=torch.float32, requires_grad=True)
    out = cvar(x, 0.8)
    assert out.dtype == torch.float32 and out.requires_grad


def test_cvar_rejects_bad_input():
    with pytest.raises(ValueError):
        cvar(torch.rand(4), 0.0)
    with pytest.raises(ValueError):
        cvar(torch.rand(4), 1.5)
    with pytest.raises(ValueError):
        cvar(torch.rand(2, 2), 0.5)


def double_loop_auc(z, y, eta, p):
    total, pairs = 0.0, 0
    for i, j in itertools.product(range(len(z)), repeat=2):
        if y[i] == 1 and y[j] == 0:
            total += max(eta - (z[i] - z[j]), 0.0) ** p
            pairs += 1
    return total / pairs if pairs else 0.0


@pytest.mark.parametrize("p", [1, 2, 3])
@pytest.mark.parametrize("seed", range(4))
def test_pairwise_auc_matches_double_loop(seed, p):
    gen = torch.Generator().manual_seed(seed)
    n = 40
    z = torch.randn(n, generator=gen, dtype=torch.float64) * (1 + 3 * seed)
    y = (torch.rand(n, generator=gen) < 0.7).long()
    z[:5] = z[5]  # ties
    expected = double_loop_auc(z.tolist(), y.tolist(), 0.6, p)
    assert float(pairwise_auc_loss(z, y, eta=0.6, p=p)) == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("p", [1, 2])
def test_pairwise_auc_gradient_matches_dense(p):
    gen = torch.Generator().manual_seed(7)
    z = (torch.randn(64, generator=gen, dtype=torch.float64) * 2).requires_grad_(True)
    y = (torch.rand(64, generator=gen) < 0.8).double()
    (g,) = torch.autograd.grad(pairwise_auc_loss(z, y, 0.6, p), z)
    zd = z.detach().clone().requires_grad_(True)
    diff = 0.6 - (zd[:, None] - zd[None, :])
    mask = y[:, None] * (1 - y)[None, :]
    dense = (diff.clamp_min(0) ** p * mask).sum() / mask.sum()
    (gd,) = torch.autograd.grad(dense, zd)
    torch.testing.assert_close(g, gd, rtol=1e-9, atol=1e-12)


def test_pairwise_auc_float32_large_logits_stays_accurate():
    gen = torch.Generator().manual_seed(11)
    z = torch.randn(512, generator=gen) * 15
    y = (torch.rand(512, generator=gen) < 0.8).long()
    expected = double_loop_auc(z.double().tolist(), y.tolist(), 0.6, 2)
    assert float(pairwise_auc_loss(z, y)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("label", [0, 1])
def test_pairwise_auc_one_class_is_zero_not_nan(label):
    z = torch.randn(8, requires_grad=True)
    y = torch.full((8,), label)
    out = pairwise_auc_loss(z, y)
    assert float(out) == 0.0
    (g,) = torch.autograd.grad(out, z)
    assert torch.isfinite(g).all() and float(g.abs().sum()) == 0.0


def test_detector_loss_arms():
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(50, generator=gen, dtype=torch.float64)
    y = (torch.rand(50, generator=gen) < 0.6).long()
    bce = F.binary_cross_entropy_with_logits(z, y.double(), reduction="none")
    assert float(detector_loss(z, y, "erm")) == pytest.approx(float(bce.mean()))
    cv, _ = variational_cvar(bce, 0.8)
    assert float(detector_loss(z, y, "cvar", alpha=0.8)) == pytest.approx(cv)
    auc = double_loop_auc(z.tolist(), y.tolist(), 0.6, 2)
    for gamma in (0.0, 0.3, 1.0):
        assert float(detector_loss(z, y, "cvar_auc", alpha=0.8, gamma=gamma)) == pytest.approx(gamma * cv + (1 - gamma) * auc)
    with pytest.raises(ValueError):
        detector_loss(z, y, "focal")
