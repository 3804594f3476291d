"""flatnb.measure.robust_flatness (Stutz et al. 2021): zero radius, known answers on a quadratic, worst >= average,
and the scale invariances the relative perturbations are built for."""
import math

import pytest
import torch
import torch.nn as nn

from flatnb.measure import robust_flatness as rf


def _quadratic(d=4, seed=0):
    """L(w) = ½ (w - w0)ᵀ A (w - w0) at its minimum w = w0 (‖w0‖ = 1), A with eigenvalues 4, 2, 1, 0.5."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    lam = torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    a = q @ torch.diag(lam) @ q.T
    w0 = torch.randn(d, generator=g, dtype=torch.float64)
    w0 /= w0.norm()
    w = w0.clone().requires_grad_(True)
    return w, (lambda: 0.5 * (w - w0) @ a @ (w - w0)), lam


def test_zero_radius_changes_nothing():
    w, loss, _ = _quadratic()
    inc, base = rf.average_case(loss, [w], 0.0, 5, generator=torch.Generator().manual_seed(0))
    assert base == 0.0 and torch.equal(inc, torch.zeros(5, dtype=torch.float64))
    worst, _ = rf.worst_case(loss, [w], 0.0, 10, generator=torch.Generator().manual_seed(0))
    assert worst == 0.0


def test_quadratic_average_and_worst_case_match_their_closed_forms():
    """Uniform on the sphere of radius r: E[½ νᵀAν] = ½ r² Tr A / d; the worst case in the ball: ½ r² λ_max."""
    w, loss, lam = _quadratic()
    xi = 0.3  # ‖w0‖ = 1, so the radius is 0.3
    inc, _ = rf.average_case(loss, [w], xi, 4000, generator=torch.Generator().manual_seed(1))
    want = 0.5 * xi**2 * float(lam.sum()) / 4
    se = float(inc.std()) / math.sqrt(len(inc))
    assert abs(float(inc.mean()) - want) < 4 * se and se < 0.05 * want
    worst, _ = rf.worst_case(loss, [w], xi, steps=60, generator=torch.Generator().manual_seed(2))
    assert worst == pytest.approx(0.5 * xi**2 * float(lam.max()), rel=1e-3)
    # ... and w stays where it was
    inc2, base = rf.average_case(loss, [w], xi, 1, generator=torch.Generator().manual_seed(1))
    assert base == 0.0


def test_random_perturbations_lie_on_the_relative_sphere_and_projection_on_the_ball():
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(5, 3, 2, 2, generator=g), torch.randn(5, generator=g)]
    for gran in ("layer", "filter"):
        nu = rf.random_perturbation(params, 0.1, gran, torch.Generator().manual_seed(1))
        for v, p in zip(nu, params):
            if gran == "layer":
                assert float(v.norm()) == pytest.approx(0.1 * float(p.norm()), rel=1e-5)
            else:
                assert torch.allclose(v.reshape(5, -1).norm(dim=1), 0.1 * p.reshape(5, -1).norm(dim=1), rtol=1e-5)
        big = [3 * v for v in nu]
        back = rf.project(big, params, 0.1, gran)
        assert all(torch.allclose(b, v, rtol=1e-5, atol=1e-7) for b, v in zip(back, nu))
        inside = [0.5 * v for v in nu]
        assert all(torch.equal(a, b) for a, b in zip(rf.project(inside, params, 0.1, gran), inside))
    with pytest.raises(ValueError, match="granularity"):
        rf.random_perturbation(params, 0.1, "neuron")
    with pytest.raises(ValueError, match="xi"):
        rf.project(params, params, -1.0)


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4, eps=0.0)
        self.head = nn.Linear(4, 3)

    def features(self, x):
        return torch.relu(self.bn(self.conv(x))).mean((2, 3))

    def forward(self, x):
        return self.head(self.features(x))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


def _convbn(seed=0):
    torch.manual_seed(seed)
    m = ConvBN().double().eval()
    m.bn.running_mean.uniform_(-0.2, 0.2)
    m.bn.running_var.uniform_(0.5, 2.0)
    m.bn.weight.data.uniform_(0.5, 1.5)
    m.bn.bias.data.uniform_(-0.1, 0.1)
    return m


def test_filter_wise_flatness_is_invariant_to_rescaling_filters_before_batchnorm():
    """Scaling conv filter f by c_f (and the BN running statistics with it) leaves the network unchanged; filter-wise
    relative perturbations scale with the filter, so the robust flatness is unchanged too; layer-wise ones are not
    (the test fails if the granularity were ignored)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=g)
    a, b = _convbn(), _convbn()
    c = torch.tensor([0.1, 3.0, 1.0, 7.0], dtype=torch.float64)
    with torch.no_grad():
        b.conv.weight.mul_(c[:, None, None, None])
        b.bn.running_mean.mul_(c)
        b.bn.running_var.mul_(c**2)
    assert torch.allclose(a(x), b(x), atol=1e-12)
    kw = dict(eps=4 / 255, pgd_steps=3, pgd_step_size=2 / 255, xi_average=0.3, n_samples=3, xi_worst=0.05,
              worst_steps=3)
    fa, fb = (rf.robust_flatness(m, x, y, granularity="filter", **kw) for m in (a, b))
    assert fa["robust_loss"] == pytest.approx(fb["robust_loss"], rel=1e-9)
    assert fa["average"] == pytest.approx(fb["average"], rel=1e-6) and fa["worst"] == pytest.approx(fb["worst"], rel=1e-6)
    la, lb = (rf.robust_flatness(m, x, y, granularity="layer", **kw) for m in (a, b))
    assert abs(la["average"] - lb["average"]) > 1e-3 * abs(la["average"])


def test_layer_wise_flatness_is_invariant_to_rescaling_a_relu_layer():
    """W1, b1 → c·W1, c·b1 and W2 → W2 / c: the same ReLU network, and layer-wise relative perturbations scale
    with each layer, so the robust flatness is the same."""
    torch.manual_seed(1)
    a, b = MLP().double().eval(), MLP().double().eval()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        b.body[1].weight.mul_(5.0), b.body[1].bias.mul_(5.0), b.head.weight.div_(5.0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(8, 3, 2, 2, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
    kw = dict(eps=8 / 255, pgd_steps=3, pgd_step_size=3 / 255, xi_average=0.2, n_samples=4, xi_worst=0.05,
              worst_steps=5)
    fa, fb = rf.robust_flatness(a, x, y, **kw), rf.robust_flatness(b, x, y, **kw)
    for k in ("robust_loss", "average", "worst"):
        assert fa[k] == pytest.approx(fb[k], rel=1e-6), k


def test_worst_case_is_at_least_the_average_case_and_the_robust_loss_at_least_the_clean_loss():
    m = _convbn(2)
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(8, 3, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
    params = rf.perturbable(m)
    assert all(p is not m.bn.weight and p is not m.bn.bias for p in params) and len(params) == 3
    clean = float(rf.robust_loss(m, x, y, 8 / 255, 0, 0.0))
    loss = lambda: rf.robust_loss(m, x, y, 8 / 255, 5, 2 / 255)  # noqa: E731
    assert float(loss()) > clean
    avg, _ = rf.average_case(loss, params, 0.1, 6, generator=torch.Generator().manual_seed(0))
    worst, _ = rf.worst_case(loss, params, 0.1, 5, generator=torch.Generator().manual_seed(0))
    assert worst >= float(avg.max()) >= float(avg.mean())
    before = [p.detach().clone() for p in params]
    rf.worst_case(loss, params, 0.1, 2, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(p, q) for p, q in zip(params, before))  # the weights are restored
