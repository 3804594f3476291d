"""The paper's theory made executable: the lemma, Lipschitz constants, the local bound.

Walter et al. 2026 (``walter2026flatness``), §4.2-4.4; Petzka et al. 2021 (``petzka2021relative``)
for relative flatness and the average over orthogonal maps.  Notation: ``phi`` (N, m) features, ``w`` (k, m) last-layer
weight, ``p = softmax(w phi + b)``, ``L`` a Lipschitz constant of ``phi`` on the
ball ``B_delta(x)``, ``r = ||phi(x)||``.

* :func:`householder_lemma` - ``phi(xi) = phi(x) + Delta A phi(x)`` with ``A`` an
  orthogonal Householder reflection (§4.2), so an input perturbation *is* a
  last-layer weight perturbation ``w -> w + Delta w A``.
* :func:`local_lipschitz` / :func:`global_lipschitz` - estimates of ``L``.
* :func:`bound_coefficients`, :func:`local_bound`, :func:`robust_radius` - the
  fully explicit bound of §4.3 [D] (first, second and third order terms) and the
  largest radius it certifies; :func:`quadratic_radius` and :func:`cubic_cap` are
  the two regimes of §4.4.
* :func:`reported_bound` - the form reported for the paper with its
  **unconfirmed constants** (taken from a secondary summary of §4.3, not the paper's PDF);
  for comparison only.
* :func:`a_posteriori` - the bound's chain of inequalities with the *realised* ``v`` and ``u``.
* :func:`haar_orthogonal` - Haar-random orthogonal matrices (Petzka et al.'s average case), and
  :func:`haar_quadratic_forms` - the quadratic form of ``Sigma`` at ``A phi`` over many of them, chunked;
  :func:`symmetric_loss_change` - the loss change of one input under ``w -> w +- Delta w A``.
* :func:`log_kappa` - ``log kappa`` by log-sum-exp, finite where ``kappa`` underflows to 0.

The bound is explanatory, not a certificate for realistic ``L`` (chapter 3).
"""
from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from flatnb.curvature.last_layer import kappa_layerwise, kappa_neuronwise
from flatnb.runtime import draw

Tensor = torch.Tensor


# ---------------------------------------------------------------------------
# Lemma (§4.2)
# ---------------------------------------------------------------------------


class Lemma(NamedTuple):
    """``delta`` (N,) and Householder vectors ``u`` (N, m) with ``A = I - 2 u u^T``.

    ``u`` is a unit vector, or zero where ``A = I`` already works.
    """

    delta: Tensor
    u: Tensor


def householder_lemma(phi_x: Tensor, phi_xi: Tensor) -> Lemma:
    """Scale ``Delta`` and reflection ``A`` with ``phi(xi) = phi(x) + Delta A phi(x)``.

    ``v = phi(xi) - phi(x)``, ``Delta = ||v|| / ||phi(x)||`` and ``A`` maps the unit
    vector of ``phi(x)`` to the unit vector of ``v`` (``u`` along their difference).
    Batched over rows; a single vector (m,) is accepted too.  ``phi(x) = 0``
    raises: the lemma needs ``||phi(x)|| >= r > 0``.
    """
    single = phi_x.dim() == 1
    px, pxi = (phi_x.unsqueeze(0), phi_xi.unsqueeze(0)) if single else (phi_x, phi_xi)
    if px.dim() != 2 or px.shape != pxi.shape:
        raise ValueError(f"phi_x and phi_xi must both have shape (N, m) or (m,), got {tuple(phi_x.shape)} and {tuple(phi_xi.shape)}")
    norm_x = px.norm(dim=1)
    if not bool((norm_x > 0).all()):
        raise ValueError("phi(x) = 0 for some sample: the lemma needs ||phi(x)|| >= r > 0")
    v = pxi - px
    norm_v = v.norm(dim=1)
    delta = norm_v / norm_x
    phi_hat = px / norm_x[:, None]
    v_hat = torch.where(norm_v[:, None] > 0, v / norm_v.clamp_min(torch.finfo(v.dtype).tiny)[:, None], phi_hat)
    diff = phi_hat - v_hat
    dn = diff.norm(dim=1, keepdim=True)
    # phi_hat == v_hat (to rounding): A = I is exact up to that rounding
    u = torch.where(dn > 64 * torch.finfo(v.dtype).eps, diff / dn.clamp_min(torch.finfo(v.dtype).tiny), torch.zeros_like(diff))
    if single:
        return Lemma(delta[0], u[0])
    return Lemma(delta, u)


