"""flatnb.curvature beyond the basic closed form: the streamed closed form on models,
full-network and input-space curvature.  Float64, against independent references
(autograd Hessians, dense eigh)."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from flatnb import curvature as fl
from flatnb import models

DT = torch.float64
torch.set_num_threads(min(2, torch.get_num_threads()))


class Net(nn.Module):
    """Small network following the model contract."""

    def __init__(self, n, h, m, k, act=nn.ReLU, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(n, h), act(), nn.Linear(h, m), act())
        self.head = nn.Linear(m, k)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


def _data(n_samples, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_samples, n, generator=g, dtype=DT), torch.randint(0, k, (n_samples,), generator=g)


def _batches(x, y, size):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


# ----------------------------------------------------------------------------- closed form on models


@pytest.mark.parametrize("n,h,m,k", [(4, 6, 3, 2), (5, 8, 7, 5), (3, 10, 12, 10)])
def test_flatness_over_matches_autograd_hessian(n, h, m, k):
    net = Net(n, h, m, k, seed=n + m + k).to(DT).eval()
    x, y = _data(11, n, k, seed=k)
    res = fl.flatness_over(net, _batches(x, y, 4))
    with torch.no_grad():
        phi = net.features(x)
    w, b = net.head.weight.detach(), net.head.bias.detach()
    hess = fl.last_layer_hessian_autograd(phi, y, w, b)
    layer, neuron = fl.kappa_from_hessian(hess, w)
    trace = torch.diagonal(hess, dim1=-2, dim2=-1).sum(-1)
    t = res.terms
    torch.testing.assert_close(t.trace_h, trace, rtol=1e-10, atol=0)
    torch.testing.assert_close(t.kappa_sq, layer, rtol=1e-10, atol=0)
    torch.testing.assert_close(t.kappa_unsq, layer / w.norm(), rtol=1e-10, atol=0)
    torch.testing.assert_close(t.kappa_neuron, neuron, rtol=1e-10, atol=0)
    torch.testing.assert_close(t.phi_sq, phi.pow(2).sum(1), rtol=1e-12, atol=0)
    # dataset level: the Hessian of the mean loss, one autograd call
    hb = fl.last_layer_hessian_batch_autograd(phi, y, w, b)
    lb, nb = fl.kappa_from_hessian(hb, w)
    torch.testing.assert_close(res.mean["kappa_sq"], lb, rtol=1e-10, atol=0)
    torch.testing.assert_close(res.mean["kappa_neuron"], nb, rtol=1e-10, atol=0)
    torch.testing.assert_close(res.mean["trace_h"], torch.diagonal(hb).sum(), rtol=1e-10, atol=0)
    probs = torch.softmax(net(x), -1).detach()
    torch.testing.assert_close(fl.last_layer_hessian_batch(phi, probs), hb, rtol=1e-10, atol=1e-14)
    # labels, loss and accuracy come along
    ref_loss = F.cross_entropy(net(x), y, reduction="none").detach()
    torch.testing.assert_close(res.loss, ref_loss, rtol=1e-12, atol=0)
    assert torch.equal(res.labels, y)
    assert math.isclose(float(res.mean["accuracy"]), float((net(x).argmax(1) == y).double().mean()))


@pytest.mark.parametrize("name,kw", [
    ("resnet18", {"width": 4}),
    ("wrn28_4", {"depth": 10, "widen": 1}),
    ("vgg11_bn", {"width": 4}),
    ("vit_tiny", {"dim": 16, "depth": 1, "heads": 2}),
])
def test_closed_form_on_every_model_family_head(name, kw):
    torch.manual_seed(0)
    net = models.build(name, 7, **kw).to(DT).eval()
    x = torch.rand(3, 3, 32, 32, dtype=DT)
    y = torch.tensor([0, 3, 6])
    res = fl.flatness_over(net, [(x[:2], y[:2]), (x[2:], y[2:])])
    with torch.no_grad():
        phi = net.features(x)
    w, b = net.head.weight.detach(), net.head.bias.detach()
    hess = fl.last_layer_hessian_autograd(phi, y, w, b)
    layer, neuron = fl.kappa_from_hessian(hess, w)
    torch.testing.assert_close(res.terms.kappa_sq, layer, rtol=1e-10, atol=0)
    torch.testing.assert_close(res.terms.kappa_neuron, neuron, rtol=1e-10, atol=0)
    torch.testing.assert_close(res.terms.trace_h, torch.diagonal(hess, dim1=-2, dim2=-1).sum(-1), rtol=1e-10, atol=0)


def test_float32_close_to_float64_and_model_untouched():
    net = Net(5, 8, 6, 4, seed=3).to(DT).eval()
    x, y = _data(20, 5, 4, seed=1)
    r64 = fl.flatness_over(net, _batches(x, y, 8))
    r32 = fl.flatness_over(net, _batches(x, y, 8), dtype=torch.float32)
    assert r32.terms.kappa_sq.dtype == torch.float32
    assert next(net.parameters()).dtype == DT
    torch.testing.assert_close(r32.terms.kappa_neuron.double(), r64.terms.kappa_neuron, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(r32.mean["kappa_sq"].double(), r64.mean["kappa_sq"], rtol=1e-4, atol=0)


def test_unlabelled_batches():
    net = Net(4, 5, 3, 3).to(DT).eval()
    x, _ = _data(6, 4, 3, seed=2)
    res = fl.flatness_over(net, [x[:3], x[3:]])
    assert res.labels is None and res.loss is None and res.terms.kappa_sq.shape == (6,)
    assert torch.equal(res.pred, net(x).argmax(1))


def test_bad_input_errors():
    net = Net(4, 5, 3, 3).to(DT).eval()
    x, y = _data(6, 4, 3, seed=2)
    with pytest.raises(TypeError, match="contract"):
        fl.flatness_over(nn.Sequential(nn.Linear(4, 3)), [x])
    with pytest.raises(ValueError, match="empty"):
        fl.flatness_over(net, [])
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        fl.flatness_over(net, [x, x * float("nan")])
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        fl.model_flatness(net, torch.full_like(x, float("inf")))
    bad = Net(4, 5, 3, 3).to(DT).eval()
    with torch.no_grad():
        bad.head.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        fl.flatness_over(bad, [x])
    with pytest.raises(ValueError, match=r"\(3, 3\)|columns|rows"):
        fl.closed_form(torch.rand(6, 3, dtype=DT), torch.rand(6, 3, dtype=DT), torch.rand(3, 4, dtype=DT))
    with pytest.raises(ValueError, match="logits must have shape"):
        fl.closed_form(torch.rand(6, 3, dtype=DT), torch.rand(5, 3, dtype=DT), torch.rand(3, 3, dtype=DT))
    bn = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="eval"):
        fl.ParameterHVP(bn, x, y)


# ----------------------------------------------------------------------------- parameter Hessian


class TinyCNN(nn.Module):
    """Conv + BatchNorm (eval) + attention, small enough for a dense Hessian."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.qkv = nn.Linear(2, 6)
        self.head = nn.Linear(2, 3)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def features(self, x):
        t = F.relu(self.bn(self.conv(x))).flatten(2).transpose(1, 2)  # (N, 16 tokens, 2)
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        return F.scaled_dot_product_attention(q, k, v).mean(1)

    def forward(self, x):
        return self.head(self.features(x))


