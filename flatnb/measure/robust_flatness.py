"""Flatness of the *robust* loss in weight space (Stutz, Hein and Schiele, ICCV 2021): a second flatness measure
for the atlas (chapter 13), from the literature, beside the paper's relative flatness κ.

Stutz et al. relate adversarially robust generalisation to how much the robust loss

    L_rob(w) = mean over the data of  max_{‖δ‖∞ ≤ ε}  CE(f(x + δ; w), y)

rises when the weights move inside a *relative* ball B_ξ(w) = {w + ν : ‖ν_g‖₂ ≤ ξ ‖w_g‖₂ for every group g},
the groups being the layers (their choice: each weight or bias tensor) or, after Li et al. (2018), the filters
(each slice along a tensor's first dimension). Scaling the ball with the weights makes the measure invariant to
the rescalings a ReLU or BatchNorm network does not see (layer-wise: the rescaling of a whole layer; filter-wise:
of single filters, e.g. before a BatchNorm). Normalisation layers and frozen parameters are not perturbed.

* average-case robust flatness: E_ν [L_rob(w + ν)] − L_rob(w), ν uniform on the relative sphere of radius ξ
  (Stutz et al. use ξ = 0.5, layer-wise), the adversarial examples computed again for every perturbed network;
* worst-case robust flatness: max_{ν ∈ B_ξ} L_rob(w + ν) − L_rob(w), by normalised gradient ascent on ν with a
  projection onto B_ξ (Danskin: the gradient at the adversarial examples of the perturbed network), from a random
  start on the sphere, keeping the largest loss seen (Stutz et al.: ξ = 0.003, 20 steps).

:func:`average_case` and :func:`worst_case` work on any ``loss_fn()`` of a list of parameter tensors (tested on a
quadratic with known answers); :func:`robust_loss` and :func:`robust_flatness` put them together for a model.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from flatnb import attacks

Tensor = torch.Tensor
GRANULARITIES = ("layer", "filter")
_NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def perturbable(model: nn.Module) -> list[Tensor]:
    """The parameters Stutz et al. perturb: every trainable parameter outside normalisation layers (BatchNorm,
    LayerNorm, GroupNorm); frozen ones (e.g. FastNet's whitening filters) are left alone."""
    skip = {id(p) for m in model.modules() if isinstance(m, _NORM_LAYERS) for p in m.parameters(recurse=False)}
    out = [p for p in model.parameters() if p.requires_grad and id(p) not in skip]
    if not out:
        raise ValueError("the model has no trainable parameters outside normalisation layers to perturb")
    return out


def _check(xi: float, granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if not (isinstance(xi, (int, float)) and math.isfinite(xi) and xi >= 0):
        raise ValueError(f"the relative radius xi must be a finite number >= 0, got {xi!r}")


def _group_norm(t: Tensor, granularity: str) -> Tensor:
    """‖t_g‖₂ per group, shaped to broadcast against ``t``: one number (layer-wise) or one per slice along the
    first dimension (filter-wise; a 1-D tensor's groups are its entries)."""
    if granularity == "layer" or t.dim() == 0:
        return t.norm()
    return t.reshape(t.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (t.dim() - 1)))


def random_perturbation(params: list[Tensor], xi: float, granularity: str = "layer",
                        generator: torch.Generator | None = None) -> list[Tensor]:
    """ν uniform on the relative sphere: ν_g = ξ ‖w_g‖ u_g / ‖u_g‖ with u standard normal (drawn on each
    parameter's device and dtype, from ``generator``)."""
    _check(xi, granularity)
    out = []
    for p in params:
        u = torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype)
        out.append(xi * _group_norm(p.detach(), granularity) * u / _group_norm(u, granularity).clamp_min(1e-30))
    return out


def project(nu: list[Tensor], params: list[Tensor], xi: float, granularity: str = "layer") -> list[Tensor]:
    """ν projected onto the relative ball B_ξ: each group scaled down to ‖ν_g‖ ≤ ξ ‖w_g‖ where it is outside."""
    _check(xi, granularity)
    out = []
    for v, p in zip(nu, params):
        radius = xi * _group_norm(p.detach(), granularity)
        out.append(v * torch.clamp(radius / _group_norm(v, granularity).clamp_min(1e-30), max=1.0))
    return out


@contextlib.contextmanager
def shifted(params: list[Tensor], nu: list[Tensor]):
    """The parameters moved to w + ν inside the block, restored exactly (from a copy) after it."""
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, v in zip(params, nu):
                p.add_(v.to(p.dtype))
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def _value(loss_fn: Callable[[], Tensor]) -> float:
    v = float(loss_fn().detach())
    if not math.isfinite(v):
        raise ValueError("the loss is not finite at these weights; check the model, the data and the radius xi")
    return v