def apply_householder(u: Tensor, v: Tensor) -> Tensor:
    """``A v = v - 2 u (u . v)`` row by row, without forming ``A`` (O(m) per sample)."""
    return v - 2 * u * (u * v).sum(-1, keepdim=True)


def householder_matrix(u: Tensor) -> Tensor:
    """Dense ``A = I - 2 u u^T``, (N, m, m) or (m, m); only for small ``m``."""
    eye = torch.eye(u.shape[-1], dtype=u.dtype, device=u.device)
    return eye - 2 * u.unsqueeze(-1) * u.unsqueeze(-2)


# ---------------------------------------------------------------------------
# Lipschitz constants of phi
# ---------------------------------------------------------------------------


def local_lipschitz(fn, x: Tensor, n_iter: int = 50, generator: torch.Generator | None = None) -> Tensor:
    """Per-sample ``||J_phi(x)||_2`` by power iteration on ``J^T J`` (jvp then vjp), (N,).

    ``fn`` maps a batch (N, ...) to (N, m) with samples independent (eval mode).
    This is the local Lipschitz constant at ``x`` (for piecewise-linear ``phi``:
    on ``x``'s linear region); it converges from below.
    """
    with warnings.catch_warnings():
        # torch.func's first use imports a module that calls the deprecated torch.jit.script
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated",
                                category=FutureWarning)
        return _local_lipschitz(fn, x, n_iter, generator)


def _local_lipschitz(fn, x: Tensor, n_iter: int, generator) -> Tensor:
    x = x.detach()
    shape = (-1,) + (1,) * (x.dim() - 1)
    v = draw(torch.randn, x.shape, x.device, x.dtype, generator)
    v = v / v.flatten(1).norm(dim=1).view(shape)
    _, vjp_fn = torch.func.vjp(fn, x)
    sigma = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
    tiny = torch.finfo(x.dtype).tiny
    for _ in range(n_iter):
        # detached every iteration: the parameters require grad, and an undetached
        # iterate would chain n_iter forward/backward graphs together
        jv = torch.func.jvp(fn, (x,), (v,))[1].detach()
        sigma = jv.flatten(1).norm(dim=1)
        (w,) = vjp_fn(jv)
        w = w.detach()
        v = w / w.flatten(1).norm(dim=1).clamp_min(tiny).view(shape)
    return sigma


_ONE_LIPSCHITZ = (nn.ReLU, nn.Tanh, nn.Identity, nn.Flatten, nn.ELU, nn.Hardtanh, nn.ReLU6, nn.Softsign)
_HANDLED = (
    "nn.Sequential (nested) of: Linear, Conv1d/Conv2d (zero padding), BatchNorm1d/2d in eval mode, "
    "ReLU, ReLU6, LeakyReLU, ELU (alpha<=1), Tanh, Sigmoid, Hardtanh, Softsign, Identity, Flatten, "
    "Dropout (eval), MaxPool2d, AvgPool2d, AdaptiveAvgPool2d"
)


def _operator_norm(op, x_shape, like: Tensor, n_iter: int, generator) -> Tensor:
    """``||op||_2`` of a linear map by power iteration on ``op^T op`` (adjoint via vjp)."""
    v = draw(torch.randn, (1, *x_shape), like.device, like.dtype, generator)
    v = v / v.norm()
    # op is linear: one graph, replayed backwards, is its adjoint
    v0 = torch.zeros_like(v).requires_grad_(True)
    with torch.enable_grad():
        out0 = op(v0)
    sigma = torch.zeros((), device=like.device, dtype=like.dtype)
    for _ in range(n_iter):
        out = op(v)
        sigma = out.norm()
        (w,) = torch.autograd.grad(out0, v0, out, retain_graph=True)
        v = w / w.norm().clamp_min(torch.finfo(like.dtype).tiny)
    return sigma


