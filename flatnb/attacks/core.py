"""What every attack shares: results, validation, projection, the best-iterate tracker.

See :mod:`flatnb.attacks` for the conventions (eval mode, iterates, best iterate,
no host synchronisation per step, mixed precision, zero gradients).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, fields, replace
from typing import Any, Callable

import torch
import torch.nn as nn

from flatnb.attacks.losses import LOSS_FNS, true_margin
from flatnb.runtime import draw

Tensor = torch.Tensor

NORMS = ("linf", "l2")
LOSSES = ("ce", "cw", "dlr")
APGD_LOSSES = ("ce", "dlr")

_LOSS_FNS = LOSS_FNS


def loss_name(loss) -> str:
    """A loss's name for messages: the string itself, or a callable's ``__name__``."""
    return loss if isinstance(loss, str) else getattr(loss, "__name__", type(loss).__name__)


def _loss_callable(loss) -> Callable:
    """The per-example loss as ``f(phi, logits, y, target) -> (N,)``: a named loss of :data:`LOSS_FNS`
    (which reads the logits only), or a callable with that signature (e.g. a loss that also reads the
    features ``phi`` of the same forward pass), passed through."""
    if isinstance(loss, str):
        fn = _LOSS_FNS[loss]
        return lambda phi, logits, y, target: fn(logits, y, target)
    if callable(loss):
        return loss
    raise TypeError(f"loss must be one of {LOSSES} or a callable loss(phi, logits, y, target) -> (N,), got {loss!r}")

# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


@dataclass
class AttackResult:
    """What an attack returns; all tensors on the attack's device.

    ``x_adv``: best iterate per example (see module docstring); ``x_last``: the
    final iterate of the (last) run; ``success``: ``x_adv`` is misclassified
    (or hits the target); ``clean_correct``: the clean input is classified
    correctly; ``loss_final``/``loss_best``: attack loss at ``x_last``/``x_adv``;
    ``flip_step``: first iterate index whose prediction differs from ``y``
    (``pred == target`` when targeted), 0 for a clean misclassification, -1 if
    never (first run only when restarting); ``zero_grad``: input gradient
    exactly zero at the first step; ``steps_run``: steps actually taken (early
    stop); ``trajectory``: what the ``record`` recorder made (a
    :class:`flatnb.measure.trajectory.Trajectory` for its ``Recorder``), else None; ``attacked``: which examples the attack ran
    on (all of them, except for APGD with ``attack_misclassified=False``, which skips the
    examples misclassified when clean, as the reference AutoAttack does: they keep ``x_adv = x``,
    ``success`` from their clean prediction, ``flip_step`` 0, ``zero_grad`` False).
    """

    x_adv: Tensor
    x_last: Tensor
    success: Tensor
    clean_correct: Tensor
    loss_final: Tensor
    loss_best: Tensor
    flip_step: Tensor
    zero_grad: Tensor
    steps_run: int
    trajectory: Any = None
    attacked: Tensor | None = None

    @property
    def n_zero_grad(self) -> int:
        return int(self.zero_grad.sum())

    def robust_accuracy(self) -> float:
        """Fraction of examples classified correctly and not broken by the attack."""
        return float((self.clean_correct & ~self.success).float().mean())

    def clean_accuracy(self) -> float:
        return float(self.clean_correct.float().mean())


@dataclass
class TransferResult:
    """Evaluation of given (adversarial) inputs on another model, (N,) each."""

    pred: Tensor
    success: Tensor
    loss_ce: Tensor
    margin: Tensor

    def success_rate(self) -> float:
        return float(self.success.float().mean())

    def accuracy(self) -> float:
        """Accuracy of the evaluated model on the given inputs (untargeted meaning)."""
        return float((~self.success).float().mean())


# ---------------------------------------------------------------------------
# Validation and model handling
# ---------------------------------------------------------------------------


def _check_common(model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: str, loss: str, losses: tuple, clip,
                  target) -> None:
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if not callable(loss) and loss not in losses:
        raise ValueError(f"loss must be one of {losses}, got {loss!r}")
    if y.dim() != 1 or x.dim() < 2 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x must be (N, ...) and y (N,) with the same N, got x {tuple(x.shape)} and y {tuple(y.shape)}"
        )
    if x.shape[0] == 0:
        raise ValueError("the batch is empty (N = 0): an attack needs at least one example")
    if y.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
    if target is not None:
        if target.shape != y.shape or target.dtype != y.dtype:
            raise ValueError(f"target must have the shape and dtype of y {tuple(y.shape)}, got {tuple(target.shape)}")
        if bool((target == y).any()):
            raise ValueError("target must differ from y for every example (a targeted attack towards y is void)")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor in [0, 1], got dtype {x.dtype}")
    if clip is not None:
        lo, hi = clip
        if not lo < hi:
            raise ValueError(f"clip must be (low, high) with low < high, got {clip!r}")
    _check_values(model, x, clip)


def _rows(mask: Tensor) -> str:
    rows = torch.nonzero(mask)[:, 0]
    return f"{rows.numel()} row(s) {rows[:10].tolist()}{' ...' if rows.numel() > 10 else ''}"


def _check_values(model: nn.Module | None, x: Tensor, clip) -> None:
    """NaN/inf inputs, inputs outside ``clip`` and NaN/inf parameters or buffers raise ``ValueError``,
    naming the rows or the parameter.  One host sync for all of it (an argmax over a NaN row is 0, so
    a NaN input labelled 0 would otherwise count as correct and robust)."""
    flat = x.detach().flatten(1)
    parts = [~torch.isfinite(flat).all(dim=1)]
    if clip is not None:
        parts.append(((flat < clip[0]) | (flat > clip[1])).any(dim=1))
    named = []
    if model is not None:
        named = [(n, t) for n, t in list(model.named_parameters()) + list(model.named_buffers())
                 if t.is_floating_point()]
        parts.append(torch.stack([~torch.isfinite(t.detach()).all() for _, t in named]).to(x.device)
                     if named else torch.zeros(0, dtype=torch.bool, device=x.device))
    flags = torch.cat(parts).cpu()  # the one host sync at the start
    n = x.shape[0]
    if model is not None and named and bool(flags[-len(named):].any()):
        bad = [name for (name, _), b in zip(named, flags[-len(named):].tolist()) if b]
        raise ValueError(f"the model has NaN or inf values in {bad[:5]}{' ...' if len(bad) > 5 else ''}; "
                         "check the checkpoint it was loaded from or the training run that produced it")
    if bool(flags[:n].any()):
        raise ValueError(f"x has NaN or inf values in {_rows(flags[:n])}; check those inputs "
                         "(a NaN pixel's argmax is 0, so it must not be attacked or scored)")
    if clip is not None and bool(flags[n:2 * n].any()):
        raise ValueError(
            f"x has values outside [{clip[0]}, {clip[1]}] = clip in {_rows(flags[n:2 * n])}; pass pixels in [0, 1] "
            "(models normalise inside themselves) or clip=None to attack unbounded inputs"
        )


@contextlib.contextmanager
def _eval_mode(*models: nn.Module):
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def _autocast(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _forward(model: nn.Module, x: Tensor, autocast_dtype) -> tuple[Tensor, Tensor]:
    """``phi`` and fp32 ``logits`` from one pass; the head runs in float32 outside autocast."""
    with _autocast(x.device, autocast_dtype):
        phi = model.features(x)
    if autocast_dtype is not None:
        phi = phi.float()
    return phi, model.head(phi)


def _at_least_fp32(t: Tensor) -> Tensor:
    """bf16/fp16 logits go up to float32; float64 logits stay float64 (the float64 control needs it)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _rdims(x: Tensor) -> tuple[int, ...]:
    return tuple(range(1, x.dim()))


