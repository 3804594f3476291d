"""Searching a ball: the strongest loss change an attack finds, and radii by bisection over delta.

Walter et al. 2026 §4.3-4.4 bound the loss change in ``B_delta(x)``; this module measures what the
bound is compared with (chapters 2 and 3):

* :func:`project_ball`, :func:`random_perturbation`, :func:`feature_attack` — points of the
  l2 ball that are random, or that move the features ``phi`` the most.
* :func:`max_loss_change` — the largest ``loss(xi) - loss(x)`` found in the ball by
  :func:`flatnb.attacks.pgd` (l2, one run from ``x`` and random restarts of the cross-entropy
  attack, plus a margin (CW) attack whose iterates are scored by the cross-entropy: the CW gradient
  does not underflow where a saturated softmax's does), each sample with its own radius.
* :func:`bisect_radius`, :func:`loss_change_radius`, :func:`flip_radius` — the smallest radius at
  which the attack finds a loss change above ``eps`` (or a label flip), by bisection per sample.
  An attack only finds violations, so the result ``hi`` is an **upper bound on the true radius**:
  a violation was found at ``hi``. The certified radius of :func:`flatnb.curvature.bounds.robust_radius`
  is a lower bound, so ``certified <= true <= hi`` (a check of the bound that can fail).

The ball is the plain l2 ball (no pixel box): the bound covers all of it.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from flatnb import attacks as fa
from flatnb.measure.trajectory import Recorder
from flatnb.runtime import draw

Tensor = torch.Tensor


def _view(v: Tensor, x: Tensor) -> Tensor:
    return v.reshape((-1,) + (1,) * (x.dim() - 1))


def _norms(d: Tensor) -> Tensor:
    return d.flatten(1).norm(dim=1)


def project_ball(xi: Tensor, x: Tensor, delta, clip: tuple[float, float] | None = None) -> Tensor:
    """``xi`` projected onto the l2 ball ``B_delta(x)`` (``delta`` scalar or (N,)), then onto ``clip``.

    Clipping to a box that contains ``x`` can only shorten ``xi - x``, so the result stays in the ball.
    """
    d = xi - x
    r = torch.as_tensor(delta, dtype=x.dtype, device=x.device).expand(x.shape[0])
    out = x + d * _view((r / _norms(d).clamp_min(torch.finfo(x.dtype).tiny)).clamp(max=1.0), x)
    return out if clip is None else out.clamp(*clip)


def random_perturbation(x: Tensor, delta, generator: torch.Generator | None = None,
                        clip: tuple[float, float] | None = None) -> Tensor:
    """``x + delta d`` with ``d`` a uniformly random unit direction per sample (then clipped)."""
    d = draw(torch.randn, x.shape, x.device, x.dtype, generator)
    r = torch.as_tensor(delta, dtype=x.dtype, device=x.device).expand(x.shape[0])
    return project_ball(x + d * _view(r, x) / _view(_norms(d), x), x, delta, clip)


def feature_attack(model, x: Tensor, delta, steps: int, generator: torch.Generator | None = None,
                   clip: tuple[float, float] | None = None) -> Tensor:
    """Normalised gradient ascent on ``||phi(xi) - phi(x)||`` in ``B_delta(x)`` (and ``clip``).

    The direction that stretches the features most: what a Lipschitz constant of ``phi`` is about
    (chapter 2). Starts from a random point at half the radius; steps of ``delta / 2``.
    """
    with torch.no_grad():
        phi0 = model.features(x)
    r = _view(torch.as_tensor(delta, dtype=x.dtype, device=x.device).expand(x.shape[0]), x)
    xi = random_perturbation(x, 0.5 * r.flatten(), generator, clip)
    for _ in range(steps):
        xi = xi.detach().requires_grad_(True)
        gain = (model.features(xi) - phi0).norm(dim=1).sum()
        (g,) = torch.autograd.grad(gain, xi)
        g = g / _view(_norms(g).clamp_min(torch.finfo(x.dtype).tiny), g)
        xi = project_ball(xi + 0.5 * r * g, x, r.flatten(), clip)
    return xi.detach()


class _Ball(nn.Module):
    """``model`` seen through ``z -> x + delta (z - x)``: an attack of radius 1 on ``z`` is an attack
    of radius ``delta_i`` on sample ``i`` (the flatnb contract: ``features`` and the same ``head``)."""

    def __init__(self, model, x: Tensor, delta: Tensor):
        super().__init__()
        self.model, self.x, self.r = model, x, _view(delta, x)
        self.head = model.head
        # a new Module is in training mode; the attacks restore the wrapper's mode afterwards, and
        # restoring "training" would switch the wrapped model's BatchNorm to training too
        self.train(model.training)

    def point(self, z: Tensor) -> Tensor:
        return self.x + self.r * (z - self.x)

    def features(self, z: Tensor) -> Tensor:
        return self.model.features(self.point(z))

    def forward(self, z: Tensor) -> Tensor:
        return self.head(self.features(z))


class Search(NamedTuple):
    """What an attack found in each sample's ball: the largest loss change and whether any iterate flipped."""

    change: Tensor  # (N,) max over iterates of loss(xi) - loss(x)
    flipped: Tensor  # (N,) bool
    xi: Tensor  # the clean-start cross-entropy run's result (a point of each ball)