def _pool_windows(kernel, stride) -> int:
    k = nn.modules.utils._pair(kernel)
    s = nn.modules.utils._pair(stride if stride is not None else kernel)
    return math.ceil(k[0] / s[0]) * math.ceil(k[1] / s[1])


def _adaptive_pool_norm(size_in, size_out) -> float:
    """An l2 bound of adaptive average pooling from ``size_in`` to ``size_out`` (2-D).

    A window ``W`` gives ``mean(x_W)^2 <= sum_{e in W} x_e^2 / |W|``, so
    ``||out||^2 <= max_e sum_{W contains e} 1/|W| * ||x||^2``; windows are products of 1-D
    windows, so the sum factorises per dimension. Above 1 when the pooling upsamples.
    """
    out = nn.modules.utils._pair(size_out)
    total = 1.0
    for n_in, n_out in zip(size_in, out):
        n_out = n_in if n_out is None else n_out
        load = [0.0] * n_in
        for j in range(n_out):
            a, b = (j * n_in) // n_out, -((-(j + 1) * n_in) // n_out)
            for e in range(a, b):
                load[e] += 1 / (b - a)
        total *= max(load)
    return math.sqrt(total)


def global_lipschitz(
    module: nn.Module, input_shape, n_iter: int = 100, generator: torch.Generator | None = None
) -> Tensor:
    """The product of the layers' l2 constants (0-dim tensor), an upper bound on the Lipschitz constant.

    Linear layers use their exact spectral norm; convolutions use power iteration on the
    operator, which converges to its norm from below (to ~1e-8 relative with the default
    iterations on small layers), so for conv nets the bound holds up to that tolerance.

    ``module`` must be an ``nn.Sequential`` (nested allowed) of the layers in
    ``_HANDLED``; anything else (residual blocks, attention, custom modules) raises
    ``TypeError`` because a product of layer norms is then not a bound.
    ``input_shape`` is one sample's shape (no batch dim), needed for convolutions.
    Linear layers use the exact spectral norm; convolutions a power iteration on
    the conv operator (``n_iter`` steps; it converges from below, so use enough).
    """
    like = next(module.parameters(), torch.zeros(()))
    x = torch.zeros((1, *input_shape), device=like.device, dtype=like.dtype)
    total = torch.ones((), device=like.device, dtype=like.dtype)

    def layers(mod, prefix):
        if isinstance(mod, nn.Sequential):
            for name, child in mod.named_children():
                yield from layers(child, f"{prefix}.{name}" if prefix else name)
        else:
            yield prefix, mod

    with torch.no_grad():
        for name, layer in layers(module, ""):
            if isinstance(layer, nn.Linear):
                c = torch.linalg.matrix_norm(layer.weight.detach(), ord=2)
            elif isinstance(layer, (nn.Conv1d, nn.Conv2d)):
                if layer.padding_mode != "zeros":
                    raise TypeError(f"layer {name}: only zero padding is handled, got {layer.padding_mode!r}")
                conv = F.conv1d if isinstance(layer, nn.Conv1d) else F.conv2d
                weight = layer.weight.detach()

                def op(v, conv=conv, layer=layer, weight=weight):
                    return conv(v, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)

                with torch.enable_grad():
                    c = _operator_norm(op, x.shape[1:], like, n_iter, generator)
            elif isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
                if layer.training or layer.running_var is None:
                    raise ValueError(f"layer {name}: BatchNorm must be in eval mode with running stats (model.eval())")
                scale = 1 / torch.sqrt(layer.running_var + layer.eps)
                if layer.weight is not None:
                    scale = scale * layer.weight.detach()
                c = scale.abs().max()
            elif isinstance(layer, nn.ELU) and layer.alpha > 1:
                c = torch.tensor(float(layer.alpha))
            elif isinstance(layer, _ONE_LIPSCHITZ) or (isinstance(layer, nn.modules.dropout._DropoutNd) and not layer.training):
                c = torch.ones(())
            elif isinstance(layer, nn.LeakyReLU):
                c = torch.tensor(max(1.0, abs(layer.negative_slope)))
            elif isinstance(layer, nn.Sigmoid):
                c = torch.tensor(0.25)
            elif isinstance(layer, nn.MaxPool2d):
                if layer.dilation not in (1, (1, 1)):
                    raise TypeError(f"layer {name}: dilated max pooling is not handled")
                # each input lies in at most c windows: ||maxpool(a)-maxpool(b)||^2 <= c ||a-b||^2
                c = torch.tensor(math.sqrt(_pool_windows(layer.kernel_size, layer.stride)))
            elif isinstance(layer, nn.AvgPool2d):
                ks = nn.modules.utils._pair(layer.kernel_size)
                c = torch.tensor(math.sqrt(_pool_windows(layer.kernel_size, layer.stride) / (ks[0] * ks[1])))
            elif isinstance(layer, nn.AdaptiveAvgPool2d):
                c = torch.tensor(_adaptive_pool_norm(tuple(x.shape[-2:]), layer.output_size))
            else:
                raise TypeError(
                    f"layer {name or '<root>'} ({type(layer).__name__}) is not handled by global_lipschitz; "
                    f"handled: {_HANDLED}"
                )
            total = total * c.to(total)
            x = layer(x)
    return total