def _view(v: Tensor, x: Tensor) -> Tensor:
    return v.reshape((-1,) + (1,) * (x.dim() - 1))


def _project(x_new: Tensor, x: Tensor, eps: float, norm: str, clip) -> Tensor:
    """Project onto the eps-ball around ``x`` (same ops as torchattacks), then onto ``clip``."""
    delta = x_new - x
    if norm == "linf":
        delta = torch.clamp(delta, min=-eps, max=eps)
    else:
        n = delta.pow(2).sum(dim=_rdims(delta)).sqrt()
        factor = torch.clamp(eps / (n + 1e-12), max=1.0)
        delta = delta * _view(factor, delta)
    out = x + delta
    if clip is not None:
        out = torch.clamp(out, min=clip[0], max=clip[1])
    return out


def _random_start(x: Tensor, eps: float, norm: str, clip, generator) -> Tensor:
    if norm == "linf":
        delta = (draw(torch.rand, x.shape, x.device, x.dtype, generator) * 2 - 1) * eps
    else:
        d = draw(torch.randn, x.shape, x.device, x.dtype, generator)
        d = d / _view(d.pow(2).sum(dim=_rdims(d)).sqrt() + 1e-12, d)
        r = draw(torch.rand, (x.shape[0],), x.device, x.dtype, generator)
        delta = d * _view(r * eps, d)
    return _project(x + delta, x, eps, norm, clip)


