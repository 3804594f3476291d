"""Post-hoc temperature scaling and the expected calibration error (Guo et al. 2017, ``guo2017calibration``).

Why the book needs it: the last-layer flatness measures and the input-space curvature of the
cross-entropy all pass through the softmax Hessian ``M(p) = diag(p) - p pᵀ`` (Walter et al. 2026 §3),
so they scale with the model's confidence. Comparing them across two models of different confidence
(a standard and an adversarially trained network) measures temperature as much as geometry.
Fitting each model's temperature on held-out logits and comparing the *calibrated* quantities
removes that confound (chapter 11).

* :func:`nll` — mean negative log-likelihood of ``logits / T`` (float64);
* :func:`fit_temperature` — the ``T > 0`` minimising :func:`nll` on held-out logits;
* :func:`expected_calibration_error` — ECE with equal-width confidence bins;
* :func:`calibrated_ce` — a per-sample loss ``(logits, y) -> CE(logits / T, y)`` for the
  ``loss_fn`` argument of :mod:`flatnb.curvature` input-space functions;
* :func:`negative_margin` — the temperature-free loss ``max_{j≠y} z_j - z_y`` for the same argument;
* :func:`model_logits` — a model's logits and labels over a dataset (eval mode, no gradient).

The fit works with ``β = 1/T``: ``NLL(β) = mean_i [logsumexp(β z_i) - β z_{i,y_i}]`` is convex in β
(its second derivative is the variance of ``z_i`` under ``softmax(β z_i)``, averaged), and its
derivative ``mean_i [E_{softmax(β z_i)} z_i - z_{i,y_i}]`` is non-decreasing, so bisection on the
derivative finds the unique minimiser in float64 without step-size tuning.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from flatnb import data as fdata

__all__ = ["nll", "fit_temperature", "expected_calibration_error", "calibrated_ce", "negative_margin",
           "model_logits"]


def _check(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must have shape (N, k) with k >= 2 classes, got {tuple(logits.shape)}")
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"labels must have shape ({logits.shape[0]},), got {tuple(labels.shape)}")
    if logits.shape[0] == 0:
        raise ValueError("no logits to calibrate on (N = 0): pass a non-empty held-out set")
    z = logits.detach().double()
    if not bool(torch.isfinite(z).all()):
        bad = (~torch.isfinite(z)).any(1).nonzero().flatten()[:5].tolist()
        raise ValueError(f"non-finite logits in rows {bad}...: check the model's weights and inputs")
    y = labels.detach().to(z.device).long()
    if bool((y < 0).any()) or bool((y >= z.shape[1]).any()):
        raise ValueError(f"labels must lie in [0, {z.shape[1] - 1}]")
    return z, y


def nll(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``softmax(logits / temperature)`` at the labels, in float64."""
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    z, y = _check(logits, labels)
    return float(F.cross_entropy(z / temperature, y))


def _dnll_dbeta(z: Tensor, y: Tensor, beta: float) -> float:
    p = torch.softmax(beta * z, dim=1)
    return float(((p * z).sum(1) - z.gather(1, y[:, None]).squeeze(1)).mean())


