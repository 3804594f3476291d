"""Tests of flatnb.analysis against independent computations (brute force, direct indexing)."""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from flatnb import analysis as an
from flatnb.attacks import pgd


class Tiny(nn.Module):
    """A small network following the flatnb model contract."""

    def __init__(self, k=4, m=6, n_in=12):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(n_in, m), nn.ReLU())
        self.head = nn.Linear(m, k)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


# ----------------------------------------------------------------------------- scaled_head


def test_scaled_head_scales_weight_and_bias_keeps_argmax_and_original():
    torch.manual_seed(0)
    model = Tiny().double()
    x = torch.rand(64, 12, dtype=torch.float64)
    w0, b0 = model.head.weight.clone(), model.head.bias.clone()
    for s in (0.25, 3.0, 100.0):
        ms = an.scaled_head(model, s)
        assert ms is not model
        torch.testing.assert_close(ms.head.weight, s * w0)
        torch.testing.assert_close(ms.head.bias, s * b0)
        # logits of the copy are s times the original's: temperature 1/s
        torch.testing.assert_close(ms(x), s * model(x))
        assert torch.equal(ms(x).argmax(1), model(x).argmax(1))
    # the original is untouched
    assert torch.equal(model.head.weight, w0) and torch.equal(model.head.bias, b0)


def test_scaled_head_rejects_bad_scale_and_models():
    with pytest.raises(ValueError, match="scale"):
        an.scaled_head(Tiny(), 0.0)
    with pytest.raises(ValueError, match="scale"):
        an.scaled_head(Tiny(), float("nan"))
    with pytest.raises(TypeError, match="head"):
        an.scaled_head(nn.Linear(3, 2), 2.0)


# ----------------------------------------------------------------------------- alignment


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


def test_valley_stats_fractions():
    class T:
        pass

    t = T()
    t.kappa_sq = torch.tensor([[1.0, 1.0], [3.0, 2.0], [5.0, 1.0], [2.0, 4.0], [0.5, 0.2]])
    t.p_top = torch.tensor([[0.9, 0.9], [0.6, 0.6], [0.5, 0.5], [0.8, 0.4], [0.99, 0.45]])
    t.loss = torch.tensor([[0.1, 0.1], [0.5, 0.5], [1.0, 1.0], [2.0, 1.5], [5.0, 1.0]])
    t.flip_step = torch.tensor([2, 2])
    s = an.valley_stats(t, "kappa_sq", window=1, num_classes=10)
    assert s["n_flipped"] == 2
    assert s["peak_near_flip"] == 1.0  # peaks at steps 2 and 3, the flip is at 2
    assert s["flip_gt_start"] == 0.5  # 5 > 1 but 1 > 1 is false
    assert s["flip_gt_last"] == 1.0  # 5 > 0.5 and 1 > 0.2
    assert s["conf_rises"] == 0.5  # 0.99 > 0.5 but 0.45 < 0.5
    assert s["loss_high"] == 0.5  # 5 > log 10 but 1 < log 10
    t.p_top[0, 1] = 0.7
    c = an.valley_stats(t, "kappa_sq", window=1, num_classes=10, min_confidence=0.8)
    assert c["n_flipped"] == 1 and c["flip_gt_start"] == 1.0 and c["conf_rises"] == 1.0
    assert an.valley_stats(t, min_confidence=0.95) == {"n_flipped": 0}


def test_trajectory_helpers_run_on_a_real_attack():
    torch.manual_seed(0)
    model = Tiny(k=3, m=5, n_in=4).eval()
    x = torch.rand(32, 4)
    y = model(x).argmax(1)
    res = pgd(model, x, y, eps=3.0, steps=12, step_size=0.5, record=True, clip=None, warn=False)
    tr = res.trajectory
    assert int((tr.flip_step >= 1).sum()) >= 5
    offsets, al = an.align_at_flip(tr.kappa_sq, tr.flip_step, 3, 3)
    assert al.shape[1] == int((tr.flip_step >= 1).sum())
    # at offset 0 the aligned row is the value at each example's own flip step
    kept = torch.nonzero(tr.flip_step >= 1)[:, 0]
    ref = tr.kappa_sq[tr.flip_step[kept], kept].double()
    torch.testing.assert_close(al[3], ref)
    fig = an.uncanny_valley_figure(tr, "tiny", before=3, after=3, quantities=("kappa_sq", "trace_h", "loss"))
    assert len(fig.axes) == 6
    import matplotlib.pyplot as plt

    plt.close(fig)
    tr.flip_step = torch.full_like(tr.flip_step, -1)
    with pytest.raises(ValueError, match="no example flips"):
        an.uncanny_valley_figure(tr)