def _dense_param_hessian(op):
    return torch.autograd.functional.hessian(op.loss, op.theta)


@pytest.fixture(scope="module")
def mlp_case():
    net = Net(4, 5, 4, 3, act=nn.Tanh, seed=5).to(DT).eval()
    x, y = _data(8, 4, 3, seed=5)
    op = fl.ParameterHVP(net, x, y)
    return net, x, y, op, _dense_param_hessian(op)


@pytest.mark.parametrize("mode", ["fwd_rev", "double_backward"])
def test_hvp_matches_dense_hessian(mlp_case, mode):
    net, x, y, _, dense = mlp_case
    op = fl.ParameterHVP(net, x, y, mode=mode)
    v = torch.randn(3, op.dim, dtype=DT, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(op(v), v @ dense, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op(v[0]), dense @ v[0], rtol=1e-10, atol=1e-12)
    assert op.mode == mode


def test_hvp_through_batchnorm_and_attention():
    net = TinyCNN().to(DT).eval()
    x = torch.rand(3, 1, 4, 4, dtype=DT)
    y = torch.tensor([0, 2, 1])
    op = fl.ParameterHVP(net, x, y)
    dense = _dense_param_hessian(op)
    v = torch.randn(2, op.dim, dtype=DT, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(op(v), v @ dense, rtol=1e-9, atol=1e-11)
    # the Hessian over a named subset is the matching block
    sub = fl.ParameterHVP(net, x, y, names=["head.weight"])
    w = torch.randn(sub.dim, dtype=DT)
    start = sum(op.numels[: op.names.index("head.weight")])
    block = dense[start : start + sub.dim, start : start + sub.dim]
    torch.testing.assert_close(sub(w), block @ w, rtol=1e-10, atol=1e-12)


def test_hutchinson_within_its_statistical_error(mlp_case):
    net, x, y, op, dense = mlp_case
    n_probes = 400
    est = fl.hutchinson_trace(net, x, y, n_probes=n_probes, chunk=50, generator=torch.Generator().manual_seed(3))
    exact = torch.diagonal(dense).sum()
    # Var(v^T H v) for Rademacher v = 2 (||H||_F^2 - sum_i H_ii^2)
    sigma = math.sqrt(2 * float(dense.pow(2).sum() - torch.diagonal(dense).pow(2).sum()) / n_probes)
    assert abs(float(est.mean - exact)) < 5 * sigma
    assert 0.5 < float(est.stderr) / sigma < 2.0
    assert est.samples.shape == (n_probes,)


def test_top_eigenvalues_match_eigh(mlp_case):
    net, x, y, _, dense = mlp_case
    op = fl.ParameterHVP(net, x, y, mode="double_backward")  # cheapest per call on a tiny net
    evals = torch.linalg.eigvalsh(dense)
    g = torch.Generator().manual_seed(4)
    vals, vecs = fl.hessian_eigenvalues(net, x, y, k=3, n_iter=op.dim, generator=g, hvp=op)
    torch.testing.assert_close(vals, evals.flip(0)[:3], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(vecs @ dense, vals[:, None] * vecs, rtol=1e-6, atol=1e-8)
    # a few Lanczos steps already give the top eigenvalue
    top, _ = fl.hessian_eigenvalues(net, x, y, k=1, n_iter=25, generator=g, hvp=op)
    torch.testing.assert_close(top, evals[-1:], rtol=1e-6, atol=0)
    # power iteration with deflation: largest in magnitude
    by_mag = evals[evals.abs().argsort(descending=True)]
    pw, _ = fl.hessian_eigenvalues(net, x, y, k=2, method="power", n_iter=300, generator=g, hvp=op)
    torch.testing.assert_close(pw, by_mag[:2], rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------- input space


def _dense_input_hessians(net, x, y):
    out = []
    for i in range(len(x)):
        out.append(torch.autograd.functional.hessian(lambda xi: F.cross_entropy(net(xi[None]), y[i : i + 1]), x[i]))
    return torch.stack(out)


@pytest.fixture(scope="module")
def input_case():
    net = Net(5, 7, 6, 4, act=nn.Tanh, seed=9).to(DT).eval()
    x, y = _data(6, 5, 4, seed=9)
    return net, x, y, _dense_input_hessians(net, x, y)


def test_input_gradient_and_hvp(input_case):
    net, x, y, dense = input_case
    xr = x.clone().requires_grad_(True)
    g_ref = torch.autograd.grad(F.cross_entropy(net(xr), y, reduction="sum"), xr)[0]
    torch.testing.assert_close(fl.input_gradient(net, x, y), g_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(fl.input_gradient_norm(net, x, y), g_ref.norm(dim=1), rtol=1e-12, atol=0)
    v = torch.randn(x.shape, dtype=DT, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(fl.input_hvp(net, x, y, v), torch.einsum("nij,nj->ni", dense, v), rtol=1e-10, atol=1e-12)


def test_input_measurements_hold_no_graph(input_case, monkeypatch):
    """Session 10's ch11 OOM: each HVP kept a graph through the parameters (grad_fn set) alive.

    Fails if any input-space measurement returns a tensor that still needs grad, on both AD routes.
    """
    net, x, y, _ = input_case
    assert all(p.requires_grad for p in net.parameters())
    v = torch.randn(x.shape, dtype=DT, generator=torch.Generator().manual_seed(4))
    outs = {
        "input_gradient": fl.input_gradient(net, x, y),
        "input_hvp": fl.input_hvp(net, x, y, v),
        "directional_curvature": fl.directional_curvature(net, x, y, v),
        "input_top_eigenvalue": fl.input_top_eigenvalue(net, x, y, n_iter=3).values,
    }
    for name, t in outs.items():
        assert not t.requires_grad and t.grad_fn is None, name
    # the double-backward route (taken where forward-mode AD is unsupported) too
    def no_jvp(*a, **k):
        raise RuntimeError("forward-mode AD unsupported (forced here)")

    monkeypatch.setattr(torch.func, "jvp", no_jvp)
    w = fl.input_hvp(net, x, y, v)
    assert not w.requires_grad and w.grad_fn is None
    torch.testing.assert_close(w, outs["input_hvp"], rtol=1e-10, atol=1e-12)


def test_directional_curvature(input_case):
    net, x, y, dense = input_case
    d = torch.randn(3, *x.shape, dtype=DT, generator=torch.Generator().manual_seed(3))
    ref = torch.einsum("pni,nij,pnj->pn", d, dense, d) / d.pow(2).sum(-1)
    torch.testing.assert_close(fl.directional_curvature(net, x, y, d), ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fl.directional_curvature(net, x, y, d[0]), ref[0], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="zero"):
        fl.directional_curvature(net, x, y, torch.zeros_like(x))


def test_input_top_eigenvalue(input_case):
    net, x, y, dense = input_case
    evals = torch.linalg.eigvalsh(dense)
    ref = evals.gather(1, evals.abs().argmax(1, keepdim=True))[:, 0]
    res = fl.input_top_eigenvalue(net, x, y, n_iter=300, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(res.values, ref, rtol=1e-6, atol=1e-10)


def test_neighbour_directions():
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(30, 4, dtype=DT, generator=g)
    labels = torch.randint(0, 3, (30,), generator=g)
    d = fl.neighbour_directions(pool[:5], labels[:5], pool, labels)
    for i in range(5):
        cands = [j for j in range(30) if labels[j] == labels[i] and j != i]
        j = min(cands, key=lambda j: float((pool[j] - pool[i]).norm()))
        ref = (pool[j] - pool[i]) / (pool[j] - pool[i]).norm()
        torch.testing.assert_close(d[i], ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_neighbour_directions_many_rows_and_duplicates(dtype):
    """> 25 rows: torch.cdist's matmul path gives self-distances of ~3e-8, not 0 (issue 14)."""
    g = torch.Generator().manual_seed(1)
    pool = torch.rand(200, 3, 4, 4, generator=g).to(dtype)
    labels = torch.randint(0, 4, (200,), generator=g)
    x, y = pool[:60], labels[:60]
    for kw in ({}, {"index": torch.arange(60)}):
        d = fl.neighbour_directions(x, y, pool, labels, **kw)
        assert torch.isfinite(d).all()
        torch.testing.assert_close(d.flatten(1).norm(dim=1), torch.ones(60, dtype=dtype))
        for i in (0, 17, 59):
            cands = [j for j in range(200) if labels[j] == labels[i] and j != i]
            j = min(cands, key=lambda j: float((pool[j].double() - pool[i].double()).norm()))
            ref = (pool[j] - pool[i]) / (pool[j] - pool[i]).norm()
            torch.testing.assert_close(d[i], ref)
    # a duplicate of x_0 in the pool has no direction: the next nearest point is taken
    dup = torch.cat([pool, pool[:1]])
    d = fl.neighbour_directions(x[:1], y[:1], dup, torch.cat([labels, labels[:1]]), index=torch.tensor([0]))
    assert torch.isfinite(d).all()
    with pytest.raises(ValueError, match="index"):
        fl.neighbour_directions(x, y, pool, labels, index=torch.arange(3))


@settings(max_examples=15, deadline=None)
@given(k=st.integers(2, 6), m=st.integers(1, 6), n=st.integers(1, 5), seed=st.integers(0, 10_000))
def test_model_flatness_matches_autograd_property(k, m, n, seed):
    net = Net(3, 4, m, k, seed=seed).to(DT).eval()
    x, y = _data(n, 3, k, seed=seed)
    terms, logits = fl.model_flatness(net, x)
    with torch.no_grad():
        phi = net.features(x)
    hess = fl.last_layer_hessian_autograd(phi, y, net.head.weight.detach(), net.head.bias.detach())
    layer, neuron = fl.kappa_from_hessian(hess, net.head.weight.detach())
    torch.testing.assert_close(terms.kappa_sq, layer, rtol=1e-10, atol=1e-300)
    torch.testing.assert_close(terms.kappa_neuron, neuron, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(logits, net(x), rtol=0, atol=0)


def test_vit_curvature_both_ad_routes_agree():
    """Through real attention: forward-over-reverse and double backward (math SDPA forced)."""
    torch.manual_seed(0)
    vit = models.build("vit_tiny", 5, dim=8, depth=1, heads=2).to(DT).eval()
    x = torch.rand(2, 3, 32, 32, dtype=DT)
    y = torch.tensor([1, 3])
    a = fl.ParameterHVP(vit, x, y, mode="fwd_rev")
    b = fl.ParameterHVP(vit, x, y, mode="double_backward")
    v = torch.randn(2, a.dim, dtype=DT, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a(v), b(v), rtol=1e-9, atol=1e-12)
    # input-space: directional curvature equals a central second difference of the loss
    d = torch.randn(x.shape, dtype=DT, generator=torch.Generator().manual_seed(1))
    d = d / d.flatten(1).norm(dim=1)[:, None, None, None]
    curv = fl.directional_curvature(vit, x, y, d)
    h = 1e-3
    with torch.no_grad():
        def loss(z):
            return F.cross_entropy(vit(z), y, reduction="none")
        fd = (loss(x + h * d) - 2 * loss(x) + loss(x - h * d)) / h**2
    torch.testing.assert_close(curv, fd, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- directions on / off the manifold


def _augment(x, kind, s):
    """Independent reference: the augmentation itself (grid_sample / torchvision), no clamping."""
    if kind in ("shift_x", "shift_y"):
        n, _, h, w = x.shape
        ys, xs = torch.meshgrid(torch.arange(h, dtype=DT), torch.arange(w, dtype=DT), indexing="ij")
        if kind == "shift_x":
            xs = xs + s
        else:
            ys = ys + s
        # align_corners=True: pixel j sits at -1 + 2 j / (w - 1)
        grid = torch.stack([2 * xs / (w - 1) - 1, 2 * ys / (h - 1) - 1], dim=-1).expand(n, h, w, 2)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)
    import torchvision.transforms.functional as TF

    fn = TF.adjust_brightness if kind == "brightness" else TF.adjust_contrast
    return fn(x, 1 + s)


def test_augmentation_directions_are_the_augmentations_tangents():
    g = torch.Generator().manual_seed(0)
    # pixels inside (0.1, 0.9) so torchvision's clamp to [0, 1] does not bind for small factors
    x = 0.1 + 0.8 * torch.rand(3, 3, 6, 7, generator=g, dtype=DT)
    d = fl.augmentation_directions(x)
    assert d.shape == (len(fl.AUGMENTATIONS), *x.shape)
    torch.testing.assert_close(d.flatten(2).norm(dim=-1), torch.ones(d.shape[:2], dtype=DT), rtol=1e-12, atol=0)
    h = 1e-6
    for p, kind in enumerate(fl.AUGMENTATIONS):
        # one-sided difference: bilinear shifts are linear in s on [0, 1), the others linear in s
        fd = (_augment(x, kind, h) - x) / h
        ref = fd / fd.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        torch.testing.assert_close(d[p], ref, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="vanishes"):
        fl.augmentation_directions(torch.full((1, 3, 4, 4), 0.5, dtype=DT), kinds=("shift_x",))
    with pytest.raises(ValueError, match="kinds"):
        fl.augmentation_directions(x, kinds=("rotate",))


def test_loss_along_matches_curvature_by_finite_differences(input_case):
    net, x, y, dense = input_case
    d = fl.unit_directions(torch.randn(x.shape, dtype=DT, generator=torch.Generator().manual_seed(5)), input_dims=1)
    torch.testing.assert_close(d.norm(dim=1), torch.ones(len(x), dtype=DT), rtol=1e-12, atol=0)
    h = 1e-4
    prof = fl.loss_along(net, x, y, d, [-h, 0.0, h])
    assert prof.shape == (3, len(x)) and bool((prof[1] == 0).all())
    ref = torch.einsum("ni,nij,nj->n", d, dense, d)
    torch.testing.assert_close((prof[0] + prof[2]) / h**2, ref, rtol=1e-5, atol=1e-6)
    # and the loss change itself against direct evaluation
    t = 0.7
    direct = F.cross_entropy(net(x + t * d), y, reduction="none") - F.cross_entropy(net(x), y, reduction="none")
    torch.testing.assert_close(fl.loss_along(net, x, y, d, [t])[0], direct.detach(), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="zero"):
        fl.unit_directions(torch.zeros(2, 5, dtype=DT), input_dims=1)