def _verified_flips(model, xs: Tensor, y: Tensor, wrong: Tensor) -> Tensor:
    """(N,) bool: samples with an iterate that float32 misclassifies, among those whose iterates ``xs``
    ((T+1, N, ...)) a reduced-precision pass marked ``wrong`` ((T+1, N)). Checks each candidate's first wrong
    iterate, then, where float32 disagrees, its last one: two float32 forward passes at most."""
    out = torch.zeros_like(y, dtype=torch.bool)
    cand = wrong.any(0)
    t = torch.arange(wrong.shape[0], device=wrong.device).unsqueeze(1).expand_as(wrong)
    never = torch.full_like(t, wrong.shape[0])
    first = torch.where(wrong, t, never).min(0).values
    last = torch.where(wrong, t, -1).max(0).values
    for pick in (first, last):
        todo = cand & ~out
        if not bool(todo.any()):
            break
        i = todo.nonzero().flatten()
        with torch.no_grad():
            pred = model(xs[pick[i], i]).argmax(1)  # outside autocast: the model's own dtype
        out[i] = pred != y[i]
    return out


def max_loss_change(model, x: Tensor, y: Tensor, delta, steps: int = 20, restarts: int = 2,
                    generator: torch.Generator | None = None, margin_attack: bool = True,
                    autocast_dtype: torch.dtype | None = None, ce_attack: bool = True) -> Search:
    """The strongest cross-entropy change :func:`flatnb.attacks.pgd` (l2) finds in ``B_delta(x)``.

    ``delta`` is a scalar or one radius per sample. Runs: cross-entropy PGD from ``x`` and from
    ``restarts`` random starts, plus (``margin_attack``) CW-margin PGD from ``x``; every iterate of
    every run is scored by the cross-entropy in the model's dtype and the maximum is kept. Steps of
    ``2.5 delta / steps``. The model must be in eval mode.

    ``ce_attack=False`` leaves the cross-entropy runs out (the margin run alone: a flip search at half the
    cost; ``change`` is then the margin run's, scored by the cross-entropy in float32, or zero under autocast).

    ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs the attack steps under autocast, two to three times
    faster on a CPU with bf16 units. A label flip is then counted only where float32 confirms it at the
    iterate (:func:`_verified_flips`, for the margin run too), so ``flipped`` and the radii of :func:`flip_radius`
    rest on float32 decisions; ``change`` then comes from the cross-entropy runs alone, measured in the reduced
    precision (the margin run's iterates are not scored by the cross-entropy: use float32 for
    :func:`loss_change_radius`).
    """
    r = torch.as_tensor(delta, dtype=x.dtype, device=x.device).expand(x.shape[0]).clone()
    if bool((r < 0).any()) or not bool(torch.isfinite(r).all()):
        raise ValueError("delta must be finite and >= 0")
    ball = _Ball(model, x, r)
    with torch.no_grad():
        l0 = F.cross_entropy(model(x), y, reduction="none")
    best, flipped, xi = torch.zeros_like(l0), torch.zeros_like(y, dtype=torch.bool), None
    kw = dict(eps=1.0, steps=steps, step_size=2.5 / steps, norm="l2", clip=None, generator=generator,
              warn=False, record=Recorder, autocast_dtype=autocast_dtype)
    low = autocast_dtype is not None
    runs = [dict(loss="ce", random_start=i > 0, record_inputs=low) for i in range(restarts + 1)] if ce_attack else []
    if not runs and not margin_attack:
        raise ValueError("ce_attack=False needs margin_attack=True: no attack would run")
    if margin_attack:
        runs.append(dict(loss="cw", random_start=False, record_inputs=True))
    for run in runs:
        res = fa.pgd(ball, x, y, **kw, **run)
        traj = res.trajectory
        xi = ball.point(res.x_adv).detach() if xi is None else xi
        loss = traj.loss.to(l0) if run["loss"] == "ce" else None
        if low:  # under autocast a flip is kept only where float32 confirms it at the iterate
            run_flipped = _verified_flips(model, ball.point(traj.x), y, traj.pred != y)
        elif loss is not None:
            run_flipped = (traj.pred != y).any(0)
        else:  # score the margin attack's iterates by the cross-entropy, outside autocast
            with torch.no_grad():
                logits = [ball(z) for z in traj.x]
            loss = torch.stack([F.cross_entropy(z, y, reduction="none") for z in logits])
            run_flipped = torch.stack([z.argmax(1) != y for z in logits]).any(0)
        if loss is not None:
            best = torch.maximum(best, (loss - l0).max(0).values)
        flipped |= run_flipped
    return Search(best, flipped, xi)