# ----------------------------------------------------------------------------- stump


def _brute_force_best(s, t):
    """Best accuracy over every threshold in {values, values +- tiny, +-inf} and both polarities."""
    cands = np.concatenate([s, s - 1e-9, s + 1e-9, [-np.inf, np.inf]])
    best = 0.0
    for thr, pol in itertools.product(cands, (1, -1)):
        pred = (pol * (s - thr) > 0).astype(int)
        best = max(best, float((pred == t).mean()))
    return best


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(-5, 5), st.integers(0, 1)), min_size=1, max_size=25))
def test_stump_matches_brute_force(rows):
    s = np.array([r[0] for r in rows], dtype=float)
    t = np.array([r[1] for r in rows])
    thr, pol, acc = an.fit_stump(s, t)
    assert acc == pytest.approx(_brute_force_best(s, t))
    # the returned rule really achieves the reported accuracy
    assert float((an.predict_stump(s, thr, pol) == t).mean()) == pytest.approx(acc)


def test_stump_separable_and_reversed():
    s = np.array([0.1, 0.2, 0.3, 5.0, 6.0, 7.0])
    thr, pol, acc = an.fit_stump(s, [0, 0, 0, 1, 1, 1])
    assert acc == 1.0 and pol == 1 and 0.3 < thr < 5.0
    thr, pol, acc = an.fit_stump(s, [1, 1, 1, 0, 0, 0])
    assert acc == 1.0 and pol == -1


def test_cross_validation_uses_held_out_folds():
    rng = np.random.default_rng(0)
    # separable data: every fold is perfect
    s = np.concatenate([rng.normal(0, 1, 100), rng.normal(10, 1, 100)])
    t = np.repeat([0, 1], 100)
    accs = an.cross_validate_stump(s, t, folds=5, seed=0)
    assert accs.shape == (5,) and np.all(accs == 1.0)
    # pure noise: training accuracy of a stump overfits above 0.5, held-out accuracy stays near 0.5
    s = rng.normal(size=400)
    t = rng.integers(0, 2, 400)
    accs = an.cross_validate_stump(s, t, folds=5, seed=1)
    assert abs(accs.mean() - 0.5) < 0.1
    # two Gaussians with a known Bayes accuracy Phi(1) = 0.841
    s = np.concatenate([rng.normal(-1, 1, 2000), rng.normal(1, 1, 2000)])
    t = np.repeat([0, 1], 2000)
    accs = an.cross_validate_stump(s, t, folds=5, seed=2)
    assert abs(accs.mean() - 0.8413) < 0.03


def test_stump_rejects_bad_input():
    with pytest.raises(ValueError, match="0 or 1"):
        an.fit_stump([1.0, 2.0], [0, 2])
    with pytest.raises(ValueError, match="finite"):
        an.fit_stump([1.0, float("inf")], [0, 1])
    with pytest.raises(ValueError, match="fewer than folds"):
        an.cross_validate_stump([1.0, 2.0, 3.0], [0, 1, 1], folds=5)


def test_cat_results_equals_one_big_attack():
    torch.manual_seed(0)
    model = Tiny(k=3, m=5, n_in=4).eval()
    x = torch.rand(20, 4)
    y = model(x).argmax(1)
    kw = dict(eps=3.0, steps=5, step_size=0.5, record=True, clip=None, warn=False)
    whole = pgd(model, x, y, **kw)
    parts = an.cat_results([pgd(model, x[:7], y[:7], **kw), pgd(model, x[7:], y[7:], **kw)])
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


# ----------------------------------------------------------------------------- comparison across models


