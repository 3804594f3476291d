"""Projected gradient descent (Madry et al. 2018) and FGSM (Goodfellow et al. 2015)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from flatnb.attacks.core import (LOSSES, AttackResult, _check_common, _clean_eval, _combine, _eval_mode, _forward,
                                 _loss_callable, _at_least_fp32, _loss_and_grad, _project, _random_start, _rdims,
                                 _recorder, _Tracker, _validate_steps, _view, _finish, _zero_grad_mask)
from flatnb.models import check_contract

Tensor = torch.Tensor


def _pgd_run(model, x, y, target, eps, steps, step_size, norm, loss, random_start, clip, generator,
             early_stop, check_every, hooks, autocast_dtype, clean):
    """One PGD run.  ``clean`` is ``None`` without a random start: iterate 0 is then
    the clean input and its forward pass doubles as the clean evaluation."""
    tr = _Tracker(x, y, target, loss, hooks)
    loss_fn = tr.loss_fn
    if random_start:
        x_t = _random_start(x, eps, norm, clip, generator)
        tr.init_best(x, clean[2], clean[1].argmax(dim=1))
    else:
        x_t = x.clone()
    zero = clean_correct = None
    steps_run = steps
    for t in range(steps):
        phi, logits, lval, grad = _loss_and_grad(model, x_t, y, target, loss_fn, autocast_dtype)
        if t == 0:
            zero = _zero_grad_mask(grad)
            if not random_start:
                pred0 = logits.detach().argmax(dim=1)
                clean_correct = pred0 == y
                tr.init_best(x, lval, pred0)
        tr.step(t, x_t, phi, logits, lval)
        if early_stop and t > 0 and t % check_every == 0 and bool(tr.best_succ.all()):
            steps_run = t
            break
        with torch.no_grad():
            if norm == "linf":
                x_new = x_t + step_size * grad.sign()
            else:
                g = grad / _view(grad.pow(2).sum(dim=_rdims(grad)).sqrt() + 1e-12, grad)
                x_new = x_t + step_size * g
            x_t = _project(x_new, x, eps, norm, clip)
    else:
        with torch.no_grad():
            phi, logits = _forward(model, x_t, autocast_dtype)
            lval = loss_fn(phi, _at_least_fp32(logits), y, target)
        tr.step(steps, x_t, phi, logits, lval)
    return tr, x_t, lval.detach(), zero, steps_run, clean_correct




def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    norm: str = "linf",
    loss: str | Callable = "ce",
    random_start: bool = False,
    restarts: int = 1,
    target: Tensor | None = None,
    early_stop: bool = False,
    check_every: int = 5,
    record: Callable | None = None,
    record_inputs: bool = False,
    clip: tuple[float, float] | None = (0.0, 1.0),
    autocast_dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
    warn: bool = True,
    on_iterate: Callable | None = None,
) -> AttackResult:
    """Projected gradient descent (Madry et al. 2018), ℓ∞ (sign steps) or ℓ2 (normalised steps).

    The ℓ∞ update is torchattacks' exactly: ``x += step_size * sign(grad)``,
    ``delta = clamp(x - x0, -eps, eps)``, ``x = clamp(x0 + delta, 0, 1)``.
    ``step_size`` defaults to ``2.5 * eps / steps``.  No random start by default
    (the Uncanny Valley setting for trajectories); use ``random_start=True`` and
    ``restarts`` for robustness numbers.  ``target`` (N,) makes it targeted.
    ``on_iterate(t, x_t, phi, logits, loss)`` is called once per iterate (``t = 0 .. T``, again
    from 0 for each restart) with that iterate's own forward pass, all detached, ``logits`` in at
    least float32.  ``record=Recorder`` (a recorder class, :class:`flatnb.measure.trajectory.Recorder`)
    builds such a hook and fills ``result.trajectory`` from it (needs ``restarts == 1``);
    ``loss`` is one of :data:`LOSSES` or a callable ``loss(phi, logits, y, target) -> (N,)`` to maximise,
    evaluated on each iterate's own forward pass (``phi`` the features, ``logits`` in at least float32;
    a callable decides the best iterate among successful ones as a named loss does, so e.g. a loss that
    also reads ``phi`` can steer where a successful attack ends; :func:`flatnb.measure.detector.kappa_aware_attack`).
    ``early_stop`` stops once every example succeeded, checked every
    ``check_every`` steps.  ``clip=None`` lifts the [0, 1] box and its input check.
    """
    check_contract(model)
    _check_common(model, x, y, eps, norm, loss, LOSSES, clip, target)
    _validate_steps(steps, step_size)
    if not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts must be an integer >= 1, got {restarts!r}")
    if restarts > 1 and not random_start:
        raise ValueError("restarts > 1 repeats the same deterministic attack; set random_start=True")
    if record and restarts > 1:
        raise ValueError("record= records one run; use restarts=1")
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every!r}")
    if step_size is None:
        step_size = 2.5 * eps / steps if eps > 0 else 1.0
    x = x.detach()
    with _eval_mode(model):
        clean = _clean_eval(model, x, y, target, _loss_callable(loss), autocast_dtype) if random_start else None
        recorder = _recorder(record, model, x, y, norm, steps, record_inputs)
        results = [
            _pgd_run(model, x, y, target, eps, steps, step_size, norm, loss, random_start, clip, generator,
                     early_stop, check_every, [recorder, on_iterate] if r == 0 else [on_iterate], autocast_dtype,
                     clean)
            for r in range(restarts)
        ]
    clean_correct = clean[1].argmax(dim=1) == y if random_start else results[0][5]
    finite, res = _combine(results, x, clean_correct, results[-1][4], clean)
    return _finish(res, finite, warn, loss, recorder)


def fgsm(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: str = "linf",
    loss: str = "ce",
    target: Tensor | None = None,
    record: Callable | None = None,
    record_inputs: bool = False,
    clip: tuple[float, float] | None = (0.0, 1.0),
    autocast_dtype: torch.dtype | None = None,
    warn: bool = True,
    on_iterate: Callable | None = None,
) -> AttackResult:
    """Fast gradient sign method (Goodfellow et al. 2015): one step of size ``eps``.

    ``result.x_last`` is the stepped point; ``result.x_adv`` the better of it and
    the clean input (same rule as PGD).  ``norm="l2"`` is the fast gradient method.
    """
    return pgd(model, x, y, eps, steps=1, step_size=eps if eps > 0 else 1.0, norm=norm, loss=loss,
               target=target, record=record, record_inputs=record_inputs, clip=clip,
               autocast_dtype=autocast_dtype, warn=warn, on_iterate=on_iterate)


