"""The MLP's structure and that the full recipe (cvar_auc + SAM) learns.

Structure is checked layer by layer against docs/method.md section 2; learning on a
small separable synthetic set must reach a held-out AUC above 0.99 in seconds on CPU.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from detector_core.method.metrics import roc_auc
from detector_core.method.model import DetectorMLP
from detector_core.method.training import OptimConfig, fit, predict_logits


def test_structure_matches_the_paper():
    m = DetectorMLP(1536)
    layers = list(m.body)
    assert len(layers) == 12
    for i in range(3):
        lin, bn, act, drop = layers[4 * i : 4 * i + 4]
        assert isinstance(lin, nn.Linear) and lin.in_features == 1536 and lin.out_features == 1536
        assert isinstance(bn, nn.BatchNorm1d) and bn.num_features == 1536
        assert isinstance(act, nn.LeakyReLU) and act.negative_slope == 0.01
        assert isinstance(drop, nn.Dropout) and drop.p == 0.335
    assert m.head.in_features == 1536 and m.head.out_features == 1
    assert m(torch.randn(4, 1536)).shape == (4,)


def test_kaiming_uniform_bounds():
    m = DetectorMLP(256)
    bound = (6.0 / 256) ** 0.5  # kaiming_uniform, fan_in, gain sqrt(2)
    for lin in (m.body[0], m.head):
        w = lin.weight
        assert float(w.detach().abs().max()) <= bound
        assert float(w.detach().abs().max()) > 0.9 * bound
        assert float(w.detach().std()) == __import__("pytest").approx(bound / 3**0.5, rel=0.1)


def test_rejects_wrong_width():
    m = DetectorMLP(8)
    try:
        m(torch.randn(2, 9))
    except ValueError as exc:
        assert "(n, 8)" in str(exc)
    else:
        raise AssertionError("expected a ValueError")


def test_cvar_auc_sam_learns_separable_set_quickly():
    gen = torch.Generator().manual_seed(0)
    d, n = 32, 3000
    u = torch.randn(d, generator=gen)
    u /= u.norm()
    x = torch.randn(n, d, generator=gen)
    y = (x @ u > 0).long()
    x = x + ((2 * y - 1) * 1.0)[:, None] * u  # a margin of 2 between the classes
    split = 2400
    start = time.time()
    cfg = OptimConfig(epochs=20, batch_size=128)  # paper defaults: cvar_auc, SAM, AdamW 1e-3
    assert cfg.loss == "cvar_auc" and cfg.sam
    model = fit(DetectorMLP(d), x[:split], y[:split], cfg, seed=0)
    elapsed = time.time() - start
    auc = roc_auc(y[split:].numpy(), predict_logits(model, x[split:]).numpy())
    assert auc > 0.99, auc
    assert elapsed < 60  # "within seconds": a generous bound that still catches a runaway loop
