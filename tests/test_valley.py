"""flatnb.measure.crossing: boundary crossings by bisection, the refined valley shape and its nulls.

The crossing of a linear model is known in closed form (the margin is affine along a segment), and
κ there is checked in float64 against an independent computation of the closed form.
"""
import copy
import math

import pytest
import torch
import torch.nn as nn

from flatnb import attacks as fa
from flatnb.measure import crossing as valley
from flatnb.models import HeadModel
from flatnb.measure.trajectory import Recorder

torch.set_num_threads(1)


def _linear(k=3, d=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(d, k).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(k, d, generator=g, dtype=dtype))
        head.bias.copy_(torch.randn(k, generator=g, dtype=dtype))
    return HeadModel(nn.Identity(), head).eval()


def test_crossing_of_a_two_class_linear_model_is_the_closed_form():
    model = _linear(k=2, d=5, seed=1)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(64, 5, generator=g, dtype=torch.float64)
    x1 = torch.randn(64, 5, generator=g, dtype=torch.float64)
    W, b = model.head.weight, model.head.bias
    z0, z1 = x0 @ W.T + b, x1 @ W.T + b
    y = z0.argmax(1)
    cross = (z1.argmax(1) != y)
    x0, x1, y = x0[cross], x1[cross], y[cross]
    m0 = (z0[cross].gather(1, y[:, None]) - z0[cross].gather(1, 1 - y[:, None]))[:, 0]
    m1 = (z1[cross].gather(1, y[:, None]) - z1[cross].gather(1, 1 - y[:, None]))[:, 0]
    alpha_true = m0 / (m0 - m1)  # the margin is affine in alpha
    out = valley.boundary_crossing(model, x0, x1, y, iters=40, grid=3)
    assert torch.all(out["alpha"] >= alpha_true) and torch.all(out["alpha"] - alpha_true <= 2.0 ** -39)
    # at a two-class tie p = (1/2, 1/2): Gini 1/2, Tr H = ||phi||^2 / 2, kappa_sq = ||w||_F^2 Tr H
    xs = x0 + alpha_true[:, None] * (x1 - x0)
    expect = W.pow(2).sum() * 0.5 * xs.pow(2).sum(1)
    torch.testing.assert_close(out["kappa_sq"].double(), expect, rtol=1e-6, atol=0)
    assert out["margin"].abs().max() < 1e-9 and torch.all(out["margin"] <= 0)
    assert out["grid_kappa_sq"].shape == (len(y), 3)


def test_crossing_refuses_a_segment_that_does_not_cross():
    model = _linear(k=3, d=4)
    x = torch.randn(3, 4, dtype=torch.float64)
    y = model(x).argmax(1)
    with pytest.raises(ValueError, match="do not cross"):
        valley.boundary_crossing(model, x, x, y)
    with pytest.raises(ValueError, match="non-finite"):
        valley.boundary_crossing(model, x, torch.full_like(x, float("nan")), y)
    with pytest.raises(ValueError, match="no paths"):
        valley.boundary_crossing(model, x[:0], x[:0], y[:0])


def _path_model(seed=0):
    """A small image contract model for PGD paths: flatten -> tanh layer -> Linear(10)."""
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 16), nn.Tanh())
    return HeadModel(body, nn.Linear(16, 10)).eval()


def test_path_crossings_lie_between_the_flip_iterates_and_the_shape_is_consistent():
    model = _path_model()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 3, 4, 4, generator=g)
    y = model(x).argmax(1)  # every clean input correct
    res = fa.pgd(model, x, y, eps=0.5, steps=12, step_size=0.05, norm="linf", record=Recorder,
                 record_inputs=True)
    tr = res.trajectory
    cr = valley.path_crossings(model, tr, y, iters=25, grid=4)
    n = cr["cols"].numel()
    assert n >= 10
    assert torch.all((cr["alpha"] > 0) & (cr["alpha"] <= 1))
    assert torch.all(cr["margin"] <= 0) and torch.all(cr["margin"] > -1e-4)
    # the margin recorded at the iterates brackets the crossing
    f, c = cr["flip_step"], cr["cols"]
    assert torch.all(tr.margin[f - 1, c] > 0) and torch.all(tr.margin[f, c] <= 0)
    sh = valley.valley_shape(tr, cr, "kappa_sq")
    assert sh.n == n and sh.peak_offset.shape == (n,)
    # the offset is measured from the crossing: a peak at the crossing point itself gives 0
    assert torch.all(sh.peak_offset.abs() <= tr.loss.shape[0])
    assert 0 < sh.null_shuffle < 1 and 0 <= sh.null_start <= 1
    assert sum(valley.flip_step_counts(tr.flip_step, 12)) == n


