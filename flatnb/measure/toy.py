"""Small problems the theory chapters (1-4) solve in seconds: synthetic data, short fits, 2-D landscapes.

* :func:`blobs` and :func:`fit` — chapter 1's ten Gaussian classes and the minibatch fit of an
  :class:`flatnb.models.architectures.MLP` (no dataset needed).
* :func:`train_small_relu` — chapters 2 and 3's :class:`flatnb.models.architectures.SmallReLUNet`, a chain of
  Lipschitz layers that :func:`flatnb.curvature.bounds.global_lipschitz` can certify, trained for a few epochs.
* :func:`head_hessian_through_network`, :func:`high_precision_terms` — chapter 1's references:
  autograd through the whole network, and 50-digit ``Tr H`` and ``kappa^phi_Tr``.
* :func:`moons`, :func:`moon_normals`, :func:`fit_full_batch`, :func:`normal_profiles`, :func:`walls` —
  chapter 4's two-moons landscape and the loss along the manifold's normals
  (Walter et al. 2026, §4.4: robustness beyond the local ball is set by how the loss curves off the
  data manifold).

Everything is a plain function of tensors with an explicit generator or seed; nothing global.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from flatnb import data as fdata
from flatnb.curvature.reference import kappa_from_hessian

from flatnb.models.architectures import MLP, SmallReLUNet

Tensor = torch.Tensor
F64 = torch.float64


# ============================================================================= chapter 1: blobs and a fit

def blobs(n: int, d_in: int, k: int, seed: int = 0, spread: float = 2.0, noise: float = 1.5,
          dtype=F64, device="cpu") -> tuple[Tensor, Tensor]:
    """``n`` points of ``k`` Gaussian classes in ``R^d_in``: centres ``spread * N(0, I)``, noise ``noise``.

    Returns ``(x (n, d_in), y (n,))``; the same ``seed`` gives the same data on every device.
    """
    if n < 1 or k < 2 or d_in < 1:
        raise ValueError(f"need n >= 1, k >= 2, d_in >= 1; got n={n}, k={k}, d_in={d_in}")
    gen = torch.Generator().manual_seed(seed)
    centres = spread * torch.randn(k, d_in, generator=gen, dtype=F64)
    y = torch.randint(0, k, (n,), generator=gen)
    x = centres[y] + noise * torch.randn(n, d_in, generator=gen, dtype=F64)
    return x.to(device=device, dtype=dtype), y.to(device)


def fit(net: torch.nn.Module, x: Tensor, y: Tensor, steps: int, lr: float = 0.05, batch: int = 128,
        seed: int = 0) -> torch.nn.Module:
    """Minibatch SGD (momentum 0.9) on cross-entropy for ``steps`` steps; returns ``net`` in eval mode."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (min(batch, len(y)),), generator=gen).to(x.device)
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def blob_mlp(d_in: int, hidden: int, k: int, seed: int = 0, dtype=F64, device="cpu") -> MLP:
    """The two-hidden-layer ReLU :class:`~flatnb.models.architectures.MLP` of chapter 1, seeded."""
    torch.manual_seed(seed)
    return MLP(d_in, hidden, k, depth=2).to(device=device, dtype=dtype)


def head_hessian_through_network(net, x: Tensor, y: Tensor) -> Tensor:
    """Per-example Hessians (N, km, km) of the cross-entropy with respect to ``net.head.weight``
    (row-major), by autograd through the **whole** network (``torch.func.functional_call`` swaps the
    weight in): a reference for the closed form that shares nothing with it but the network."""
    params = {n: p.detach() for n, p in net.named_parameters()}
    w0 = params["head.weight"]

    def loss(w_flat, xi, yi):
        p = dict(params, **{"head.weight": w_flat.reshape(w0.shape)})
        return F.cross_entropy(torch.func.functional_call(net, p, (xi[None],)), yi[None])

    return torch.stack([torch.autograd.functional.hessian(lambda w: loss(w, xi, yi), w0.reshape(-1))
                        for xi, yi in zip(x, y)])


