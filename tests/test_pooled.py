"""Per-model and pooled numbers (flatnb.measure.pooled, crossing.pool_shapes, sweep.Sweep.pool): pooling over models
must give what one measurement over all their images gives, checked against independent computations."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from flatnb.data import Dataset
from flatnb.measure import crossing as valley
from flatnb.measure import pooled
from flatnb.measure.sweep import Sweep, scale_sweep
from flatnb.models import HeadModel
from flatnb.stats import EmptySelection, Fraction

torch.set_num_threads(1)


def test_pool_adds_the_counts_and_narrows_the_interval():
    a, b = Fraction(3, 10), Fraction(15, 20)
    p = pooled.pool({"a": a, "b": b})
    assert (p.k, p.n) == (18, 30)
    assert p.value == pytest.approx(18 / 30)  # not the mean of the two shares (0.525)
    assert p.hi - p.lo < min(a.hi - a.lo, b.hi - b.lo)
    assert pooled.pool([a, Fraction(0, 0)]) == a  # an empty model adds nothing
    assert pooled.pool([Fraction(0, 0)]).n == 0
    with pytest.raises(TypeError):
        pooled.pool([a, 0.5])
    with pytest.raises(EmptySelection):
        pooled.pool({})


def test_pooled_median_is_the_median_of_all_values():
    g = np.random.default_rng(0)
    a, b = g.normal(0, 1, 31), g.normal(5, 1, 64)
    est, lo, hi = pooled.pooled_median({"a": torch.tensor(a), "b": torch.tensor(b, dtype=torch.float32)})
    want = float(np.median(np.concatenate([a, b.astype(np.float32).astype(np.float64)])))
    assert est == pytest.approx(want, rel=1e-12)
    assert lo <= est <= hi and lo < hi
    with pytest.raises(ValueError, match="non-finite"):
        pooled.pooled_median([torch.tensor([1.0, float("nan")])])


def test_table_has_one_row_per_model_and_the_pooled_row():
    t = pooled.table(["share"], {"m1": ["0.5"], "m|2": ["0.7"]}, ["0.6"])
    lines = t.splitlines()
    assert lines[0] == "| model | share |" and len(lines) == 5
    assert lines[3] == "| m\\|2 | 0.7 |" and lines[4] == "| **pooled** | 0.6 |"
    assert len(pooled.table(["share"], {"m1": ["0.5"]}).splitlines()) == 3
    with pytest.raises(ValueError, match="cells"):
        pooled.table(["a", "b"], {"m1": ["0.5"]})


class _Scripted:
    """A stand-in trajectory: scripted κ, rising p_top and loss, (T+1) iterates by paths."""

    def __init__(self, kappa):
        self.kappa_sq = torch.tensor(kappa, dtype=torch.float64).T
        T1, n = self.kappa_sq.shape
        self.p_top = torch.linspace(0.9, 0.99, T1)[:, None].expand(T1, n)
        self.loss = torch.linspace(0.1, 5.0, T1)[:, None].expand(T1, n).clone()


def _cross(flip, k_cross, grid):
    n = len(flip)
    return {"cols": torch.arange(n), "flip_step": torch.tensor(flip), "alpha": torch.full((n,), 0.5),
            "kappa_sq": torch.tensor(k_cross, dtype=torch.float64),
            "grid_kappa_sq": torch.tensor(grid, dtype=torch.float64), "p_top": torch.full((n,), 0.5)}


def test_pool_shapes_equals_the_shape_of_all_paths_at_once():
    g = torch.Generator().manual_seed(3)
    n, T1 = 40, 7
    kappa = torch.rand(n, T1, generator=g, dtype=torch.float64).tolist()
    flip = torch.randint(1, T1, (n,), generator=g).tolist()
    k_cross = (torch.rand(n, generator=g, dtype=torch.float64) * 1.2).tolist()
    grid = torch.rand(n, 2, generator=g, dtype=torch.float64).tolist()
    whole = valley.valley_shape(_Scripted(kappa), _cross(flip, k_cross, grid))
    cut = 13  # two "models": the first 13 paths and the rest
    parts = [valley.valley_shape(_Scripted(kappa[s]), _cross(flip[s], k_cross[s], grid[s]))
             for s in (slice(0, cut), slice(cut, n))]
    got = valley.pool_shapes({"a": parts[0], "b": parts[1]})
    assert got.n == whole.n == n
    for name in ("rise", "peak_in_segment", "peak_in_segment_late", "fall", "conf_rises", "loss_high"):
        assert getattr(got, name) == getattr(whole, name), name
    for name in ("null_shuffle", "null_shuffle_late", "null_start", "z_shuffle_late"):
        assert getattr(got, name) == pytest.approx(getattr(whole, name), rel=1e-12), name
    torch.testing.assert_close(got.peak_offset, whole.peak_offset)
    torch.testing.assert_close(got.flip_step, whole.flip_step)
    # a model without paths (no confident input) adds nothing
    empty = valley._empty_shape()
    again = valley.pool_shapes([parts[0], empty, parts[1]])
    assert again.rise == whole.rise and again.null_start == pytest.approx(whole.null_start)
    assert valley.pool_shapes([empty]).n == 0
    with pytest.raises(EmptySelection):
        valley.pool_shapes([])


def _dataset(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 4, 4), generator=g, dtype=torch.uint8)
    return Dataset(images, torch.zeros(n, dtype=torch.long), [str(i) for i in range(10)])


def _model(seed=0):
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.Tanh())
    m = HeadModel(body, nn.Linear(16, 10)).eval()
    return m


def _labelled(model, ds):
    """The dataset labelled by the model's own clean prediction, except every third image (wrong there)."""
    with torch.no_grad():
        pred = model(ds.images.float() / 255).argmax(1)
    y = pred.clone()
    y[::3] = (pred[::3] + 1) % 10
    return Dataset(ds.images, y, ds.classes)