class _Scripted:
    """A stand-in trajectory with scripted κ, p_top and loss (T+1 = 6 iterates, 3 paths)."""

    def __init__(self, kappa):
        self.kappa_sq = torch.tensor(kappa, dtype=torch.float64).T
        T1, n = self.kappa_sq.shape
        self.p_top = torch.linspace(0.9, 0.99, T1)[:, None].expand(T1, n)
        self.loss = torch.linspace(0.1, 5.0, T1)[:, None].expand(T1, n)


def _cross(flip, k_cross, grid):
    n = len(flip)
    return {"cols": torch.arange(n), "flip_step": torch.tensor(flip), "alpha": torch.full((n,), 0.5),
            "kappa_sq": torch.tensor(k_cross, dtype=torch.float64),
            "grid_kappa_sq": torch.tensor(grid, dtype=torch.float64), "p_top": torch.full((n,), 0.5)}


def test_valley_shape_scores_a_falling_kappa_only_when_the_flip_is_at_step_one():
    # path 0: a valley (rise to the crossing at 2.5, then fall); path 1: κ only falls, flip at step 1;
    # path 2: κ only falls, flip at step 3 (its peak is the clean point, outside the flip segment)
    kappa = [[1, 2, 3, 2, 1, 0.5], [9, 8, 7, 6, 5, 4], [9, 8, 7, 6, 5, 4]]
    tr = _Scripted(kappa)
    cr = _cross([3, 1, 3], [5.0, 8.5, 6.5], [[4.0], [8.6], [6.6]])
    sh = valley.valley_shape(tr, cr, "kappa_sq")
    assert (sh.peak_in_segment.k, sh.peak_in_segment.n) == (2, 3)  # path 1 scores by the clean point
    assert (sh.peak_in_segment_late.k, sh.peak_in_segment_late.n) == (1, 2)  # the late rule does not
    assert (sh.rise.k, sh.fall.k) == (1, 3)
    assert sh.null_start == pytest.approx(1 / 3)
    # refined path: 6 iterates + 1 grid point + the crossing; the flip segment holds 2 + 1 + 1 of them
    assert sh.null_shuffle == pytest.approx(4 / 8)
    torch.testing.assert_close(sh.peak_offset, torch.tensor([0.0, -0.5, -2.5], dtype=torch.float64))
    assert sh.loss_high.k == 3 and sh.conf_rises.k == 3


def test_valley_shape_rejects_nan_and_empty_selections():
    tr = _Scripted([[1, 2, float("nan"), 2, 1, 0.5]])
    cr = _cross([3], [5.0], [[4.0]])
    with pytest.raises(ValueError, match="non-finite"):
        valley.valley_shape(tr, cr)
    with pytest.raises(ValueError, match="no path"):
        valley.valley_shape(_Scripted([[1, 2, 3, 2, 1, 0.5]]), cr, keep=torch.tensor([False]))
    with pytest.raises(ValueError, match="kappa"):
        valley.valley_shape(tr, cr, "kappa_bogus")


def test_flip_step_counts():
    assert valley.flip_step_counts(torch.tensor([0, -1, 1, 1, 3]), 3) == [2, 0, 1]
    with pytest.raises(ValueError):
        valley.flip_step_counts(torch.tensor([5]), 3)
    assert math.isclose(sum(valley.flip_step_counts(torch.tensor([2, 2]), 2)), 2)


