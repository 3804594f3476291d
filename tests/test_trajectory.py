"""Statistics over attack trajectories (flatnb.measure.trajectory) against independent computations."""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from flatnb.measure import trajectory as an
from flatnb.attacks import cat_results, pgd
from flatnb.measure.trajectory import Recorder
from conftest import Tiny


def test_align_at_flip_matches_direct_indexing():
    gen = torch.Generator().manual_seed(1)
    T, n = 8, 7
    vals = torch.rand(T + 1, n, generator=gen)
    flip = torch.tensor([3, -1, 0, 1, 8, 5, 2])
    offsets, al = an.align_at_flip(vals, flip, before=2, after=3)
    assert list(offsets) == [-2, -1, 0, 1, 2, 3]
    kept = [i for i in range(n) if flip[i] >= 1]
    assert al.shape == (6, len(kept))
    for c, i in enumerate(kept):
        for r, o in enumerate(offsets):
            t = int(flip[i]) + int(o)
            if 0 <= t <= T:
                assert al[r, c].item() == pytest.approx(vals[t, i].item())
            else:
                assert math.isnan(al[r, c].item())


def test_step_summary_matches_numpy_nanquantile():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(5, 11))
    v[1, :4] = np.nan
    v[3, :] = np.nan
    out = an.step_summary(torch.from_numpy(v), quantiles=(0.1, 0.5, 0.9))
    with np.errstate(all="ignore"), pytest.warns(RuntimeWarning):
        ref = np.nanquantile(v, [0.1, 0.5, 0.9], axis=1)
    for j, q in enumerate((0.1, 0.5, 0.9)):
        np.testing.assert_allclose(out[q], ref[j], equal_nan=True)


def test_range_ratio_is_the_median_of_max_over_min_along_the_path():
    v = torch.tensor([[1.0, 2.0, 1.0], [4.0, 2.0, 3.0], [2.0, 1.0, 9.0]])  # ratios 4, 2, 9 -> median 4
    assert an.range_ratio(v) == 4.0
    with pytest.raises(ValueError, match="positive values"):
        an.range_ratio(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="with examples"):
        an.range_ratio(torch.ones(3, 0))


def test_trajectory_helpers_run_on_a_real_attack():
    torch.manual_seed(0)
    model = Tiny(k=3, m=5, n_in=4).eval()
    x = torch.rand(32, 4)
    y = model(x).argmax(1)
    res = pgd(model, x, y, eps=3.0, steps=12, step_size=0.5, record=Recorder, clip=None, warn=False)
    tr = res.trajectory
    assert int((tr.flip_step >= 1).sum()) >= 5
    offsets, al = an.align_at_flip(tr.kappa_sq, tr.flip_step, 3, 3)
    assert al.shape[1] == int((tr.flip_step >= 1).sum())
    # at offset 0 the aligned row is the value at each example's own flip step
    kept = torch.nonzero(tr.flip_step >= 1)[:, 0]
    ref = tr.kappa_sq[tr.flip_step[kept], kept].double()
    torch.testing.assert_close(al[3], ref)
    from flatnb.book import figures

    fig = figures.uncanny_valley_figure(tr, "tiny", before=3, after=3, quantities=("kappa_sq", "trace_h", "loss"))
    assert sum(ax.get_visible() for ax in fig.axes) == 6
    import matplotlib.pyplot as plt

    plt.close(fig)
    tr.flip_step = torch.full_like(tr.flip_step, -1)
    with pytest.raises(ValueError, match="no example flips"):
        figures.uncanny_valley_figure(tr)
    # trace_h is recorded, and is gini * phi_sq
    torch.testing.assert_close(tr.trace_h, tr.gini * tr.phi_sq)


def test_cat_results_equals_one_big_attack():
    torch.manual_seed(0)
    model = Tiny(k=3, m=5, n_in=4).eval()
    x = torch.rand(20, 4)
    y = model(x).argmax(1)
    kw = dict(eps=3.0, steps=5, step_size=0.5, record=Recorder, clip=None, warn=False)
    whole = pgd(model, x, y, **kw)
    parts = cat_results([pgd(model, x[:7], y[:7], **kw), pgd(model, x[7:], y[7:], **kw)])
    torch.testing.assert_close(parts.x_adv, whole.x_adv)
    assert torch.equal(parts.flip_step, whole.flip_step)
    assert torch.equal(parts.trajectory.flip_step, whole.trajectory.flip_step)
    torch.testing.assert_close(parts.trajectory.kappa_sq, whole.trajectory.kappa_sq)
    assert parts.trajectory.kappa_sq.shape == (6, 20)
    assert parts.robust_accuracy() == whole.robust_accuracy()