def head_hessian_checks(net, x: Tensor, y: Tensor, closed, chunk: int = 16) -> dict:
    """The Hessians of :func:`head_hessian_through_network`, reduced chunk by chunk so that memory does not grow
    with the number of examples (each is (km)^2 float64: 200 of a 256-wide head over 10 classes take 10 GB).

    Per example: ``trace`` (Tr H), ``kappa_layer`` and ``kappa_neuron`` (Petzka et al.'s definitions on the
    dense Hessian, :func:`flatnb.curvature.kappa_from_hessian`) and ``max_diff``, the largest entry-wise
    difference to ``closed(phi, probs)``: the code under test's Hessians from the network's features and softmax
    probabilities. ``size``: km."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    w = net.head.weight.detach()
    out = {"trace": [], "kappa_layer": [], "kappa_neuron": [], "max_diff": []}
    for xc, yc in zip(x.split(chunk), y.split(chunk)):
        h = head_hessian_through_network(net, xc, yc)
        with torch.no_grad():
            phi = net.features(xc)
            diff = (closed(phi, torch.softmax(net.head(phi), -1)) - h).abs().amax((-1, -2))
        layer, neuron = kappa_from_hessian(h, w)
        for key, v in (("trace", torch.diagonal(h, dim1=-2, dim2=-1).sum(-1)), ("kappa_layer", layer),
                       ("kappa_neuron", neuron), ("max_diff", diff)):
            out[key].append(v)
        del h
    return {**{k: torch.cat(v) for k, v in out.items()}, "size": w.numel()}


def high_precision_terms(phi: Tensor, logits: Tensor, weight: Tensor, dps: int = 50) -> tuple[Tensor, Tensor]:
    """``(Tr H, kappa^phi_Tr)`` per sample in ``dps``-digit arithmetic (mpmath), returned as float64.

    An independent reference for :func:`flatnb.curvature.closed_form`: softmax from the float64
    logits, ``Tr H = sum_s p_s (1 - p_s) ||phi||^2`` and Petzka et al.'s double sum
    ``sum_{s,s'} <w_s, w_s'> M_ss' ||phi||^2`` with ``M = diag(p) - p p^T`` (chapter 1).
    """
    import mpmath

    with mpmath.workdps(dps):
        ws = [[mpmath.mpf(float(v)) for v in row] for row in weight.detach().cpu().double()]
        gram = [[mpmath.fsum(a * b for a, b in zip(wa, wb)) for wb in ws] for wa in ws]
        tr, kap = [], []
        for z_row, f_row in zip(logits.detach().cpu().double(), phi.detach().cpu().double()):
            e = [mpmath.exp(mpmath.mpf(float(v))) for v in z_row]
            tot = mpmath.fsum(e)
            p = [ei / tot for ei in e]
            k = len(p)
            # M_aa = p_a (1 - p_a) with 1 - p_a summed from the other classes: even 50 digits cannot
            # hold 1 - p_a when p_a = 1 - 1e-60
            m = [[p[a] * mpmath.fsum(p[c] for c in range(k) if c != a) if a == b else -p[a] * p[b]
                  for b in range(k)] for a in range(k)]
            phi_sq = mpmath.fsum(mpmath.mpf(float(v)) ** 2 for v in f_row)
            tr.append(float(mpmath.fsum(m[a][a] for a in range(k)) * phi_sq))
            s = mpmath.fsum(gram[a][b] * m[a][b] for a in range(k) for b in range(k))
            kap.append(float(s * phi_sq))
    return torch.tensor(tr, dtype=F64), torch.tensor(kap, dtype=F64)


# ============================================================================= chapters 2-3: a certifiable CIFAR net

def train_small_relu(train, epochs: int, seed: int = 0, lr: float = 2e-3, batch: int = 128,
                     device="cpu") -> SmallReLUNet:
    """A :class:`~flatnb.models.architectures.SmallReLUNet` after ``epochs`` epochs of Adam on ``train``
    (a :class:`flatnb.data.Dataset`): enough for real, non-random features (about 30 % CIFAR-10
    accuracy from 4,000 images), in eval mode on ``device``."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    torch.manual_seed(seed)
    net = SmallReLUNet().to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for epoch in range(epochs):
        for xb, yb in fdata.batches(train, batch, shuffle=True, seed=seed, epoch=epoch, device=device):
            loss = F.cross_entropy(net(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def random_relu_mlp(d_in: int = 20, hidden: int = 64, k: int = 5, seed: int = 0) -> MLP:
    """Chapter 3's random one-hidden-layer ReLU network (PyTorch's default init, seeded), float64."""
    torch.manual_seed(seed)
    return MLP(d_in, hidden, k, depth=1).double().eval()


# ============================================================================= chapter 4: two moons

def moons(n: int, noise: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Two interleaved half circles of ``n`` points each (float64): ``(x (2n, 2), y (2n,))``.

    Class 0 lies on the unit circle's upper half, class 1 on the circle of centre (1, 0.5) below.
    """
    gen = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=gen, dtype=F64) * math.pi
    upper = torch.stack([torch.cos(t), torch.sin(t)], -1)
    lower = torch.stack([1 - torch.cos(t), 0.5 - torch.sin(t)], -1)
    x = torch.cat([upper, lower]) + noise * torch.randn(2 * n, 2, generator=gen, dtype=F64)
    return x, torch.cat([torch.zeros(n), torch.ones(n)]).long()


MOON_CENTRES = ((0.0, 0.0), (1.0, 0.5))


def moon_normals(x: Tensor, y: Tensor) -> Tensor:
    """Unit normals of the two half circles at ``x`` (radial, pointing away from each circle's centre)."""
    centre = torch.tensor(MOON_CENTRES, dtype=x.dtype, device=x.device)[y]
    return F.normalize(x - centre, dim=-1)


def fit_full_batch(x: Tensor, y: Tensor, steps: int, seed: int = 0, hidden: int = 64, lr: float = 1e-2,
                   off_manifold: float = 0.0, normals: Tensor | None = None) -> MLP:
    """Full-batch Adam on a two-hidden-layer ReLU :class:`~flatnb.models.architectures.MLP` (float64).

    ``off_manifold > 0`` adds, at every step, a copy of the data pushed a uniform distance in
    ``[-off_manifold, off_manifold]`` along ``normals``, with the same labels.
    """
    if off_manifold > 0 and normals is None:
        raise ValueError("off_manifold > 0 needs the manifold's normals (moon_normals(x, y))")
    torch.manual_seed(seed)
    net = MLP(x.shape[1], hidden, int(y.max()) + 1, depth=2).double()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        xb, yb = x, y
        if off_manifold > 0:
            t = (2 * torch.rand(len(x), 1, generator=gen, dtype=x.dtype) - 1) * off_manifold
            xb, yb = torch.cat([x, x + t * normals]), torch.cat([y, y])
        loss = F.cross_entropy(net(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def normal_profiles(net, x: Tensor, y: Tensor, directions: Tensor, ts: Tensor) -> Tensor:
    """``loss(x_i + t d_i, y_i)`` for every ``t`` in ``ts``: shape (N, len(ts))."""
    pts = x[:, None, :] + ts[None, :, None] * directions[:, None, :]
    with torch.no_grad():
        logits = net(pts.reshape(-1, x.shape[1])).reshape(len(x), len(ts), -1)
    return F.cross_entropy(logits.transpose(1, 2), y[:, None].expand(-1, len(ts)), reduction="none")


class Walls(NamedTuple):
    """Per ray that reaches a flip (loss >= log k) within the profile: each (R,) float64."""

    radius: Tensor  # delta_eps: last distance with loss - loss(0) <= eps
    gap: Tensor  # eta: from delta_eps to the first distance with loss >= log k
    needed: Tensor  # 2 (g(d+eta) - g(d) - g'(d) eta) / eta^2, from the finite-difference profile
    found: Tensor  # the largest finite-difference g'' on [d, d + eta]
    reached: int  # rays that reach a flip
    total: int  # rays


def walls(loss: Tensor, ts: Tensor, eps: float, k: int) -> Walls:
    """Where each loss profile stays within ``eps`` of its start, and how sharply it then rises to ``log k``.

    Taylor's theorem on ``[d, d + eta]`` gives ``max g'' >= needed`` (chapter 4); here both sides come
    from the same finite-difference profile, so comparing them checks the discretisation, not the network.
    """
    dt = float(ts[1] - ts[0])
    d1 = torch.gradient(loss, spacing=dt, dim=1)[0]
    d2 = torch.gradient(d1, spacing=dt, dim=1)[0]
    rows = []
    for g, g1, g2 in zip(loss, d1, d2):
        over = torch.nonzero(g - g[0] > eps)
        flip = torch.nonzero(g >= math.log(k))
        if len(flip) == 0:
            continue
        i_d = int(over[0]) - 1 if len(over) else len(ts) - 1
        i_f = int(flip[0])
        if i_f <= i_d:  # flips before leaving the eps band (a loose start): no wall to measure
            continue
        eta = (i_f - i_d) * dt
        rows.append((float(ts[i_d]), eta, float(2 * (g[i_f] - g[i_d] - g1[i_d] * eta) / eta**2),
                     float(g2[i_d: i_f + 1].max())))
    t = torch.tensor(rows, dtype=F64).reshape(-1, 4)
    return Walls(t[:, 0], t[:, 1], t[:, 2], t[:, 3], len(rows), len(loss))