def average_case(loss_fn: Callable[[], Tensor], params: list[Tensor], xi: float, n_samples: int,
                 granularity: str = "layer", generator: torch.Generator | None = None) -> tuple[Tensor, float]:
    """``(increases, base)``: ``loss_fn()`` at w + ν_s minus at w, for ``n_samples`` draws ν_s uniform on the
    relative sphere of radius ``xi`` (float64, shape ``(n_samples,)``; their mean is the average-case flatness),
    and the loss at w."""
    _check(xi, granularity)
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    base = _value(loss_fn)
    out = []
    for _ in range(n_samples):
        with shifted(params, random_perturbation(params, xi, granularity, generator)):
            out.append(_value(loss_fn) - base)
    return torch.tensor(out, dtype=torch.float64), base


def worst_case(loss_fn: Callable[[], Tensor], params: list[Tensor], xi: float, steps: int, lr: float = 0.25,
               granularity: str = "layer", generator: torch.Generator | None = None,
               restarts: int = 1) -> tuple[float, float]:
    """``(increase, base)``: the largest ``loss_fn()`` found in the relative ball B_ξ minus the loss at w.
    Each restart starts at a random point of the relative sphere and takes ``steps`` ascent steps
    ν_g ← ν_g + lr · ξ‖w_g‖ · ∇_g / ‖∇_g‖ (per group), each projected back onto B_ξ; every point the search
    visits, its start included, counts. ``loss_fn`` must return a scalar differentiable in ``params``."""
    _check(xi, granularity)
    if steps < 0 or restarts < 1 or not lr > 0:
        raise ValueError(f"steps must be >= 0, restarts >= 1 and lr > 0, got {steps}, {restarts}, {lr}")
    base = _value(loss_fn)
    best = -math.inf
    for _ in range(restarts):
        nu = random_perturbation(params, xi, granularity, generator)
        for t in range(steps + 1):
            with shifted(params, nu):
                loss = loss_fn()
                value = float(loss.detach())
                grads = torch.autograd.grad(loss, params, allow_unused=True) if t < steps else None
            if not math.isfinite(value):
                raise ValueError("the loss is not finite inside the ball; lower the radius xi")
            best = max(best, value)
            if grads is None:
                break
            nu = project([v + lr * xi * _group_norm(p.detach(), granularity) * g / _group_norm(g, granularity)
                          .clamp_min(1e-30) if g is not None else v for v, p, g in zip(nu, params, grads)],
                         params, xi, granularity)
    return best - base, base


def robust_loss(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, step_size: float,
                seed: int = 0, norm: str = "linf") -> Tensor:
    """L_rob at the model's current weights: mean cross-entropy at PGD adversarial examples (random start seeded
    with ``seed`` on ``x``'s device, so every call starts alike), differentiable in the weights (the examples
    themselves are constants: Danskin's theorem). ``steps=0``: the clean loss."""
    if steps > 0:
        gen = torch.Generator(device=x.device).manual_seed(seed)
        x = attacks.pgd(model, x, y, eps=eps, steps=steps, step_size=step_size, norm=norm, random_start=True,
                        generator=gen, warn=False).x_adv.detach()
    return F.cross_entropy(model(x), y)


def robust_flatness(model: nn.Module, x: Tensor, y: Tensor, *, eps: float = 8 / 255, pgd_steps: int = 10,
                    pgd_step_size: float = 2 / 255, xi_average: float = 0.5, n_samples: int = 5,
                    xi_worst: float = 0.003, worst_steps: int = 20, worst_lr: float = 0.25,
                    granularity: str = "layer", seed: int = 0) -> dict:
    """Stutz et al.'s average- and worst-case flatness of the robust loss of ``model`` (eval mode, the
    ``features``/``head`` contract of :mod:`flatnb.attacks`) on ``(x, y)``:
    ``{"robust_loss": L_rob(w), "average": mean increase, "average_samples": the increases (float64),
    "worst": the worst-case increase}``, the random draws from a generator seeded with ``seed`` on ``x``'s
    device. Cost: (1 + n_samples + worst_steps + 1) PGD runs of ``pgd_steps`` steps on ``x``."""
    model.eval()
    params = perturbable(model)
    loss_fn = lambda: robust_loss(model, x, y, eps, pgd_steps, pgd_step_size, seed)  # noqa: E731
    gen = torch.Generator(device=x.device).manual_seed(seed)
    samples, base = average_case(loss_fn, params, xi_average, n_samples, granularity, gen)
    worst, _ = worst_case(loss_fn, params, xi_worst, worst_steps, worst_lr, granularity, gen)
    return {"robust_loss": base, "average": float(samples.mean()), "average_samples": samples, "worst": worst}