# ---------------------------------------------------------------------------
# The explicit local bound (§4.3) and the robust radius (§4.4)
# ---------------------------------------------------------------------------

_C3 = math.sqrt(2) / 12  # third-order constant: |kappa_3| <= range^3 / 4, range <= sqrt(2) ||u||


class BoundCoefficients(NamedTuple):
    """Per-sample coefficients (N,) of ``delta``, ``delta^2``, ``delta^3`` in the explicit bound."""

    first: Tensor  # sqrt(2) (1 - p_y) ||w||_op L
    second: Tensor  # L^2 kappa / (2 r^2)
    third: Tensor  # sqrt(2)/12 ||w||_op^3 L^3


class BoundTerms(NamedTuple):
    """The bound at one radius: each term (N,) and their sum."""

    first: Tensor
    second: Tensor
    third: Tensor
    total: Tensor


def _one_minus_py(probs: Tensor, labels: Tensor) -> Tensor:
    # sum of the other classes' probabilities: no cancellation when p_y -> 1
    return probs.scatter(1, labels[:, None], 0.0).sum(1)


def bound_coefficients(
    phi: Tensor,
    logits: Tensor,
    labels: Tensor,
    weight: Tensor,
    lipschitz,
    r: Tensor | None = None,
    kappa: str = "neuron",
) -> BoundCoefficients:
    """Coefficients of the explicit local bound (chapter 3's derivation of §4.3), per sample.

    For ``||xi - x|| <= delta`` and ``phi`` ``L``-Lipschitz on that ball:
    ``loss(xi) - loss(x) <= first*delta + second*delta^2 + third*delta^3`` with
    ``first = sqrt2 (1-p_y) ||w||_op L``, ``second = L^2 kappa(w;x) / (2 r^2)``,
    ``third = sqrt2/12 ||w||_op^3 L^3``.  No local-minimum assumption.
    ``kappa``: ``"neuron"`` (``kappa^phi_Tr``, tighter) or ``"layer"`` (``||w||_F^2 Tr H``);
    both are valid.  ``r`` defaults to ``||phi(x)||`` (the tightest); a given ``r``
    must not exceed it.  ``lipschitz``: scalar or (N,) tensor (e.g. a global bound).
    """
    if phi.dim() != 2 or logits.dim() != 2 or logits.shape[0] != phi.shape[0]:
        raise ValueError(f"phi must be (N, m) and logits (N, k) with the same N, got {tuple(phi.shape)} and {tuple(logits.shape)}")
    if labels.shape != (phi.shape[0],):
        raise ValueError(f"labels must have shape ({phi.shape[0]},), got {tuple(labels.shape)}")
    if weight.shape != (logits.shape[1], phi.shape[1]):
        raise ValueError(f"weight must have shape (k, m) = {(logits.shape[1], phi.shape[1])}, got {tuple(weight.shape)}")
    if not bool(torch.isfinite(logits).all()):
        raise FloatingPointError("logits contain NaN or inf; the bound would be NaN")
    probs = torch.softmax(logits, dim=1)
    phi_norm = phi.norm(dim=1)
    if r is None:
        r = phi_norm
    else:
        r = torch.as_tensor(r, dtype=phi.dtype, device=phi.device)
        if bool((r > phi_norm * (1 + 1e-12)).any()):
            raise ValueError("r must satisfy r <= ||phi(x)|| for every sample")
    if not bool((r > 0).all()):
        raise ValueError("r must be > 0 (the lemma needs ||phi(x)|| >= r > 0)")
    if kappa == "neuron":
        kap = kappa_neuronwise(phi, probs, weight)
    elif kappa == "layer":
        kap = kappa_layerwise(phi, probs, weight, squared=True)
    else:
        raise ValueError(f"kappa must be 'neuron' or 'layer', got {kappa!r}")
    lip = torch.as_tensor(lipschitz, dtype=phi.dtype, device=phi.device)
    w_op = torch.linalg.matrix_norm(weight.to(phi.dtype), ord=2)
    return BoundCoefficients(
        first=math.sqrt(2) * _one_minus_py(probs, labels) * w_op * lip,
        second=lip**2 * kap / (2 * r**2),
        third=(_C3 * (w_op * lip) ** 3).expand(phi.shape[0]).clone() if lip.dim() == 0 else _C3 * (w_op * lip) ** 3,
    )