def test_valley_run_measures_every_kappa_and_pools_with_itself():
    model = _model()
    ds = _labelled(model, _dataset(30))
    r = valley.valley_run(model, ds, 16, "cpu", confident=0.0, bisect=12, grid=2,
                          short_attack=dict(norm="linf", eps=0.5, steps=4, step_size=0.1),
                          long_attack=dict(norm="linf", eps=0.5, steps=8, step_size=0.1))
    assert r.long.trajectory.x is None  # the iterates are released
    n = r.cross["cols"].numel()
    assert n >= 5 and set(r.shapes) == {(k, w) for k in valley.KAPPAS for w in ("all", "confident")}
    assert r.shapes["kappa_sq", "all"].n == n == r.shapes["kappa_sq", "confident"].n  # threshold 0: all
    two = valley.pool_shapes([r.shapes["kappa_sq", "all"]] * 2)
    assert (two.rise.k, two.rise.n) == (2 * r.shapes["kappa_sq", "all"].rise.k, 2 * n)
    with pytest.raises(ValueError, match="confident"):
        valley.valley_run(model, ds, 16, "cpu", confident=1.5, bisect=4, grid=1,
                          short_attack={}, long_attack={})


def _scripted_sweep(loss_soft, loss_ref, correct):
    loss = {0.25: torch.tensor(loss_soft, dtype=torch.float64).T, 1.0: torch.tensor(loss_ref, dtype=torch.float64).T}
    n = loss[1.0].shape[1]
    z = {s: torch.zeros(n, dtype=torch.bool) for s in loss}
    return Sweep(scales=(0.25, 1.0), correct=torch.tensor(correct), kappa={s: torch.ones(n) for s in loss},
                 kappa_unsq={s: torch.ones(n) for s in loss}, loss=loss, zero_grad=z, broken=dict(z))


def test_paired_earlier_counts_by_hand():
    # image 0: half of its rise at step 1 (soft) vs 3 (ref): earlier; image 1: 2 vs 1: later;
    # image 2: same step: tied; image 3: no rise at the reference: not compared; image 4: not correct
    soft = [[0, 2, 3, 4], [0, 0.5, 3, 4], [0, 1, 3, 4], [0, 1, 2, 3], [0, 5, 5, 5]]
    ref = [[0, 0.1, 0.2, 4], [0, 3, 3, 4], [0, 1, 3, 4], [1, 1, 1, 1], [0, 0, 0, 9]]
    sw = _scripted_sweep(soft, ref, [True, True, True, True, False])
    p = sw.paired_earlier()
    assert (p["earlier"], p["later"], p["tied"], p["both"]) == (1, 1, 1, 3)
    assert p["share"] == Fraction(1, 2)
    with pytest.raises(ValueError, match="scale"):
        sw.paired_earlier(soft=0.5)


