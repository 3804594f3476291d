"""Chapter 11's measurements, checked in float64 on a linear classifier against NumPy by hand."""
import numpy as np
import pytest
import torch
from torch import nn

from flatnb import data as fdata
from flatnb.measure import walls
from flatnb.models import HeadModel


def _linear_model(k=4, d=3 * 4 * 4, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    head = nn.Linear(d, k).to(dtype)
    return HeadModel(nn.Flatten(), head).eval()


def _np_logits(model, x):
    w = model.head.weight.detach().numpy()
    b = model.head.bias.detach().numpy()
    return x.reshape(len(x), -1) @ w.T + b


def _np_ce(z, y, t):
    a = z / t
    m = a.max(1, keepdims=True)
    return (m[:, 0] + np.log(np.exp(a - m).sum(1))) - a[np.arange(len(y)), y]


def _np_margin(z, y):
    other = np.array([max(v for j, v in enumerate(row) if j != lab) for row, lab in zip(z, y)])
    return z[np.arange(len(y)), y] - other


def test_measure_batch_matches_a_hand_computation():
    model = _linear_model()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(12, 3, 4, 4, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)  # every input correct by construction
    d1 = torch.randn(1, *x.shape, generator=g, dtype=torch.float64)
    d3 = torch.randn(3, *x.shape, generator=g, dtype=torch.float64)
    unit = lambda d: d / d.flatten(2).norm(dim=2)[..., None, None, None]
    dirs = {"one": unit(d1), "three": unit(d3)}
    T, ts = 1.7, (0.1, 0.5)
    out = walls.measure_batch(model, x, y, dirs, T, ts)

    W = model.head.weight.detach().numpy()
    xn, yn = x.numpy(), y.numpy()
    z = _np_logits(model, xn)
    for name, D in dirs.items():
        Dn = D.numpy()
        curv, curv_cal, rise, marg = [], [], [], []
        for v in Dn:  # per direction: (N,) values, then the median over directions
            u = v.reshape(len(v), -1) @ W.T  # logit change per unit step, (N, k)
            for temp, acc in ((1.0, curv), (T, curv_cal)):
                p = np.exp(z / temp - (z / temp).max(1, keepdims=True))
                p /= p.sum(1, keepdims=True)
                ut = u / temp
                acc.append((p * ut ** 2).sum(1) - (p * ut).sum(1) ** 2)  # (Wv)^T M (Wv) / T^2
            ce0, m0 = _np_ce(z, yn, T), _np_margin(z, yn)
            r_t, m_t = [], []
            for t in ts:
                zp, zm = _np_logits(model, xn + t * v), _np_logits(model, xn - t * v)
                r_t.append(np.maximum(_np_ce(zp, yn, T), _np_ce(zm, yn, T)) - ce0)
                m_t.append(np.maximum(m0 - _np_margin(zp, yn), m0 - _np_margin(zm, yn)) / m0)
            rise.append(np.stack(r_t))
            marg.append(np.stack(m_t))
        ref = {"curv": np.median(curv, 0), "curv_cal": np.median(curv_cal, 0),
               "rise_cal": np.median(rise, 0), "margin": np.median(marg, 0)}
        for q, r in ref.items():
            got = out[name][q].numpy()
            assert got.shape == r.shape, (name, q)
            assert np.allclose(got, r, rtol=1e-9, atol=1e-12), (name, q, np.abs(got - r).max())


def test_measure_batch_refuses_misclassified_inputs():
    model = _linear_model()
    x = torch.rand(4, 3, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        wrong = (model(x).argmax(1) + 1) % 4
    d = torch.randn(1, *x.shape, dtype=torch.float64)
    with pytest.raises(ValueError, match="correctly classified"):
        walls.measure_batch(model, x, wrong, {"a": d}, 1.0, (0.1,))
    with pytest.raises(ValueError, match="positive"):
        walls.measure_batch(model, x, model(x).argmax(1), {"a": d}, 1.0, (0.0,))


def test_directions_and_measure_over_a_dataset():
    model = _linear_model(dtype=torch.float32)
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (24, 3, 4, 4), generator=g, dtype=torch.uint8)
    with torch.no_grad():
        pred = model(images.float() / 255).argmax(1)
    labels = torch.where(torch.arange(24) % 3 == 0, (pred + 1) % 4, pred)  # a third misclassified
    ds = fdata.Dataset(images, labels, ["a", "b", "c", "d"])
    pool_x = torch.rand(40, 3, 4, 4, generator=g)
    pool_y = torch.arange(40) % 4
    x, y = images[:5].float() / 255, labels[:5]
    dirs = walls.directions(model, x, y, pool_x, pool_y, 2, torch.Generator().manual_seed(0))
    assert set(dirs) == set(walls.ON + walls.OFF)
    for kind, d in dirs.items():
        assert d.shape == ((2,) if kind == "random" else (1,)) + tuple(x.shape), kind
        assert torch.allclose(d.flatten(2).norm(dim=2), torch.ones(d.shape[:2]), atol=1e-5), kind
    out = walls.measure(model, ds, 1.3, pool_x, pool_y, (0.1, 0.5), 2, 8, "cpu")
    n_ok = int((labels == pred).sum())
    for kind in walls.ON + walls.OFF:
        assert out[kind]["curv"].shape == (n_ok,) and out[kind]["margin"].shape == (2, n_ok)
        assert all(torch.isfinite(v).all() for v in out[kind].values())
    # the attack direction lowers the margin at least as much as the gradient direction's first step
    assert float(out["attack"]["margin"][0].median()) > 0


def test_curvature_runs_outside_autograd_and_images_go_in_chunks(monkeypatch):
    """Chapter 11's full run ran out of memory: each HVP of a model whose weights require gradients kept a graph
    to the weights. measure_batch computes the curvatures with autograd off (same values), and measure sends at
    most walls.CHUNK images at once whatever the batch size."""
    model = _linear_model(dtype=torch.float32)
    assert all(p.requires_grad for p in model.parameters())
    real, grad_modes, sizes = walls.cv.directional_curvature, [], []

    def spy(m, x, y, d, loss_fn=None):
        grad_modes.append(torch.is_grad_enabled())
        sizes.append(len(x))
        return real(m, x, y, d, loss_fn=loss_fn)

    monkeypatch.setattr(walls.cv, "directional_curvature", spy)
    monkeypatch.setattr(walls, "CHUNK", 5)
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (16, 3, 4, 4), generator=g, dtype=torch.uint8)
    with torch.no_grad():
        labels = model(images.float() / 255).argmax(1)  # all correct
    ds = fdata.Dataset(images, labels, ["a", "b", "c", "d"])
    pool_x, pool_y = torch.rand(40, 3, 4, 4, generator=g), torch.arange(40) % 4
    out = walls.measure(model, ds, 1.3, pool_x, pool_y, (0.1,), 2, 16, "cpu")
    assert grad_modes and not any(grad_modes)
    assert max(sizes) == 5 and out["random"]["curv"].shape == (16,)
    with torch.enable_grad():  # the same values with autograd on
        x, y = images[:5].float() / 255, labels[:5]
        d = walls.cv.unit_directions(torch.randn((2, *x.shape), generator=g))
        on = real(model, x, y, d)
        with torch.no_grad():
            off = real(model, x, y, d)
    torch.testing.assert_close(on.detach(), off)
