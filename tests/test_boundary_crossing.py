"""trajectory.boundary_crossing on a linear model, where the crossing is known in closed form."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from flatnb import attacks
from flatnb.curvature import closed_form
from flatnb.measure.trajectory import boundary_crossing
from flatnb.measure.trajectory import Recorder

D, K = 6, 3


class Linear(nn.Module):
    """phi = x (flattened), logits = W phi + b: the margin is piecewise linear along a segment."""

    def __init__(self, seed=0, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.head = nn.Linear(D, K).to(dtype)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(K, D, generator=g, dtype=dtype) * 3)
            self.head.bias.copy_(torch.randn(K, generator=g, dtype=dtype))

    def features(self, x):
        return x.flatten(1)

    def forward(self, x):
        return self.head(self.features(x))


def exact_crossing(model, a, b, y):
    """First s in [0, 1] with z_y(s) = max_{j != y} z_j(s): the smallest root of the linear
    g_j(s) = (z_y - z_j)(a + s (b - a)) over the j that reach zero on the segment."""
    W, c = model.head.weight.detach(), model.head.bias.detach()
    za, zb = a @ W.T + c, b @ W.T + c
    best = torch.ones(a.shape[0], dtype=a.dtype)
    for i in range(a.shape[0]):
        roots = []
        for j in range(K):
            if j == y[i]:
                continue
            g0, g1 = za[i, y[i]] - za[i, j], zb[i, y[i]] - zb[i, j]
            if g1 <= 0 < g0:
                roots.append(g0 / (g0 - g1))
        best[i] = min(roots)
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_crossing_matches_the_closed_form_on_a_linear_model(seed):
    model = Linear(seed).eval()
    g = torch.Generator().manual_seed(10 + seed)
    x = torch.rand(64, D, generator=g, dtype=torch.float64)
    y = model(x).argmax(1)
    r = attacks.pgd(model, x, y, eps=1.0, steps=8, step_size=0.2, clip=None, record=Recorder, record_inputs=True,
                    warn=False)
    tr = r.trajectory
    c = boundary_crossing(model, tr, y, iters=50)
    flipped = torch.nonzero(tr.flip_step >= 1)[:, 0]
    assert c.columns.numel() == flipped.numel() >= 10
    f = tr.flip_step[c.columns]
    a, b = tr.x[f - 1, c.columns], tr.x[f, c.columns]
    s_ref = exact_crossing(model, a, b, y[c.columns])
    torch.testing.assert_close(c.s, s_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(c.step, (f - 1).double() + s_ref, rtol=0, atol=1e-12)
    assert c.margin.abs().max() < 1e-9
    # curvature at the crossing, recomputed independently at the exact crossing point
    pts = a + (b - a) * s_ref[:, None]
    ref = closed_form(pts, model(pts).detach(), model.head.weight.detach())
    for name in ("kappa_sq", "kappa_neuron", "trace_h"):
        torch.testing.assert_close(getattr(c.terms, name), getattr(ref, name), rtol=1e-8, atol=1e-12)
    # the crossing lies between the last correct and the first wrong iterate
    assert bool(((c.step > f - 1) & (c.step <= f)).all())


def test_crossing_needs_iterates_and_handles_no_flips():
    model = Linear().eval()
    x = torch.rand(8, D, dtype=torch.float64)
    y = model(x).argmax(1)
    r = attacks.pgd(model, x, y, eps=1.0, steps=3, step_size=0.3, clip=None, record=Recorder, warn=False)
    with pytest.raises(ValueError, match="record_inputs"):
        boundary_crossing(model, r.trajectory, y)
    none = attacks.pgd(model, x, y, eps=0.0, steps=2, clip=None, record=Recorder, record_inputs=True, warn=False)
    c = boundary_crossing(model, none.trajectory, y)
    assert c.columns.numel() == 0 and c.terms.kappa_sq.numel() == 0
    with pytest.raises(ValueError, match="y must be"):
        boundary_crossing(model, none.trajectory, y[:3])