def local_bound(coeffs: BoundCoefficients, delta) -> BoundTerms:
    """The bound's three terms and their sum at radius ``delta`` (scalar or (N,))."""
    d = torch.as_tensor(delta, dtype=coeffs.first.dtype, device=coeffs.first.device)
    if bool((d < 0).any()):
        raise ValueError("delta must be >= 0")
    a, b, c = coeffs.first * d, coeffs.second * d**2, coeffs.third * d**3
    return BoundTerms(first=a, second=b, third=c, total=a + b + c)


def robust_radius(coeffs: BoundCoefficients, eps, n_iter: int = 200) -> Tensor:
    """Largest ``delta`` with bound(delta) <= eps, per sample (N,): the positive root of
    ``third d^3 + second d^2 + first d = eps`` (the left side increases in ``d``).

    Solved by bisection on the device (no host sync); ``inf`` where all coefficients are 0.
    """
    eps_t = torch.as_tensor(eps, dtype=coeffs.first.dtype, device=coeffs.first.device)
    if bool((eps_t <= 0).any()):
        raise ValueError("eps must be > 0")
    a, b, c = coeffs
    # each nonzero term alone caps the root: bound(d) <= eps needs a d <= eps, b d^2 <= eps, c d^3 <= eps
    inf = torch.full_like(a, float("inf"))
    hi = torch.minimum(torch.where(a > 0, eps_t / a, inf), torch.where(b > 0, (eps_t / b).sqrt(), inf))
    hi = torch.minimum(hi, torch.where(c > 0, (eps_t / c) ** (1 / 3), inf))
    lo = torch.zeros_like(hi)
    top = torch.where(torch.isfinite(hi), hi, torch.zeros_like(hi))
    for _ in range(n_iter):
        mid = (lo + top) / 2
        ok = a * mid + b * mid**2 + c * mid**3 <= eps_t
        lo = torch.where(ok, mid, lo)
        top = torch.where(ok, top, mid)
    return torch.where(torch.isfinite(hi), lo, hi)


def quadratic_radius(kappa: Tensor, lipschitz, r: Tensor, eps) -> Tensor:
    """``r sqrt(2 eps) / (L sqrt(kappa))``: the radius when the quadratic term dominates (§4.4)."""
    return r * math.sqrt(2 * eps) / (torch.as_tensor(lipschitz, dtype=kappa.dtype, device=kappa.device) * kappa.sqrt())


def cubic_cap(weight: Tensor, lipschitz, eps) -> Tensor:
    """``(12 eps / (sqrt2 ||w||_op^3 L^3))^(1/3)``: the cap from the cubic term, independent of kappa (§4.4)."""
    w_op = torch.linalg.matrix_norm(weight, ord=2)
    lip = torch.as_tensor(lipschitz, dtype=weight.dtype, device=weight.device)
    return (12 * eps / (math.sqrt(2) * w_op**3 * lip**3)) ** (1 / 3)


