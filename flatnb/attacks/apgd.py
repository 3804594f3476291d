"""Auto-PGD (Croce & Hein 2020): step-size schedule with checkpoints, momentum 0.75."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from flatnb.attacks.core import (APGD_LOSSES, AttackResult, _at_least_fp32, _check_common, _clean_eval, _combine, _eval_mode,
                                 _loss_callable, _loss_and_grad, _project, _rdims, _recorder, _Tracker, _validate_steps, _view,
                                 _finish, _zero_grad_mask)
from flatnb.models import check_contract
from flatnb.runtime import draw

Tensor = torch.Tensor


def apgd_checkpoints(steps: int) -> list[int]:
    """Iterations (0-based, after which the step size may halve) of APGD's schedule.

    Same constants as the reference code: first period ``0.22 T``, shrinking by
    ``0.03 T`` down to ``0.06 T``.
    """
    p, p_min, decr = max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
    out, i = [], p - 1
    while i < steps:
        out.append(i)
        p = max(p - decr, p_min)
        i += p
    return out


def _apgd_run(model, x, y, target, eps, steps, norm, loss, rho, clip, generator, hooks, autocast_dtype, clean):
    tr = _Tracker(x, y, target, loss, hooks)
    loss_fn = tr.loss_fn
    _, c_logits, c_loss = clean
    n = x.shape[0]
    dev = x.device
    # random start on the sphere of the ball as in the reference code
    if norm == "linf":
        t0 = draw(torch.rand, x.shape, dev, x.dtype, generator) * 2 - 1
        x_t = x + eps * t0 / _view(t0.abs().amax(dim=_rdims(t0)) + 1e-12, t0)
    else:
        t0 = draw(torch.randn, x.shape, dev, x.dtype, generator)
        x_t = x + eps * t0 / _view(t0.pow(2).sum(dim=_rdims(t0)).sqrt() + 1e-12, t0)
    x_t = torch.clamp(x_t, *clip) if clip is not None else x_t
    tr.init_best(x, c_loss, c_logits.argmax(dim=1))

    phi, logits, lval, grad = _loss_and_grad(model, x_t, y, target, loss_fn, autocast_dtype)
    tr.step(0, x_t, phi, logits, lval)
    zero = _zero_grad_mask(grad)
    lval = lval.detach()
    # the run's own best point (restart target of step-size halving), apart from the result tracker
    x_best, g_best, l_best = x_t.clone(), grad.clone(), lval.clone()
    hist = torch.empty(steps + 1, n, device=dev, dtype=lval.dtype)
    hist[0] = lval
    step = torch.full((n,), 2.0 * eps, device=dev, dtype=x.dtype)
    x_old = x_t.clone()
    checkpoints = apgd_checkpoints(steps)
    prev_ckpt = -1
    l_best_last = l_best.clone()
    reduced_last = torch.ones(n, dtype=torch.bool, device=dev)

    def proj(z):
        return _project(z, x, eps, norm, clip)

    for i in range(steps):
        with torch.no_grad():
            a = 0.75 if i > 0 else 1.0
            s = _view(step, x_t)
            if norm == "linf":
                z = proj(x_t + s * grad.sign())
            else:
                g = grad / _view(grad.pow(2).sum(dim=_rdims(grad)).sqrt() + 1e-12, grad)
                z = proj(x_t + s * g)
            # momentum 0.75 (a = 1 at the first step), as in Croce & Hein's Algorithm 1
            z = proj(x_t + a * (z - x_t) + (1 - a) * (x_t - x_old))
            x_old, x_t = x_t, z
        phi, logits, lval, grad = _loss_and_grad(model, x_t, y, target, loss_fn, autocast_dtype)
        tr.step(i + 1, x_t, phi, logits, lval)
        with torch.no_grad():
            lval = lval.detach()
            hist[i + 1] = lval
            imp = lval > l_best
            x_best = torch.where(_view(imp, x_t), x_t, x_best)
            g_best = torch.where(_view(imp, grad), grad, g_best)
            l_best = torch.where(imp, lval, l_best)
            if i in checkpoints:
                k = i - prev_ckpt
                # condition 1: fewer than rho * k of the last k steps increased the loss
                ups = (hist[i + 2 - k: i + 2] > hist[i + 1 - k: i + 1]).sum(dim=0)
                cond1 = ups <= k * rho
                # condition 2: the step size was not reduced last time and the best loss did not improve
                cond2 = ~reduced_last & (l_best_last >= l_best)
                halve = cond1 | cond2
                reduced_last = halve
                l_best_last = l_best.clone()
                step = torch.where(halve, step / 2, step)
                x_t = torch.where(_view(halve, x_t), x_best, x_t)
                grad = torch.where(_view(halve, grad), g_best, grad)
                prev_ckpt = i
    return tr, x_t, lval, zero, steps


def apgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: str = "linf",
    loss: str = "ce",
    steps: int = 100,
    restarts: int = 1,
    rho: float = 0.75,
    target: Tensor | None = None,
    record: Callable | None = None,
    record_inputs: bool = False,
    clip: tuple[float, float] | None = (0.0, 1.0),
    autocast_dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
    warn: bool = True,
    on_iterate: Callable | None = None,
    attack_misclassified: bool = False,
) -> AttackResult:
    """Auto-PGD (Croce & Hein 2020): step size ``2 eps`` halved at checkpoints, momentum 0.75.

    At each checkpoint (:func:`apgd_checkpoints`) an example's step size halves
    and it restarts from its best point if fewer than ``rho`` of the steps since
    the last checkpoint increased the loss, or if its step size was not halved
    last time and its best loss did not improve.  Random start on the ball's
    sphere; ``steps=100`` as in the reference (torchattacks' AutoAttack uses 10,
    for headline numbers use :func:`autoattack`).  Losses ``"ce"`` and ``"dlr"``; ``target`` gives APGD-CE-T /
    APGD-T (targeted DLR, k >= 4).  Deviation: the oscillation count of the
    first period compares with the starting loss, where the reference code reads
    an uninitialised 0.  ``record`` / ``record_inputs`` / ``on_iterate`` as in :func:`pgd`
    (iterate 0 is the random start; the clean input is not an iterate here).

    ``attack_misclassified=False`` (default, as the reference AutoAttack) attacks only the examples
    classified correctly when clean (one host sync to select them); the others keep ``x_adv = x``
    and count as successes of the clean prediction, and ``result.attacked`` says which were
    attacked.  Hooks and the recorded trajectory still see all N rows: a skipped example stays at
    its clean input, so its rows repeat the clean forward pass.  ``True`` attacks every example.
    """
    check_contract(model)
    if not isinstance(loss, str):
        raise ValueError(f"loss must be one of {APGD_LOSSES} for APGD (a callable loss is a PGD option), got {loss!r}")
    _check_common(model, x, y, eps, norm, loss, APGD_LOSSES, clip, target)
    _validate_steps(steps, None)
    if not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts must be an integer >= 1, got {restarts!r}")
    if record and restarts > 1:
        raise ValueError("record= records one run; use restarts=1")
    if not 0 < rho <= 1:
        raise ValueError(f"rho must be in (0, 1], got {rho!r}")
    x = x.detach()
    with _eval_mode(model):
        clean = _clean_eval(model, x, y, target, _loss_callable(loss), autocast_dtype)
        clean_correct = clean[1].argmax(dim=1) == y
        recorder = _recorder(record, model, x, y, norm, steps, record_inputs)
        idx = None if attack_misclassified else torch.nonzero(clean_correct)[:, 0]
        if idx is not None and idx.numel() == x.shape[0]:
            idx = None  # every example is correct: attack the batch as it is
        if idx is None:
            results = [
                _apgd_run(model, x, y, target, eps, steps, norm, loss, rho, clip, generator,
                          [recorder, on_iterate] if r == 0 else [on_iterate], autocast_dtype, clean)
                for r in range(restarts)
            ]
            finite, res = _combine(results, x, clean_correct, steps, clean)
        else:
            finite, res = _apgd_subset(model, x, y, target, eps, steps, norm, loss, rho, clip, generator, restarts,
                                       [recorder, on_iterate], autocast_dtype, clean, clean_correct, idx)
    return _finish(res, finite, warn, f"APGD-{loss}", recorder)


class _Scatter:
    """Present a hook with all N rows while the attack runs on the rows ``idx``: the skipped
    examples stay at their clean input, with the clean forward pass."""

    def __init__(self, hook, idx, x, clean):
        self.hook, self.idx, self.x = hook, idx, x
        self.phi0, self.logits0, self.loss0 = (c.detach() for c in clean)

    def __call__(self, t, x_t, phi, logits, loss):
        i = self.idx
        self.hook(t, self.x.index_copy(0, i, x_t), self.phi0.to(phi.dtype).index_copy(0, i, phi),
                  _at_least_fp32(self.logits0).to(logits.dtype).index_copy(0, i, logits),
                  self.loss0.to(loss.dtype).index_copy(0, i, loss))


def _apgd_subset(model, x, y, target, eps, steps, norm, loss, rho, clip, generator, restarts, hooks, autocast_dtype,
                 clean, clean_correct, idx):
    """APGD on the examples ``idx`` only; the result is scattered back to all N rows."""
    n = x.shape[0]
    if idx.numel() == 0:
        results = None
    else:
        sub = [c[idx] for c in clean]
        t_sub = None if target is None else target[idx]
        wrapped = [None if h is None else _Scatter(h, idx, x, clean) for h in hooks]
        results = [
            _apgd_run(model, x[idx], y[idx], t_sub, eps, steps, norm, loss, rho, clip, generator,
                      wrapped if r == 0 else wrapped[1:], autocast_dtype, sub)
            for r in range(restarts)
        ]
    pred0 = clean[1].argmax(dim=1)
    succ0 = pred0 == target if target is not None else pred0 != y
    finite = torch.isfinite(clean[1]).all(dim=1)
    res = AttackResult(
        x_adv=x.clone(), x_last=x.clone(), success=succ0, clean_correct=clean_correct,
        loss_final=clean[2].detach().clone(), loss_best=clean[2].detach().clone(),
        flip_step=torch.where(succ0, 0, -1), zero_grad=torch.zeros(n, dtype=torch.bool, device=x.device),
        steps_run=steps, attacked=torch.zeros(n, dtype=torch.bool, device=x.device),
    )
    if results is not None:
        f_sub, r_sub = _combine(results, x[idx], clean_correct[idx], steps, sub)
        finite[idx] = f_sub
        for name in ("x_adv", "x_last", "success", "loss_final", "loss_best", "flip_step", "zero_grad", "attacked"):
            getattr(res, name)[idx] = getattr(r_sub, name)
    return finite, res