def fit_temperature(logits: Tensor, labels: Tensor, bounds: tuple[float, float] = (0.01, 100.0),
                    tol: float = 1e-10, at_bound: str = "raise") -> float:
    """The temperature ``T`` minimising ``nll(logits, labels, T)`` over ``bounds`` (Guo et al. 2017).

    Fit it on held-out logits (data the model was not trained on, and not the data you then
    evaluate on). Raises when the minimum lies on a bound: NLL that keeps falling as ``T → 0``
    means the held-out set is perfectly separated (every prediction correct, calibration cannot be
    judged on it: use more or harder data); falling as ``T → ∞`` means the logits carry no
    information about the labels (worse than uniform). ``at_bound="clip"`` returns that bound instead
    (the minimiser over ``bounds``): only for a smoke run, whose chance-level models must not stop it.
    """
    if at_bound not in ("raise", "clip"):
        raise ValueError(f"at_bound must be 'raise' or 'clip', got {at_bound!r}")
    lo_t, hi_t = float(bounds[0]), float(bounds[1])
    if not 0 < lo_t < hi_t < math.inf:
        raise ValueError(f"bounds must satisfy 0 < low < high < inf, got {bounds}")
    z, y = _check(logits, labels)
    b_lo, b_hi = 1.0 / hi_t, 1.0 / lo_t  # β = 1/T
    g_lo, g_hi = _dnll_dbeta(z, y, b_lo), _dnll_dbeta(z, y, b_hi)
    if g_hi <= 0 and at_bound == "clip":
        return lo_t
    if g_lo >= 0 and at_bound == "clip":
        return hi_t
    if g_hi <= 0:
        raise ValueError(f"the NLL still decreases at T = {lo_t:g} (the smallest allowed): the held-out "
                         "logits look perfectly separated, so no finite temperature is optimal; fit on more "
                         "(or harder) held-out data, or lower bounds[0]")
    if g_lo >= 0:
        raise ValueError(f"the NLL still decreases at T = {hi_t:g} (the largest allowed): the logits predict "
                         "the labels worse than a uniform guess; check the labels, or raise bounds[1]")
    for _ in range(200):  # bisection on the non-decreasing derivative
        mid = 0.5 * (b_lo + b_hi)
        if _dnll_dbeta(z, y, mid) < 0:
            b_lo = mid
        else:
            b_hi = mid
        if b_hi - b_lo <= tol * b_hi:
            break
    return 1.0 / (0.5 * (b_lo + b_hi))


def expected_calibration_error(logits: Tensor, labels: Tensor, n_bins: int = 15,
                               temperature: float = 1.0) -> float:
    """ECE of ``softmax(logits / temperature)``: ``Σ_b |B_b|/N · |acc(B_b) − conf(B_b)|``.

    Confidence is the top-class probability; the bins split (0, 1] into ``n_bins`` equal-width
    intervals ``(a, b]`` (Naeini et al. 2015; Guo et al. 2017). Computed in float64.
    """
    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    z, y = _check(logits, labels)
    p = torch.softmax(z / temperature, dim=1)
    conf, pred = p.max(1)
    correct = (pred == y).double()
    edges = torch.linspace(0.0, 1.0, int(n_bins) + 1, dtype=torch.float64, device=z.device)
    # bin b holds conf in (edges[b], edges[b+1]]; conf > 0 always, so bucketize never returns 0
    idx = torch.bucketize(conf, edges, right=False) - 1
    n = conf.numel()
    ece = torch.zeros((), dtype=torch.float64, device=z.device)
    for b in range(int(n_bins)):
        m = idx == b
        if bool(m.any()):
            ece = ece + m.sum().double() / n * (correct[m].mean() - conf[m].mean()).abs()
    return float(ece)


def calibrated_ce(temperature: float, reduction: str = "none"):
    """The loss ``(logits, y) -> CE(logits / temperature, y)`` for ``loss_fn`` arguments.

    ``reduction="none"`` gives per-sample losses (:func:`flatnb.curvature.loss_along`);
    ``"sum"`` their sum, which the input-space gradient and curvature functions expect
    (:func:`flatnb.curvature.directional_curvature`, :func:`flatnb.curvature.input_hvp`).
    """
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    if reduction not in ("none", "sum"):
        raise ValueError(f"reduction must be 'none' or 'sum', got {reduction!r}")
    t = float(temperature)

    def loss(logits: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(logits / t, y, reduction=reduction)

    return loss


def negative_margin(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample ``max_{j≠y} z_j − z_y``: the logit margin with the sign of a loss.

    Temperature-free (it scales with the logits, not through the softmax) and positive exactly when
    the prediction is wrong (ties aside). For ReLU networks in eval mode it is piecewise linear in
    the input, so its curvature at a point is zero almost everywhere: measure it over finite steps.
    """
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must have shape (N, k) with k >= 2, got {tuple(logits.shape)}")
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).max(1).values
    return other - true


@torch.no_grad()
def model_logits(model, dataset, device, batch_size: int = 500) -> tuple[Tensor, Tensor]:
    """``(logits, labels)`` of ``model`` in eval mode over a :class:`flatnb.data.Dataset`, float32 on the CPU."""
    was = model.training
    model.eval()
    try:
        zs, ys = [], []
        for x, y in fdata.batches(dataset, batch_size, device=device):
            zs.append(model(x).float().cpu())
            ys.append(y.cpu())
    finally:
        model.train(was)
    if not zs:
        raise ValueError("the dataset is empty: no logits to return")
    return torch.cat(zs), torch.cat(ys)