# ---------------------------------------------------------------------------
# Per-step bookkeeping: best iterate, flip step, trajectory
# ---------------------------------------------------------------------------


class _Tracker:
    """Device-side state of one attack run (best iterate, flip step); no host syncs.

    ``hooks`` are ``on_iterate(t, x_t, phi, logits, loss)`` callables, called once per iterate
    with that iterate's own forward pass (``logits`` in at least float32, everything detached).
    """

    def __init__(self, x, y, target, loss_name, hooks=()):
        self.x, self.y, self.target = x, y, target
        self.loss_fn = _loss_callable(loss_name)
        self.flip = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        self.finite = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        self.best_x = None
        self.hooks = [h for h in hooks if h is not None]

    def success_of(self, pred: Tensor) -> Tensor:
        return pred == self.target if self.target is not None else pred != self.y

    def init_best(self, x0: Tensor, loss: Tensor, pred: Tensor) -> None:
        self.best_x = x0.detach().clone()
        self.best_loss = loss.detach().clone()
        self.best_succ = self.success_of(pred)

    def step(self, t: int, x_t: Tensor, phi: Tensor, logits: Tensor, loss: Tensor) -> Tensor:
        """Book iterate ``t``; returns its success mask."""
        logits, loss = _at_least_fp32(logits.detach()), loss.detach()
        self.finite &= torch.isfinite(logits).all(dim=1)
        pred = logits.argmax(dim=1)
        succ = self.success_of(pred)
        self.flip = torch.where((self.flip < 0) & succ, torch.full_like(self.flip, t), self.flip)
        # a successful iterate beats an unsuccessful one; then the higher loss wins
        better = (succ & ~self.best_succ) | ((succ == self.best_succ) & (loss > self.best_loss))
        self.best_x = torch.where(_view(better, x_t), x_t.detach(), self.best_x)
        self.best_loss = torch.where(better, loss, self.best_loss)
        self.best_succ = self.best_succ | succ
        for hook in self.hooks:
            hook(t, x_t.detach(), phi.detach(), logits, loss)
        return succ


def _recorder(record: Callable | None, model, x, y, norm, steps, record_inputs):
    """The hook ``record(model, x, y, norm, steps, record_inputs)`` when a recorder class is given, else
    ``None``. The attacks take the class from the caller (:class:`flatnb.measure.trajectory.Recorder`),
    so that they import nothing from the measurements built on them, nor the curvature the recorder
    computes."""
    if record is None or record is False:
        return None
    if record is True or not callable(record):
        raise TypeError("record= takes a recorder class, e.g. record=flatnb.measure.trajectory.Recorder "
                        f"(the attacks do not import it), got {record!r}")
    return record(model, x, y, norm, steps, record_inputs)


def _loss_and_grad(model, x_t, y, target, loss_fn, autocast_dtype):
    x_t = x_t.detach().requires_grad_(True)
    with torch.enable_grad():
        phi, logits = _forward(model, x_t, autocast_dtype)
        loss = loss_fn(phi, _at_least_fp32(logits), y, target)
        if loss.shape != y.shape:
            raise ValueError(f"the attack loss must give one value per example, shape {tuple(y.shape)}, "
                             f"got {tuple(loss.shape)}")
        # sum, not mean: per-example gradients are not scaled by 1/N (no extra underflow)
        grad = torch.autograd.grad(loss.sum(), x_t)[0]
    return phi, logits, loss, grad


def _zero_grad_mask(grad: Tensor) -> Tensor:
    return grad.abs().amax(dim=_rdims(grad)) == 0