class Radius(NamedTuple):
    """A bracket per sample: the attack found no violation at ``lo`` and found one at ``hi``;
    ``censored`` samples had none up to the search's largest radius (``hi`` is then that radius)."""

    lo: Tensor
    hi: Tensor
    censored: Tensor


def bisect_radius(broken: Callable[[Tensor], Tensor], lo: Tensor, hi: Tensor, n_iter: int = 10,
                  max_radius: float | None = None, grow: float = 2.0) -> Radius:
    """Bisection per sample for the smallest radius where ``broken(delta) -> (N,) bool`` holds.

    ``lo`` must be a radius where it does not (e.g. 0 or a certified radius); ``hi`` a first
    guess, multiplied by ``grow`` until ``broken`` or ``max_radius`` (default ``64 hi``).
    Then ``n_iter`` halvings of ``[lo, hi]``; each step calls ``broken`` once for all samples.
    """
    lo, hi = lo.clone(), torch.maximum(hi.clone(), lo)
    if bool((hi <= 0).any()):
        raise ValueError("the first guess hi must be > 0")
    top = 64 * hi if max_radius is None else torch.full_like(hi, float(max_radius))
    found = broken(hi)
    while True:
        grow_me = ~found & (hi < top)
        if not bool(grow_me.any()):
            break
        lo = torch.where(grow_me, hi, lo)
        hi = torch.where(grow_me, torch.minimum(hi * grow, top), hi)
        found = found | (grow_me & broken(hi))
    censored = ~found
    for _ in range(n_iter):
        mid = (lo + hi) / 2
        b = broken(mid) & found
        hi = torch.where(b, mid, hi)
        lo = torch.where(b | censored, lo, mid)
    return Radius(lo, hi, censored)


def loss_change_radius(model, x: Tensor, y: Tensor, eps: float, lo: Tensor, hi: Tensor, n_iter: int = 10,
                       max_radius: float | None = None, **attack) -> Radius:
    """Smallest radius where :func:`max_loss_change` finds ``loss(xi) - loss(x) > eps`` (bisection).

    ``hi`` of the result is an upper bound on the true eps-loss-change robust radius."""
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    return bisect_radius(lambda d: max_loss_change(model, x, y, d, **attack).change > eps, lo, hi, n_iter,
                         max_radius)


def flip_radius(model, x: Tensor, y: Tensor, lo: Tensor, hi: Tensor, n_iter: int = 10,
                max_radius: float | None = None, **attack) -> Radius:
    """Smallest radius where :func:`max_loss_change`'s runs flip the label: an upper bound on the
    distance from ``x`` to the decision boundary (for a correctly classified ``x``).

    On a linear 4-class model (tests) it is the exact distance for three samples in four and at most
    9 % above it for the rest: l2 PGD on the margin can stall on the runner-up class's face."""
    return bisect_radius(lambda d: max_loss_change(model, x, y, d, **attack).flipped, lo, hi, n_iter,
                         max_radius)
