"""flatnb.measure.toy: the theory chapters' synthetic data, fits and 2-D landscapes."""
import math

import numpy as np
import pytest
import torch

from flatnb import curvature as cv
from flatnb.measure import toy

DT = torch.float64
torch.set_num_threads(1)


def test_blobs_are_seeded_and_shaped():
    x, y = toy.blobs(500, 7, 4, seed=3)
    x2, y2 = toy.blobs(500, 7, 4, seed=3)
    assert x.shape == (500, 7) and x.dtype == DT and torch.equal(x, x2) and torch.equal(y, y2)
    assert set(y.tolist()) == {0, 1, 2, 3}
    assert not torch.equal(toy.blobs(500, 7, 4, seed=4)[0], x)
    with pytest.raises(ValueError, match="k >= 2"):
        toy.blobs(10, 3, 1)


def test_fit_learns_blobs():
    x, y = toy.blobs(2048, 20, 10, seed=0)
    net = toy.fit(toy.blob_mlp(20, 32, 10, seed=0), x[:1536], y[:1536], steps=200)
    with torch.no_grad():
        acc = (net(x[1536:]).argmax(1) == y[1536:]).double().mean()
    assert float(acc) > 0.8 and not net.training


def test_high_precision_terms_match_closed_form_and_two_class_formula():
    g = torch.Generator().manual_seed(0)
    phi = torch.rand(5, 4, dtype=DT, generator=g)
    w = torch.randn(3, 4, dtype=DT, generator=g)
    z = phi @ w.T
    tr, kap = toy.high_precision_terms(phi, z, w)
    t = cv.closed_form(phi, z, w)
    torch.testing.assert_close(tr, t.trace_h, rtol=1e-13, atol=0)
    torch.testing.assert_close(kap, t.kappa_neuron, rtol=1e-12, atol=0)
    # two classes, margin 40: Tr H = |phi|^2 / (1 + cosh 40), far below float64 cancellation
    phi2 = torch.tensor([[1.0, 2.0]], dtype=DT)
    z2 = torch.tensor([[40.0, 0.0]], dtype=DT)
    tr2, kap2 = toy.high_precision_terms(phi2, z2, torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=DT))
    assert math.isclose(float(tr2), 5.0 / (1 + math.cosh(40.0)), rel_tol=1e-13)
    # kappa_neuron = |phi|^2 p1 p2 |w1 - w2|^2 = |phi|^2 (1 - |p|^2) / 2 * 2
    assert math.isclose(float(kap2), 5.0 / (1 + math.cosh(40.0)), rel_tol=1e-13)


def test_moons_and_normals():
    x, y = toy.moons(200, 0.0, seed=1)
    assert x.shape == (400, 2) and int(y.sum()) == 200
    n = toy.moon_normals(x, y)
    torch.testing.assert_close(n.norm(dim=1), torch.ones(400, dtype=DT), rtol=1e-12, atol=0)
    # noise-free points lie on their circle: the normal is the radial direction, so x - c = n
    c = torch.tensor(toy.MOON_CENTRES, dtype=DT)[y]
    torch.testing.assert_close(x - c, n, rtol=0, atol=1e-12)


def test_fit_full_batch_and_off_manifold_needs_normals():
    x, y = toy.moons(100, 0.05, seed=0)
    net = toy.fit_full_batch(x, y, steps=200, seed=0)
    with torch.no_grad():
        assert float((net(x).argmax(1) == y).double().mean()) > 0.95
    with pytest.raises(ValueError, match="normals"):
        toy.fit_full_batch(x, y, steps=1, off_manifold=0.3)


def test_walls_on_a_known_profile():
    # g(t) = 0.01 + t^4: leaves the 0.1 band at t = 0.3^(1/2)... solve t^4 = 0.1; reaches log 2 at t^4 = log2 - 0.01
    ts = torch.linspace(0, 2, 20001, dtype=DT)
    g = (0.01 + ts**4)[None]
    out = toy.walls(g, ts, eps=0.1, k=2)
    assert out.reached == 1 and out.total == 1
    assert math.isclose(float(out.radius), 0.1 ** 0.25, abs_tol=2e-4)
    assert math.isclose(float(out.radius + out.gap), (math.log(2) - 0.01) ** 0.25, abs_tol=2e-4)
    # the largest g'' on the wall is 12 t^2 at its far end; Taylor: found >= needed
    assert math.isclose(float(out.found), 12 * (math.log(2) - 0.01) ** 0.5, rel_tol=1e-3)
    assert float(out.found) >= float(out.needed)
    never = toy.walls(torch.zeros(1, 5, dtype=DT), torch.linspace(0, 1, 5, dtype=DT), 0.1, 2)
    assert never.reached == 0 and never.radius.numel() == 0


def test_head_hessian_through_network_is_the_kronecker_form():
    net = toy.blob_mlp(4, 6, 3, seed=1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, dtype=DT, generator=g)
    y = torch.tensor([0, 2, 1])
    h = toy.head_hessian_through_network(net, x, y)
    with torch.no_grad():
        phi = net.features(x)
        p = torch.softmax(net(x), 1)
    m = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    kron = torch.stack([torch.kron(mi, f[:, None] * f[None]) for mi, f in zip(m, phi)])
    torch.testing.assert_close(h, kron, rtol=1e-12, atol=1e-14)


def test_head_hessian_checks_reduce_the_dense_hessians_chunk_by_chunk():
    """Chapter 1's reference at full size: the chunked reductions equal those of the stacked Hessians (computed
    here with numpy from the Kronecker form, independently of the package's reference), for any chunk size."""
    net = toy.blob_mlp(4, 6, 3, seed=1)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(7, 4, dtype=DT, generator=g)
    y = torch.tensor([0, 2, 1, 1, 0, 2, 0])
    with torch.no_grad():
        phi = net.features(x).numpy()
        p = torch.softmax(net(x), 1).numpy()
    w = net.head.weight.detach().numpy()
    h = np.stack([np.kron(np.diag(pi) - np.outer(pi, pi), np.outer(f, f)) for pi, f in zip(p, phi)])
    k, m = w.shape
    blocks = h.reshape(len(h), k, m, k, m)
    neuron = np.einsum("st,nsiti->n", w @ w.T, blocks)
    def kron(f, pr):  # the Kronecker form of the chunk's features and probabilities
        return torch.stack([torch.kron(torch.diag(q) - torch.outer(q, q), torch.outer(a, a)) for q, a in zip(pr, f)])

    def shifted(f, pr):  # a "closed form" off by 1e-3 everywhere
        return kron(f, pr) + 1e-3
    for chunk in (1, 3, 16):
        ref = toy.head_hessian_checks(net, x, y, closed=shifted, chunk=chunk)
        np.testing.assert_allclose(ref["trace"].numpy(), np.trace(h, axis1=1, axis2=2), rtol=1e-12)
        np.testing.assert_allclose(ref["kappa_layer"].numpy(), (w ** 2).sum() * np.trace(h, axis1=1, axis2=2),
                                   rtol=1e-12)
        np.testing.assert_allclose(ref["kappa_neuron"].numpy(), neuron, rtol=1e-10, atol=1e-14)
        assert ref["size"] == k * m
        np.testing.assert_allclose(ref["max_diff"].numpy(), np.full(7, 1e-3), rtol=1e-9)
    ok = toy.head_hessian_checks(net, x, y, closed=kron, chunk=3)
    assert float(ok["max_diff"].max()) < 1e-14
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        toy.head_hessian_checks(net, x, y, closed=shifted, chunk=0)
