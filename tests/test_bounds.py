"""flatnb.curvature.bounds: the lemma, Lipschitz constants, the local bound against a strong l2 PGD."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from flatnb.curvature import bounds as bd
from flatnb import curvature as fl

DT = torch.float64
torch.set_num_threads(min(2, torch.get_num_threads()))


# ----------------------------------------------------------------------------- lemma


@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 4), seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([1e-6, 1e-2, 1.0, 1e3]))
def test_lemma_reconstructs_phi_xi_to_machine_precision(m, n, seed, scale):
    g = torch.Generator().manual_seed(seed)
    phi_x = torch.randn(n, m, dtype=DT, generator=g)
    phi_xi = phi_x + scale * torch.randn(n, m, dtype=DT, generator=g)
    lem = bd.householder_lemma(phi_x, phi_xi)
    a = bd.householder_matrix(lem.u)
    eye = torch.eye(m, dtype=DT).expand(n, m, m)
    torch.testing.assert_close(a @ a.transpose(1, 2), eye, rtol=0, atol=1e-13)
    recon = phi_x + lem.delta[:, None] * torch.einsum("nij,nj->ni", a, phi_x)
    torch.testing.assert_close(recon, phi_xi, rtol=0, atol=1e-13 * (1 + float(phi_xi.abs().max())))
    torch.testing.assert_close(bd.apply_householder(lem.u, phi_x), torch.einsum("nij,nj->ni", a, phi_x), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(lem.delta, (phi_xi - phi_x).norm(dim=1) / phi_x.norm(dim=1), rtol=1e-14, atol=0)


@pytest.mark.parametrize("kind", ["same", "parallel", "antiparallel"])
def test_lemma_edge_cases(kind):
    phi_x = torch.tensor([[3.0, -1.0, 2.0]], dtype=DT)
    phi_xi = {"same": phi_x, "parallel": 2.5 * phi_x, "antiparallel": -0.5 * phi_x}[kind]
    lem = bd.householder_lemma(phi_x, phi_xi)
    recon = phi_x + lem.delta[:, None] * bd.apply_householder(lem.u, phi_x)
    torch.testing.assert_close(recon, phi_xi, rtol=0, atol=1e-14)
    a = bd.householder_matrix(lem.u)[0]
    torch.testing.assert_close(a @ a.T, torch.eye(3, dtype=DT), rtol=0, atol=1e-14)
    # and the weight-perturbation identity w phi(xi) = (w + Delta w A) phi(x)
    w = torch.randn(4, 3, dtype=DT)
    torch.testing.assert_close(w @ phi_xi[0], (w + lem.delta[0] * w @ a) @ phi_x[0], rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match="phi\\(x\\) = 0"):
        bd.householder_lemma(torch.zeros(1, 3, dtype=DT), phi_xi)


# ----------------------------------------------------------------------------- Lipschitz


def _cnn(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.LeakyReLU(0.1), nn.Flatten(), nn.Linear(4 * 2 * 2, 5), nn.Tanh(),
    ).to(DT)
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.3, 3)
        net[1].weight.uniform_(0.5, 2)
    return net.eval()


def test_conv_spectral_norm_matches_dense_operator():
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1).to(DT)
    with torch.no_grad():  # fixed weights: the convergence rate depends on their spectral gap
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=torch.Generator().manual_seed(1), dtype=DT))
    shape = (2, 7, 7)
    jac = torch.autograd.functional.jacobian(lambda v: F.conv2d(v[None], conv.weight, None, 2, 1)[0], torch.zeros(shape, dtype=DT))
    dense = torch.linalg.matrix_norm(jac.reshape(-1, math.prod(shape)), ord=2)
    got = bd.global_lipschitz(nn.Sequential(conv), shape, n_iter=500, generator=torch.Generator().manual_seed(0))
    # power iteration approaches the norm from below
    assert got <= dense * (1 + 1e-12)
    torch.testing.assert_close(got, dense, rtol=1e-8, atol=0)


def test_global_lipschitz_of_mlp_is_product_of_spectral_norms():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3), nn.Sigmoid()).to(DT)
    ref = np.linalg.norm(net[0].weight.detach().numpy(), 2) * np.linalg.norm(net[2].weight.detach().numpy(), 2) * 0.25
    assert math.isclose(float(bd.global_lipschitz(net, (5,))), ref, rel_tol=1e-12)


def test_global_ge_local_ge_finite_difference():
    net = _cnn()
    x = torch.rand(8, 2, 8, 8, dtype=DT, generator=torch.Generator().manual_seed(1))
    glob = bd.global_lipschitz(net, (2, 8, 8), n_iter=200)
    loc = bd.local_lipschitz(net, x, n_iter=100, generator=torch.Generator().manual_seed(2))
    # the local value is ||J(x)||_2: compare with the dense Jacobian of each sample
    for i in range(3):
        jac = torch.autograd.functional.jacobian(lambda z: net(z[None])[0], x[i]).reshape(5, -1)
        torch.testing.assert_close(loc[i], torch.linalg.matrix_norm(jac, ord=2), rtol=1e-6, atol=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for h in (1e-6, 1e-3, 0.5):
            d = torch.randn(x.shape, dtype=DT, generator=g)
            d = h * d / d.flatten(1).norm(dim=1)[:, None, None, None]
            ratio = (net(x + d) - net(x)).norm(dim=1) / h
            assert bool((ratio <= glob * (1 + 1e-9)).all())
            if h == 1e-6:  # same linear region: below the local norm
                assert bool((ratio <= loc * (1 + 1e-4)).all())
    assert bool((loc <= glob * (1 + 1e-9)).all())


def test_global_lipschitz_rejects_unknown_layers():
    class Res(nn.Module):
        def forward(self, x):
            return x + x

    with pytest.raises(TypeError, match="not handled"):
        bd.global_lipschitz(nn.Sequential(nn.Linear(3, 3), Res()), (3,))
    with pytest.raises(ValueError, match="eval"):
        bd.global_lipschitz(nn.Sequential(nn.BatchNorm1d(3).train()), (3,))


# ----------------------------------------------------------------------------- the bound vs PGD


def _pgd_l2_max(loss_fn, x, delta, steps=60, restarts=3, generator=None):
    """Strong l2 PGD loss maximiser (normalised steps, random restarts, best iterate kept)."""
    best = loss_fn(x).detach()
    shape = (-1,) + (1,) * (x.dim() - 1)
    for r in range(restarts):
        if r == 0:
            eta = torch.zeros_like(x)
        else:
            eta = torch.randn(x.shape, dtype=x.dtype, generator=generator)
            eta = eta / eta.flatten(1).norm(dim=1).view(shape) * delta * torch.rand(x.shape[0], dtype=x.dtype, generator=generator).view(shape)
        for t in range(steps):
            step = delta * (0.5 if t < steps // 2 else 0.1)
            z = (x + eta).requires_grad_(True)
            loss = loss_fn(z)
            best = torch.maximum(best, loss.detach())
            (g,) = torch.autograd.grad(loss.sum(), z)
            gn = g.flatten(1).norm(dim=1).clamp_min(1e-30).view(shape)
            eta = eta + step * g / gn
            n = eta.flatten(1).norm(dim=1).view(shape)
            eta = eta * torch.clamp(delta / n.clamp_min(1e-30), max=1.0)
        with torch.no_grad():
            best = torch.maximum(best, loss_fn(x + eta))
    return best


@pytest.mark.parametrize("seed,scale", [(0, 1.0), (1, 3.0)])
def test_bound_never_violated_by_strong_pgd(seed, scale):
    torch.manual_seed(seed)
    n_in, m, k, n_pts = 10, 32, 5, 200
    w1 = torch.randn(m, n_in, dtype=DT) / math.sqrt(n_in)
    b1 = 0.5 + 0.1 * torch.randn(m, dtype=DT)
    w2 = scale * torch.randn(k, m, dtype=DT) / math.sqrt(m)
    b2 = 0.1 * torch.randn(k, dtype=DT)

    def phi(z):
        return torch.relu(z @ w1.T + b1)

    x = torch.randn(n_pts, n_in, dtype=DT)
    with torch.no_grad():
        logits = phi(x) @ w2.T + b2
    y = logits.argmax(1)
    y[::4] = torch.randint(0, k, (len(y[::4]),))  # some misclassified points too

    def loss_fn(z):
        return F.cross_entropy(phi(z) @ w2.T + b2, y, reduction="none")

    lip = torch.linalg.matrix_norm(w1, ord=2)  # ReLU is 1-Lipschitz: L = ||W1||_op
    coeffs = bd.bound_coefficients(phi(x), logits, y, w2, lip)
    coeffs_layer = bd.bound_coefficients(phi(x), logits, y, w2, lip, kappa="layer")
    clean = loss_fn(x)
    g = torch.Generator().manual_seed(seed)
    worst_ratio = 0.0
    for delta in (0.01, 0.05, 0.2, 0.5):
        adv = _pgd_l2_max(loss_fn, x, delta, generator=g)
        change = adv - clean
        bound = bd.local_bound(coeffs, delta).total
        assert bool((change <= bound * (1 + 1e-10) + 1e-14).all()), float((change / bound).max())
        assert bool((bound <= bd.local_bound(coeffs_layer, delta).total * (1 + 1e-12)).all())
        # the attack is strong: at least as good as one full gradient step of length delta
        xr = x.clone().requires_grad_(True)
        (gx,) = torch.autograd.grad(loss_fn(xr).sum(), xr)
        with torch.no_grad():
            fgm = loss_fn(x + delta * gx / gx.norm(dim=1, keepdim=True)) - clean
        assert bool((change >= fgm - 1e-12).all())
        worst_ratio = max(worst_ratio, float((change / bound).max()))
    assert worst_ratio > 0.05  # the bound is not vacuous on these small nets


def test_terms_and_radius():
    g = torch.Generator().manual_seed(5)
    phi = torch.rand(7, 6, dtype=DT, generator=g) + 0.1
    w = torch.randn(4, 6, dtype=DT, generator=g)
    logits = phi @ w.T
    y = torch.randint(0, 4, (7,), generator=g)
    lip, eps = 1.7, 0.3
    c = bd.bound_coefficients(phi, logits, y, w, lip)
    # independent recomputation of every coefficient from its formula
    p = torch.softmax(logits, 1)
    w_op = float(np.linalg.norm(w.numpy(), 2))
    hess = fl.last_layer_hessian_autograd(phi, y, w)
    _, kap = fl.kappa_from_hessian(hess, w)
    torch.testing.assert_close(c.first, math.sqrt(2) * (1 - p.gather(1, y[:, None])[:, 0]) * w_op * lip, rtol=1e-12, atol=0)
    torch.testing.assert_close(c.second, lip**2 * kap / (2 * phi.pow(2).sum(1)), rtol=1e-10, atol=0)
    torch.testing.assert_close(c.third, torch.full((7,), math.sqrt(2) / 12 * (w_op * lip) ** 3, dtype=DT), rtol=1e-12, atol=0)
    rad = bd.robust_radius(c, eps)
    for i in range(7):  # numpy's companion-matrix roots as the reference
        roots = np.roots([float(c.third[i]), float(c.second[i]), float(c.first[i]), -eps])
        real = [r.real for r in roots if abs(r.imag) < 1e-9 and r.real > 0]
        assert len(real) == 1
        assert math.isclose(float(rad[i]), real[0], rel_tol=1e-10)
    torch.testing.assert_close(bd.local_bound(c, rad).total, torch.full((7,), eps, dtype=DT), rtol=1e-10, atol=0)
    cap = bd.cubic_cap(w, lip, eps)
    quad = bd.quadratic_radius(kap, lip, phi.norm(dim=1), eps)
    assert bool((rad <= cap * (1 + 1e-12)).all()) and bool((rad <= quad * (1 + 1e-12)).all())
    # with first and third order switched off the radius is exactly the quadratic one
    only2 = bd.BoundCoefficients(torch.zeros(7, dtype=DT), c.second, torch.zeros(7, dtype=DT))
    torch.testing.assert_close(bd.robust_radius(only2, eps), quad, rtol=1e-12, atol=0)
    only3 = bd.BoundCoefficients(torch.zeros(7, dtype=DT), torch.zeros(7, dtype=DT), c.third)
    torch.testing.assert_close(bd.robust_radius(only3, eps), cap.expand(7), rtol=1e-12, atol=0)
    assert bool(torch.isinf(bd.robust_radius(bd.BoundCoefficients(*(torch.zeros(1, dtype=DT),) * 3), eps)).all())


def test_reported_bound_is_labelled_formula():
    kap, r = torch.tensor([0.4], dtype=DT), torch.tensor([2.0], dtype=DT)
    t = bd.reported_bound(kap, 1.5, r, k=10, m=512, delta=0.1)
    assert math.isclose(float(t.second), 0.1**2 * 1.5**2 * 0.4 / (2 * 4.0), rel_tol=1e-14)
    assert math.isclose(float(t.third), 0.1**3 * 10 * 512 * 1.5**6 / (24 * 8.0), rel_tol=1e-14)
    assert float(t.first) == 0.0
    assert "unconfirmed" in bd.reported_bound.__doc__.lower()


def test_bound_bad_input():
    phi, logits, w = torch.rand(3, 4, dtype=DT), torch.rand(3, 2, dtype=DT), torch.rand(2, 4, dtype=DT)
    y = torch.tensor([0, 1, 0])
    with pytest.raises(ValueError, match=r"\(2, 4\)"):
        bd.bound_coefficients(phi, logits, y, w.T, 1.0)
    with pytest.raises(ValueError, match="labels"):
        bd.bound_coefficients(phi, logits, y[:2], w, 1.0)
    with pytest.raises(FloatingPointError):
        bd.bound_coefficients(phi, logits * float("nan"), y, w, 1.0)
    with pytest.raises(ValueError, match="r must"):
        bd.bound_coefficients(phi, logits, y, w, 1.0, r=phi.norm(dim=1) * 2)
    with pytest.raises(ValueError, match="eps"):
        bd.robust_radius(bd.bound_coefficients(phi, logits, y, w, 1.0), 0.0)


# ----------------------------------------------------------------------------- adaptive pooling, a posteriori, Haar, log kappa


@pytest.mark.parametrize("size_in,size_out", [((8, 8), 4), ((7, 5), (3, 2)), ((3, 3), 5), ((4, 6), (4, 6))])
def test_adaptive_pool_bound_is_an_upper_bound_and_tight_when_regular(size_in, size_out):
    pool = nn.AdaptiveAvgPool2d(size_out)
    jac = torch.autograd.functional.jacobian(lambda v: pool(v[None, None])[0, 0], torch.zeros(size_in, dtype=DT))
    dense = float(torch.linalg.matrix_norm(jac.reshape(-1, math.prod(size_in)), ord=2))
    got = float(bd.global_lipschitz(nn.Sequential(pool), (1, *size_in)))
    assert got >= dense * (1 - 1e-12)
    if size_in[0] % 4 == 0 and size_out == 4:  # non-overlapping equal windows: exactly 1/sqrt(window)
        assert math.isclose(got, dense, rel_tol=1e-12) and math.isclose(got, 0.5, rel_tol=1e-12)
    if size_in == (3, 3):  # upsampling: the norm exceeds 1, which the old "1 is safe" missed
        assert dense > 1.0


def _linear_net(k, m, seed):
    from flatnb.models import HeadModel

    torch.manual_seed(seed)
    return HeadModel(nn.Sequential(nn.Linear(6, m), nn.ReLU()), nn.Linear(m, k)).double().eval()


@pytest.mark.parametrize("scale", [1e-4, 1e-2, 0.5])
def test_a_posteriori_chain_holds_and_is_tight_at_small_perturbations(scale):
    net = _linear_net(5, 12, 0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 6, dtype=DT, generator=g)
    xi = x + scale * torch.randn(300, 6, dtype=DT, generator=g)
    with torch.no_grad():
        phi_x, phi_xi = net.features(x), net.features(xi)
        z = net(x)
    y = torch.randint(0, 5, (300,), generator=g)
    w, b = net.head.weight.detach(), net.head.bias.detach()
    ap = bd.a_posteriori(phi_x, phi_xi, z, y, w, b)
    # independent: the loss change from the network's own forward pass
    with torch.no_grad():
        ref = F.cross_entropy(net(xi), y, reduction="none") - F.cross_entropy(z, y, reduction="none")
    torch.testing.assert_close(ap.actual, ref, rtol=1e-12, atol=1e-15)
    assert bool((ap.actual <= ap.expansion + 1e-15).all())
    assert bool((ap.expansion <= ap.realised * (1 + 1e-12) + 1e-15).all())
    lip = torch.linalg.matrix_norm(net.body[0].weight.detach(), ord=2)
    delta = (xi - x).norm(dim=1)
    coeffs = bd.bound_coefficients(phi_x, z, y, w, lip)
    assert bool((ap.realised <= bd.local_bound(coeffs, delta).total * (1 + 1e-12)).all())
    if scale == 1e-4:  # the expansion is the Taylor series: tight to O(|u|^3)
        ratio = ap.actual / ap.expansion
        keep = ap.expansion.abs() > 1e-9
        assert float((ratio[keep] - 1).abs().max()) < 1e-2


def test_a_posteriori_catches_a_wrong_constant():
    # halve the second-order term: the expansion then falls below the truth somewhere
    net = _linear_net(4, 10, 3)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(400, 6, dtype=DT, generator=g)
    d = torch.randn(400, 6, dtype=DT, generator=g)
    with torch.no_grad():
        phi_x, z = net.features(x), net(x)
        y = z.argmax(1)
        # direction where the first-order term vanishes: along the classes' mean, second order dominates
        phi_xi = net.features(x + 0.3 * d)
    ap = bd.a_posteriori(phi_x, phi_xi, z, y, net.head.weight.detach(), net.head.bias.detach())
    u = (phi_xi - phi_x) @ net.head.weight.detach().T
    p = torch.softmax(z, 1)
    quad = (p * u * u).sum(1) - (p * u).sum(1) ** 2
    wrong = ap.expansion - quad / 4 - bd._C3 * u.norm(dim=1) ** 3  # second order halved, no third-order term
    assert bool((ap.actual > wrong + 1e-12).any())
    assert bool((ap.actual <= ap.expansion + 1e-15).all())


def test_haar_orthogonal_is_orthogonal_and_uniform():
    a = bd.haar_orthogonal(4000, 5, torch.Generator().manual_seed(0))
    torch.testing.assert_close(a @ a.transpose(1, 2), torch.eye(5, dtype=DT).expand(4000, 5, 5), rtol=0, atol=1e-13)
    phi = torch.tensor([3.0, -1.0, 0.5, 2.0, 0.0], dtype=DT)
    ap = a @ phi  # uniform on the sphere of radius |phi|: E[(A phi)_i^2] = |phi|^2 / m
    mean, se = ap.pow(2).mean(0), ap.pow(2).std(0) / math.sqrt(4000)
    assert bool(((mean - phi.pow(2).sum() / 5).abs() < 4.5 * se).all())
    # without the sign fix the first column of Q is biased towards positive first entries
    assert abs(float((a[:, 0, 0] > 0).double().mean()) - 0.5) < 0.05


def test_haar_quadratic_forms_match_a_loop_and_average_to_the_trace():
    g = torch.Generator().manual_seed(3)
    phi = torch.randn(3, 6, dtype=DT, generator=g)
    b = torch.randn(3, 6, 6, dtype=DT, generator=g)
    sigma = b @ b.transpose(1, 2)  # symmetric positive semi-definite, like W^T M W
    q, first = bd.haar_quadratic_forms(phi, sigma, 2500, torch.Generator().manual_seed(0), chunk=1000)
    assert q.shape == (3, 2500) and first.shape == (1000, 6, 6)
    # the first chunk, one rotation and one input at a time: (A phi)^T Sigma (A phi)
    direct = torch.tensor([[float((a @ phi[i]) @ sigma[i] @ (a @ phi[i])) for a in first[:50]] for i in range(3)],
                          dtype=DT)
    torch.testing.assert_close(q[:, :50], direct, rtol=1e-12, atol=1e-12)
    # E_A[(A phi)^T Sigma (A phi)] = |phi|^2 Tr(Sigma) / m for A uniform on O(m)
    want = phi.pow(2).sum(1) * torch.einsum("nii->n", sigma) / 6
    se = q.std(1) / math.sqrt(q.shape[1])
    assert bool(((q.mean(1) - want).abs() < 4.5 * se).all())
    with pytest.raises(ValueError, match=r"need phi \(N, m\) and sigma \(N, m, m\)"):
        bd.haar_quadratic_forms(phi, sigma[:, :5], 10)
    with pytest.raises(ValueError, match="n >= 1"):
        bd.haar_quadratic_forms(phi, sigma, 0)


def test_log_kappa_matches_closed_form_and_survives_underflow():
    import mpmath

    g = torch.Generator().manual_seed(2)
    phi = torch.rand(6, 8, dtype=DT, generator=g) + 0.1
    w = torch.randn(4, 8, dtype=DT, generator=g)
    z = phi @ w.T
    t = fl.closed_form(phi, z, w)
    torch.testing.assert_close(bd.log_kappa(phi, z, w, "sq"), t.kappa_sq.log(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bd.log_kappa(phi, z, w, "neuron"), t.kappa_neuron.log(), rtol=1e-12, atol=1e-12)
    s = 5000.0  # kappa underflows to exactly 0 in float64 here
    big = fl.closed_form(phi, s * z, s * w)
    assert float(big.kappa_sq.min()) == 0.0 and float(big.kappa_neuron.min()) == 0.0
    got = bd.log_kappa(phi, s * z, s * w, "sq")
    assert bool(torch.isfinite(got).all())
    mpmath.mp.dps = 60
    for i in range(3):  # 60-digit reference: log(||sw||^2 sum_{s != s'} p_s p_s' ||phi||^2)
        e = [mpmath.exp(mpmath.mpf(float(v))) for v in s * z[i]]
        tot = mpmath.fsum(e)
        p = [q / tot for q in e]  # 1 - p_s as the sum of the others: 60 digits cannot hold 1 - (1 - 1e-3000)
        gini = mpmath.fsum(p[a] * mpmath.fsum(p[b] for b in range(len(p)) if b != a) for a in range(len(p)))
        ref = mpmath.log(gini * mpmath.mpf(float((s * w).pow(2).sum())) * mpmath.mpf(float(phi[i].pow(2).sum())))
        assert math.isclose(float(got[i]), float(ref), rel_tol=1e-10)
    with pytest.raises(ValueError, match="kind"):
        bd.log_kappa(phi, z, w, "other")