def reported_bound(kappa: Tensor, lipschitz, r: Tensor, k: int, m: int, delta) -> BoundTerms:
    """**Unconfirmed constants** (§4.3 as reported in a secondary summary): the bound as reported,
    ``delta^2 L^2 kappa / (2 r^2) + delta^3 k m L^6 / (24 r^3)``, at a local minimum
    (no first-order term).  The ``L^6`` looks dimensionally wrong; use
    :func:`bound_coefficients` for a proven bound.  Returned with ``first = 0``.
    """
    lip = torch.as_tensor(lipschitz, dtype=kappa.dtype, device=kappa.device)
    d = torch.as_tensor(delta, dtype=kappa.dtype, device=kappa.device)
    second = d**2 * lip**2 * kappa / (2 * r**2)
    third = d**3 * k * m * lip**6 / (24 * r**3)
    return BoundTerms(first=torch.zeros_like(second), second=second, third=third, total=second + third)


# ---------------------------------------------------------------------------
# A-posteriori check, Haar matrices, log kappa
# ---------------------------------------------------------------------------


class APosteriori(NamedTuple):
    """The explicit bound's chain for realised ``v = phi(xi) - phi(x)`` and ``u = w v``, each (N,).

    ``actual <= expansion <= realised <= local_bound(coeffs, delta).total`` (the last with
    ``||v|| <= L delta``): ``expansion`` is the exact first- and second-order terms plus the
    third-order bound, ``realised`` the bound's three terms with ``||u||`` and ``||v||``.
    """

    actual: Tensor
    expansion: Tensor
    realised: Tensor


def a_posteriori(phi_x: Tensor, phi_xi: Tensor, logits_x: Tensor, labels: Tensor, weight: Tensor,
                 bias: Tensor | None = None) -> APosteriori:
    """The bound re-evaluated with the realised feature and logit changes (chapter 3's tightness check).

    ``expansion = (p - e_y)^T u + u^T M(p) u / 2 + sqrt2/12 ||u||^3`` is tight as ``u -> 0`` (the
    Taylor expansion of the cross-entropy in the logits), so ``actual / expansion -> 1`` at small
    radii; a wrong constant in the third-order term or a wrong ``M(p)`` makes it fail.
    ``realised = sqrt2 (1 - p_y) ||u|| + kappa ||v||^2 / (2 ||phi(x)||^2) + sqrt2/12 ||u||^3``.
    """
    if phi_x.shape != phi_xi.shape or logits_x.shape != (phi_x.shape[0], weight.shape[0]):
        raise ValueError(f"need phi_x, phi_xi (N, m) and logits_x (N, k); got {tuple(phi_x.shape)}, "
                         f"{tuple(phi_xi.shape)}, {tuple(logits_x.shape)}")
    b = torch.zeros(weight.shape[0], dtype=phi_x.dtype, device=phi_x.device) if bias is None else bias
    v = phi_xi - phi_x
    u = v @ weight.T
    probs = torch.softmax(logits_x, dim=1)
    onehot = F.one_hot(labels, weight.shape[0]).to(probs)
    quad = (probs * u * u).sum(1) - (probs * u).sum(1) ** 2  # u^T (diag p - p p^T) u
    u_norm = u.norm(dim=1)
    actual = F.cross_entropy(phi_xi @ weight.T + b, labels, reduction="none") - F.cross_entropy(
        logits_x, labels, reduction="none")
    expansion = ((probs - onehot) * u).sum(1) + quad / 2 + _C3 * u_norm**3
    kap = kappa_neuronwise(phi_x, probs, weight)
    realised = (math.sqrt(2) * _one_minus_py(probs, labels) * u_norm + kap * v.pow(2).sum(1) / (2 * phi_x.pow(2).sum(1))
                + _C3 * u_norm**3)
    return APosteriori(actual, expansion, realised)


def haar_orthogonal(n: int, m: int, generator: torch.Generator | None = None, dtype=torch.float64) -> Tensor:
    """``n`` Haar-random orthogonal ``m x m`` matrices (n, m, m): the QR factor of a Gaussian
    matrix with the signs of ``diag(R)`` moved into ``Q`` (Mezzadri 2007), on the CPU."""
    g = torch.randn(n, m, m, generator=generator, dtype=dtype)
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)