def _finish(res: AttackResult, finite: Tensor, warn: bool, loss: str, recorder=None) -> AttackResult:
    """The one end-of-attack sync: logits that became NaN/inf at any iterate raise ``ValueError``
    (inputs and weights were checked at the start, so the logits overflowed); then the
    zero-gradient warning."""
    flags = torch.cat([~finite, res.zero_grad]).cpu()
    n = finite.shape[0]
    if bool(flags[:n].any()):
        raise ValueError(
            f"the logits became NaN or inf during the attack in {_rows(flags[:n])}, although inputs and weights "
            "are finite: they overflow; check the head's scale (a large temperature factor) or attack in float64")
    if warn:
        _warn_zero_grad(flags[n:], loss)
    if recorder is not None:
        res.trajectory = recorder.trajectory(res.flip_step, res.steps_run)
    return res


def _warn_zero_grad(zero: Tensor, loss) -> None:
    loss = loss_name(loss)
    n = int(zero.sum())  # a host sync (the end-of-attack one when called from _finish)
    if n > 0:
        warnings.warn(
            f"there are {n} of {zero.numel()} points with zero input gradient at the first step of the "
            f"{loss.upper()} attack; the attack cannot move them and its robust accuracy is probably "
            "overestimated (gradient masking, e.g. a saturated softmax in float32). "
            + ("Use loss='dlr' or 'cw' (scale-invariant margins), a random start, or transfer attacks."
               if loss.lower().endswith("ce") else "Try a random start or transfer attacks."),
            RuntimeWarning,
            stacklevel=3,
        )


def _clean_eval(model, x, y, target, loss_fn, autocast_dtype):
    with torch.no_grad():
        phi, logits = _forward(model, x, autocast_dtype)
        logits = _at_least_fp32(logits)
        return phi, logits, loss_fn(phi, logits, y, target)


# ---------------------------------------------------------------------------
# PGD and FGSM
def _validate_steps(steps, step_size):
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if step_size is not None and (not math.isfinite(step_size) or step_size <= 0):
        raise ValueError(f"step_size must be > 0, got {step_size!r}")


def _combine(results, x, clean_correct, steps_run, clean=None):
    """Merge runs (restarts) with the same success-then-loss rule as within a run.

    Returns ``(finite, result)``: ``finite`` (N,) says the logits of every iterate (and of the clean
    evaluation ``clean``, if given) were finite; :func:`_finish` checks it."""
    tr0, x_last, lf, zero = results[0][:4]
    bx, bl, bs = tr0.best_x, tr0.best_loss, tr0.best_succ
    finite = tr0.finite if clean is None else tr0.finite & torch.isfinite(clean[1]).all(dim=1)
    for r in results[1:]:
        finite = finite & r[0].finite
    for tr, x_last, lf in (r[:3] for r in results[1:]):
        better = (tr.best_succ & ~bs) | ((tr.best_succ == bs) & (tr.best_loss > bl))
        bx = torch.where(_view(better, x), tr.best_x, bx)
        bl = torch.where(better, tr.best_loss, bl)
        bs = bs | tr.best_succ
    return finite, AttackResult(
        x_adv=bx, x_last=x_last, success=bs, clean_correct=clean_correct, loss_final=lf, loss_best=bl,
        flip_step=tr0.flip, zero_grad=zero, steps_run=steps_run,
        attacked=torch.ones_like(bs),
    )




def cat_results(results: list) -> AttackResult:
    """Concatenate :class:`AttackResult` objects of consecutive batches into one.

    Per-example tensors are joined along the example axis (dim 0; dim 1 for the
    (T+1, N) trajectory rows), ``steps_run`` is the smallest of the batches'.
    """
    if not results:
        raise ValueError("cat_results needs at least one AttackResult")
    first = results[0]
    out = {}
    for f in fields(first):
        vals = [getattr(r, f.name) for r in results]
        if f.name == "steps_run":
            out[f.name] = min(vals)
        elif f.name == "trajectory":
            out[f.name] = None if any(v is None for v in vals) else type(vals[0]).cat(vals)
        elif vals[0] is None:
            out[f.name] = None
        else:
            out[f.name] = torch.cat(vals, dim=0)
    return replace(first, **out)