def test_sweep_pooled_over_two_models_equals_the_sweep_of_their_images():
    attack = dict(norm="l2", eps=0.5, steps=5, step_size=0.1)
    ds = _dataset(20)
    m = _model(1)
    ds = _labelled(m, ds)
    whole = scale_sweep(m, ds, (0.5, 1.0, 4.0), 8, "cpu", attack)
    halves = [scale_sweep(m, Dataset(ds.images[s], ds.labels[s], ds.classes), (0.5, 1.0, 4.0), 8, "cpu",
                          attack) for s in (slice(0, 7), slice(7, 20))]
    got = Sweep.pool({"first": halves[0], "rest": halves[1]})
    assert got.n == whole.n == 20
    for s in whole.scales:
        torch.testing.assert_close(got.loss[s], whole.loss[s])
        assert got.median_kappa()[s] == pytest.approx(whole.median_kappa()[s])
        assert got.zero()[s] == whole.zero()[s]
    assert got.kept() == whole.kept() and got.robust() == whole.robust()
    assert got.kept().n == int(whole.correct.sum()) < 20  # the mislabelled images are not in robust/clean
    # increase over the correct images only, checked against the raw paths
    inc = whole.loss[4.0][-1] - whole.loss[4.0][0]
    torch.testing.assert_close(whole.increase(4.0, correct_only=True), inc[whole.correct])
    with pytest.raises(ValueError, match="scales"):
        Sweep.pool([halves[0], scale_sweep(m, ds, (1.0,), 8, "cpu", attack)])
    with pytest.raises(ValueError, match="positive"):
        scale_sweep(m, ds, (0.0, 1.0), 8, "cpu", attack)


def test_masking_run_pools_like_one_run_and_transfer_to_a_temperature_is_complete():
    from flatnb.measure.masking import CONTROLS, MaskingRun, masking_run, weight_only

    m = _model(2)
    ds = _labelled(m, _dataset(18, seed=4))
    attack = dict(norm="linf", eps=0.3, steps=4, step_size=0.1)
    kw = dict(scales=(1.0, 10.0), batch_size=8, device="cpu", attack=attack, apgd_steps=4)
    whole = masking_run(m, ds, n_ctrl=18, **kw)
    parts = [masking_run(m, Dataset(ds.images[s], ds.labels[s], ds.classes), n_ctrl=100, **kw)
             for s in (slice(0, 5), slice(5, 18))]
    got = MaskingRun.pool({"a": parts[0], "b": parts[1]})
    assert got.n == whole.n == 18
    for s in (1.0, 10.0):
        assert got.rob(s) == whole.rob(s) and got.not_broken(s) == whole.not_broken(s)
        assert got.transfer(s) == whole.transfer(s)
        torch.testing.assert_close(got.kappa[s], whole.kappa[s], rtol=1e-5, atol=0)  # float32, batch-dependent rounding
    for c in CONTROLS:  # every image is a control image here (n_ctrl >= N)
        assert got.control(c) == whole.control(c)
    assert whole.not_broken(1.0).n == int(whole.correct.sum()) < 18
    # f_s is a temperature of f_1: every s = 1 adversarial example fools it (E4 by construction)
    assert whole.transfer(10.0).k == whole.transfer(10.0).n == int(whole.broken1.sum()) > 0
    g = weight_only(m, 10.0)
    torch.testing.assert_close(g.head.bias, m.head.bias)
    torch.testing.assert_close(g.head.weight, 10 * m.head.weight)
    few = masking_run(m, ds, n_ctrl=7, **{**kw, "scales": (1.0, 4.0)})  # the controls on 7 of the 18 images
    assert all(few.control(c).n == 7 for c in CONTROLS) and few.rob(4.0).n == 18 and few.cw_same.numel() == 7
    with pytest.raises(ValueError, match="contain 1"):
        masking_run(m, ds, n_ctrl=4, **{**kw, "scales": (2.0, 10.0)})