def haar_quadratic_forms(phi: Tensor, sigma: Tensor, n: int, generator: torch.Generator | None = None,
                         chunk: int = 1000) -> tuple[Tensor, Tensor]:
    """``q[i, a] = (A_a phi_i)^T sigma_i (A_a phi_i)`` for ``n`` Haar-random rotations ``A_a`` (:func:`haar_orthogonal`,
    the same ``n`` for every input ``i``): the Monte Carlo of Petzka et al.'s average case, whose mean over ``a`` is
    ``phi_i^T phi_i Tr(sigma_i) / m``. ``phi`` (N, m), ``sigma`` (N, m, m); returns ``q`` (N, n) and the first
    ``min(chunk, n)`` rotations (for reuse). The rotations are drawn and applied ``chunk`` at a time (20,000 of
    256 x 256 take 10 GB in float64), so memory stays at one chunk."""
    if phi.ndim != 2 or sigma.shape != (phi.shape[0], phi.shape[1], phi.shape[1]):
        raise ValueError(f"need phi (N, m) and sigma (N, m, m); got {tuple(phi.shape)} and {tuple(sigma.shape)}")
    if n < 1 or chunk < 1:
        raise ValueError(f"need n >= 1 rotations and chunk >= 1; got n={n}, chunk={chunk}")
    q, first = [], None
    for start in range(0, n, chunk):
        rot = haar_orthogonal(min(chunk, n - start), phi.shape[1], generator, dtype=phi.dtype)
        first = rot if first is None else first
        a_phi = torch.einsum("aij,nj->nai", rot, phi)
        q.append(torch.einsum("nai,nij,naj->na", a_phi, sigma, a_phi))
    return torch.cat(q, 1), first


def symmetric_loss_change(phi: Tensor, label: int, weight: Tensor, bias: Tensor, A: Tensor, delta: float) -> Tensor:
    """``(l(w + Delta w A) + l(w - Delta w A)) / 2 - l(w)``: the cross-entropy change of one input (features ``phi``
    (m,), class ``label``) under the lemma's weight perturbation, symmetrised so the first-order term cancels
    (``~ Delta^2 / 2 * phi^T A^T w^T M w A phi``). ``A`` is one (m, m) map or a stack (B, m, m): one value each."""
    step = delta * weight @ A  # (k, m) or (B, k, m)
    w = torch.stack([weight.expand_as(step), weight + step, weight - step])
    z = w @ phi + bias
    ce = torch.logsumexp(z, -1) - z[..., int(label)]  # cross-entropy of the one input under each weight
    return (ce[1] + ce[2]) / 2 - ce[0]


def log_kappa(phi: Tensor, logits: Tensor, weight: Tensor, kind: str = "sq") -> Tensor:
    """``log kappa`` per sample from log-probabilities, finite where ``kappa`` underflows to 0.

    ``kind="sq"``: ``log(||w||_F^2 (1 - ||p||^2) ||phi||^2)``; ``"neuron"``:
    ``log(||phi||^2 sum_{s<s'} p_s p_s' ||w_s - w_s'||^2)``. ``1 - ||p||^2 = sum_s p_s (1 - p_s)``
    with ``1 - p_s`` the log-sum-exp of the other classes' log-probabilities: no cancellation.
    """
    logp = torch.log_softmax(logits, dim=1)
    k = logp.shape[1]
    log_phi_sq = 2 * torch.log(phi.norm(dim=1))
    if kind == "sq":
        others = logp.unsqueeze(1).expand(-1, k, -1).masked_fill(torch.eye(k, dtype=torch.bool, device=logp.device),
                                                                   float("-inf"))
        log_gini = torch.logsumexp(logp + torch.logsumexp(others, dim=2), dim=1)
        return 2 * torch.log(weight.norm()) + log_gini + log_phi_sq
    if kind == "neuron":
        iu = torch.triu_indices(k, k, offset=1, device=logp.device)
        dist_sq = (weight[iu[0]] - weight[iu[1]]).pow(2).sum(1)
        terms = logp[:, iu[0]] + logp[:, iu[1]] + torch.log(dist_sq)
        return torch.logsumexp(terms, dim=1) + log_phi_sq
    raise ValueError(f"kind must be 'sq' or 'neuron', got {kind!r}")