def test_valley_parts_count_chapter_5s_quantities_against_an_independent_closed_form():
    model = _path_model(seed=1)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(48, 3, 4, 4, generator=g)
    y = model(x).argmax(1)
    y[:4] = (y[:4] + 1) % 10  # four inputs misclassified when clean: never counted
    res = fa.pgd(model, x, y, eps=0.5, steps=12, step_size=0.05, norm="linf", record=Recorder,
                 record_inputs=True)
    tr = res.trajectory
    p_clean = model(x).detach().softmax(1).amax(1)
    threshold = float(p_clean[tr.flip_step >= 1].median())  # about half of the flipping paths are confident
    parts = valley.valley_parts(model, tr, y, num_classes=10, confident=threshold, iters=30, grid=4)
    cols = torch.nonzero(tr.flip_step >= 1)[:, 0]
    assert parts.n_flipped == cols.numel() >= 10
    # κ at the crossing, recomputed in float64 from the closed form ||W||^2 (1 - ||p||^2) ||phi||^2 at the
    # bisected point of each flip segment
    f = tr.flip_step[cols]
    a, b = tr.x[f - 1, cols].double(), tr.x[f, cols].double()
    cr = valley.path_crossings(model, tr, y, iters=30, grid=4)
    pts = a + cr["alpha"].double().view(-1, 1, 1, 1) * (b - a)
    m64 = copy.deepcopy(model).double()
    with torch.no_grad():
        phi = torch.tanh(m64.body[1](pts.flatten(1)))
        p = m64.head(phi).softmax(1)
        k_cross = m64.head.weight.pow(2).sum() * (1 - p.pow(2).sum(1)) * phi.pow(2).sum(1)
    torch.testing.assert_close(parts.kappa_cross, k_cross, rtol=1e-4, atol=0)
    torch.testing.assert_close(parts.kappa_clean, tr.kappa_sq[0, cols].double())
    torch.testing.assert_close(parts.kappa_end, tr.kappa_sq[-1, cols].double())
    conf = p_clean[cols] >= threshold
    assert 0 < int(conf.sum()) < cols.numel() and parts.n_confident == int(conf.sum())
    rise = k_cross[conf] > tr.kappa_sq[0, cols][conf].double()
    assert (parts.rise.k, parts.rise.n) == (int(rise.sum()), int(conf.sum()))
    fall = tr.kappa_sq[-1, cols].double() < k_cross
    assert (parts.fall.k, parts.fall.n) == (int(fall.sum()), cols.numel())
    high = tr.loss[-1, cols] > math.log(10)
    assert (parts.loss_high.k, parts.loss_high.n) == (int(high.sum()), cols.numel())
    assert parts.conf_rises.n == cols.numel() and list(parts.fractions()) == ["rise", "fall", "conf_rises",
                                                                             "loss_high"]
    # no confident start: the rise cannot be counted, the rest can
    none = valley.valley_parts(model, tr, y, num_classes=10, confident=1.0, iters=10, grid=0)
    assert none.rise.n == 0 and none.n_confident == 0 and none.fall.n == cols.numel()
    with pytest.raises(ValueError, match="confident"):
        valley.valley_parts(model, tr, y, num_classes=10, confident=1.5)
    # nothing flips: every fraction is Fraction(0, 0), not an error or a NaN
    tr.flip_step = torch.full_like(tr.flip_step, -1)
    empty = valley.valley_parts(model, tr, y, num_classes=10, confident=0.5)
    assert empty.n_flipped == 0 and all(v.n == 0 for v in empty.fractions().values())
    assert empty.kappa_cross.numel() == 0


def test_chapters_5_9_and_10_measure_the_valley_with_the_same_settings():
    from flatnb.config import budgets

    stems = ("05_uncanny_valley", "09_adversarial_training", "10_architectures")
    for profile in ("quick", "full", "smoke"):
        sizes = [budgets.sizes(s, profile) for s in stems]
        for key in ("confident", "bisect", "grid"):
            assert len({s[key] for s in sizes}) == 1, (profile, key, [s[key] for s in sizes])
    assert budgets.sizes("09_adversarial_training", "smoke")["confident"] == 0.0  # a one-epoch model: no confidence


def test_no_flipping_path_is_an_empty_selection_not_a_crash():
    """A model on which no path flips has nothing to locate: an EmptySelection (a ValueError the smoke profile's dry
    run tolerates), never a silent empty result."""
    from flatnb.measure import crossing
    from flatnb.measure.trajectory import FIELDS, Trajectory
    from flatnb.stats import EmptySelection

    traj = Trajectory(flip_step=torch.tensor([0, 0, -1]), x=torch.zeros(3, 3, 1, 2, 2),
                      **{f: torch.zeros(3, 3) for f in FIELDS})
    with pytest.raises(EmptySelection, match="no path flips"):
        crossing.path_crossings(None, traj, torch.tensor([0, 1, 2]))