class _Traj:
    """A stand-in trajectory: (T+1, N) rows and flip_step, as flatnb.attacks.Trajectory has them."""

    def __init__(self, kappa, flip, p_top=None):
        self.kappa_sq = kappa
        self.flip_step = flip
        self.loss = torch.zeros_like(kappa)
        self.p_top = torch.full_like(kappa, 0.9) if p_top is None else p_top


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 12), st.integers(1, 9), st.integers(0, 2**31 - 1))
def test_valley_medians_match_direct_loops(steps, n, seed):
    g = torch.Generator().manual_seed(seed)
    kappa = torch.rand(steps + 1, n, generator=g, dtype=torch.float64)
    flip = torch.randint(-1, steps + 1, (n,), generator=g)
    got = an.valley_medians(_Traj(kappa, flip))
    k = kappa.numpy()
    idx = [i for i in range(n) if flip[i] >= 1]
    assert got["n_flipped"] == len(idx)
    if not idx:
        assert all(math.isnan(got[q]) for q in ("start", "flip", "end"))
        return
    assert got["start"] == pytest.approx(np.median([k[0, i] for i in idx]))
    assert got["flip"] == pytest.approx(np.median([k[int(flip[i]), i] for i in idx]))
    assert got["end"] == pytest.approx(np.median([k[-1, i] for i in idx]))


def test_valley_comparison_figure_draws_each_model_and_survives_no_flips():
    import matplotlib.pyplot as plt

    torch.manual_seed(0)
    model = Tiny(k=3, m=5, n_in=4).eval()
    x = torch.rand(32, 4)
    y = model(x).argmax(1)
    tr = pgd(model, x, y, eps=3.0, steps=12, step_size=0.5, record=True, clip=None, warn=False).trajectory
    none = _Traj(torch.rand(13, 4, dtype=torch.float64), torch.full((4,), -1))
    fig = an.valley_comparison_figure({"a": tr, "b": tr, "nothing flips": none}, "kappa_sq", before=3, after=4)
    axes = np.array(fig.axes).reshape(2, 3)
    # bottom row, first column: the median line at offset 0 is the median κ at each example's own flip step
    kept = [i for i in range(32) if tr.flip_step[i] >= 1]
    assert len(kept) >= 5
    at_flip = np.median([float(tr.kappa_sq[int(tr.flip_step[i]), i]) for i in kept])
    line = next(l for l in axes[1, 0].lines if len(l.get_xdata()) == 8)  # the median, not the flip marker
    xs, ys = line.get_data()
    assert list(xs) == list(range(-3, 5))
    assert ys[3] == pytest.approx(at_flip, rel=1e-6)
    # top row: by raw step, over the same (flipping) examples
    raw = next(l for l in axes[0, 1].lines if len(l.get_xdata()) == 13)
    assert raw.get_ydata()[0] == pytest.approx(np.median([float(tr.kappa_sq[0, i]) for i in kept]), rel=1e-6)
    assert "n=0" in axes[0, 2].get_title() and any("no example flips" in t.get_text() for t in axes[0, 2].texts)
    assert f"n={len(kept)}" in axes[0, 0].get_title()
    plt.close(fig)
    with pytest.raises(ValueError, match="at least one"):
        an.valley_comparison_figure({})
    with pytest.raises(ValueError, match="unknown quantity"):
        an.valley_comparison_figure({"a": tr}, "sharpness")


def test_uncanny_valley_figure_overlays_models_in_given_axes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    torch.manual_seed(0)
    model = Tiny(k=3, m=5, n_in=4).eval()
    x = torch.rand(32, 4)
    y = model(x).argmax(1)
    trs = [pgd(model, x, y, eps=3.0, steps=12, step_size=s, record=True, clip=None, warn=False).trajectory
           for s in (0.5, 0.25)]
    qs = ("kappa_sq", "loss")
    fig, axes = plt.subplots(2, len(qs), squeeze=False)
    for tr, name, c in zip(trs, ("a", "b"), ("C0", "C3")):
        out = an.uncanny_valley_figure(tr, before=2, after=2, quantities=qs, axes=axes, label=name, color=c)
        assert out is fig
    for ax in axes.flat:
        # one median line per model, in its colour, labelled with its name and n
        lines = [ln for ln in ax.get_lines() if ln.get_label().startswith(("a (", "b ("))]
        assert [ln.get_label().split(" ")[0] for ln in lines] == ["a", "b"]
        assert [ln.get_color() for ln in lines] == ["C0", "C3"]
        # the first median is the raw/aligned median of model a's flipping examples
    top = [ln for ln in axes[0, 1].get_lines() if ln.get_label().startswith("a (")][0]
    keep = trs[0].flip_step >= 1
    np.testing.assert_allclose(top.get_ydata(), np.nanmedian(trs[0].loss[:, keep].double().numpy(), axis=1))
    with pytest.raises(ValueError, match="axes"):
        an.uncanny_valley_figure(trs[0], quantities=qs, axes=axes[:1])
    plt.close(fig)