# ----------------------------------------------------------------------------- basin width


def _first_crossing(col, pred):
    """Brute force: the first index t >= 1 with pred(t) true, else inf."""
    for t in range(1, len(col)):
        if pred(t):
            return float(t)
    return math.inf


def test_basin_width_on_hand_made_trajectories():
    T = 50
    t = torch.arange(T + 1, dtype=torch.float64)[:, None]
    # linear rises with slopes a from a clean loss of 0.3: the loss exceeds 0.3 + r first at floor(r / a) + 1
    slopes = torch.tensor([[0.5, 0.05, 0.01, 0.003]], dtype=torch.float64)
    lin = 0.3 + slopes * t
    w = an.basin_width(lin, rise=0.225)
    assert w.tolist() == [1.0, 5.0, 23.0, math.inf]  # 0.003 * 50 = 0.15 never exceeds 0.225
    # a wide flat basin then a wall at step 30, and a narrow one with a wall at step 2
    wall = torch.zeros(T + 1, 2, dtype=torch.float64)
    wall[30:, 0] = 4.0
    wall[2:, 1] = 4.0
    for kw in (dict(rise=0.1), dict(rise=3.9), dict(fraction=0.5), dict(fraction=1.0)):
        assert an.basin_width(wall, **kw).tolist() == [30.0, 2.0]
    # a convex rise c t^2 reaches the fraction f of its final rise c T^2 at ceil(sqrt(f) T)
    quad = 0.1 * t ** 2
    for f in (0.04, 0.25, 0.5, 0.81):
        assert float(an.basin_width(quad, fraction=f)) == math.ceil(math.sqrt(f) * T - 1e-9)
    # never above the clean loss: no take-off in either mode
    down = torch.stack([2.0 - 0.01 * t[:, 0], torch.full((T + 1,), 1.0, dtype=torch.float64)], dim=1)
    assert an.basin_width(down, rise=0.0).isinf().all()
    assert an.basin_width(down, fraction=0.5).isinf().all()


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 12), n=st.integers(1, 5), seed=st.integers(0, 10_000), rise=st.floats(0.0, 2.0),
       fraction=st.floats(0.01, 1.0), shift=st.sampled_from([-4.0, 0.5, 8.0]), scale=st.sampled_from([0.25, 2.0, 8.0]))
def test_basin_width_matches_brute_force_and_invariances(T, n, seed, rise, fraction, shift, scale):
    g = torch.Generator().manual_seed(seed)
    # dyadic losses: shifts and power-of-two scalings are exact, and ties with the threshold occur
    loss = torch.randint(0, 48, (T + 1, n), generator=g).to(torch.float64) / 16
    w_rise = an.basin_width(loss, rise=rise)
    w_frac = an.basin_width(loss, fraction=fraction)
    for j in range(n):
        col = loss[:, j].tolist()
        top = max(c - col[0] for c in col[1:])
        assert float(w_rise[j]) == _first_crossing(col, lambda t: col[t] - col[0] > rise)
        assert float(w_frac[j]) == _first_crossing(col, lambda t: top > 0 and col[t] - col[0] >= fraction * top)
    # a constant offset changes nothing; the fraction criterion is also blind to the loss's scale
    assert torch.equal(an.basin_width(loss + shift, rise=rise), w_rise)
    assert torch.equal(an.basin_width(loss * scale, fraction=fraction), w_frac)
    assert torch.equal(an.basin_width(loss * scale, rise=rise * scale), w_rise)


def test_basin_width_rejects_bad_input():
    loss = torch.rand(5, 3)
    with pytest.raises(ValueError, match="exactly one"):
        an.basin_width(loss)
    with pytest.raises(ValueError, match="exactly one"):
        an.basin_width(loss, rise=0.1, fraction=0.5)
    with pytest.raises(ValueError, match="T\\+1, N"):
        an.basin_width(torch.rand(5), rise=0.1)
    with pytest.raises(ValueError, match="T\\+1, N"):
        an.basin_width(torch.rand(1, 3), rise=0.1)
    with pytest.raises(ValueError, match="rise"):
        an.basin_width(loss, rise=-1.0)
    with pytest.raises(ValueError, match="fraction"):
        an.basin_width(loss, fraction=0.0)
    with pytest.raises(ValueError, match="NaN"):
        an.basin_width(torch.tensor([[0.0], [float("nan")]]), rise=0.1)
