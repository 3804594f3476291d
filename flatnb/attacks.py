"""Adversarial attacks with trajectory recording: FGSM, PGD, APGD, transfer.

Attacks are plain functions over tensors (cleverhans v4 style).  Every model
follows the flatnb contract: ``model.features(x) -> phi`` (N, m), ``model.head``
is the final ``nn.Linear`` and ``model(x) == model.head(model.features(x))``.
Inputs are pixels in [0, 1].

Conventions shared by all attacks
---------------------------------
* **Eval mode.**  The model is switched to ``eval()`` for the attack and put
  back into its previous mode afterwards (frozen BatchNorm, no dropout; PAPER
  §6.3).  Parameters are not touched.
* **Iterates.**  ``x_0`` is the starting point (the clean input, or a random
  point in the ball with ``random_start=True``) and ``x_1 .. x_T`` follow the
  ``T`` gradient steps.  Each iterate gets exactly one forward pass,
  ``phi = model.features(x)``, ``logits = model.head(phi)``; the loss, the
  gradient and everything recorded come from that pass.  ``x_T`` is evaluated
  without a gradient.
* **Best iterate.**  Per example the attack keeps the best point seen, the
  clean input included: a successful iterate beats an unsuccessful one, and
  among equals the higher attack loss wins.  So ``x_adv`` is the highest-loss
  *successful* iterate when there is one, and ``success`` is consistent with it.
  Success is a label flip (``pred != y``), or ``pred == target`` when targeted.
* **No host synchronisation per step.**  Everything stays on the device;
  ``early_stop`` checks ``success.all()`` every ``check_every`` steps (one
  sync each time), and the zero-gradient report syncs once at the end.
* **Mixed precision.**  ``autocast_dtype=torch.bfloat16`` runs ``features``
  under autocast; the head, the loss and every recorded quantity are computed
  in float32 from ``phi.float()`` (curvature is never taken in bf16, PAPER §6.7).
* **Zero gradients.**  Examples whose input gradient is exactly zero at the
  first step (a saturated softmax: float32 CE gradients underflow for a scaled
  head, PAPER §3) are reported in ``AttackResult.zero_grad`` with a warning, as
  AutoAttack's checks do.  Use ``loss="cw"`` or ``"dlr"`` then.
* **Speed.**  An attack costs one forward+backward pass per step plus one
  forward pass for the last iterate.  For BatchNorm networks, attacking
  ``flatnb.models.fold_batchnorm(model)`` (the same function with Conv→BN
  folded) is 1.1–1.4× faster; on a GPU add ``autocast_dtype=torch.bfloat16``
  and channels_last (``benchmarks/attacks.py``).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from flatnb.curvature.last_layer import class_distances, closed_form
from flatnb.models import check_contract
from flatnb.runtime import draw

Tensor = torch.Tensor

NORMS = ("linf", "l2")
LOSSES = ("ce", "cw", "dlr")
APGD_LOSSES = ("ce", "dlr")


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


@dataclass
class Trajectory:
    """Per-iterate, per-example quantities, each (T+1, N) on the attack's device.

    Row ``t`` belongs to iterate ``x_t`` (row 0: the starting point).  ``margin`` is
    ``z_y - max_{j != y} z_j`` for the true label (positive: correctly
    classified).  ``kappa_sq = ||w||_F^2 Tr H``, ``kappa_unsq = ||w||_F Tr H``,
    ``kappa_neuron`` the neuron-wise value (see :func:`flatnb.flatness.closed_form`).
    ``delta_norm`` is ``||x_t - x||`` in the attack's norm.  ``x`` holds the
    iterates (T+1, N, ...) only with ``record_inputs=True``.
    """

    loss: Tensor
    p_y: Tensor
    p_top: Tensor
    pred: Tensor
    margin: Tensor
    phi_sq: Tensor
    gini: Tensor
    kappa_sq: Tensor
    kappa_unsq: Tensor
    kappa_neuron: Tensor
    delta_norm: Tensor
    flip_step: Tensor
    x: Tensor | None = None

    def truncate(self, steps: int) -> "Trajectory":
        """The first ``steps + 1`` rows (used after an early stop)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v if f.name == "flip_step" or v is None else v[: steps + 1]
        return Trajectory(**out)


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
    stop); ``trajectory``: with ``record=True``.
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
    trajectory: Trajectory | None = None

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
# Losses (per example, to be maximised)
# ---------------------------------------------------------------------------


def _other_max(logits: Tensor, label: Tensor) -> Tensor:
    """``max_{j != label} z_j`` per row."""
    masked = logits.scatter(1, label[:, None], float("-inf"))
    return masked.amax(dim=1)


def true_margin(logits: Tensor, y: Tensor) -> Tensor:
    """``z_y - max_{j != y} z_j``: positive iff ``y`` is the (unique) argmax."""
    return logits.gather(1, y[:, None])[:, 0] - _other_max(logits, y)


def ce_loss(logits: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
    """Cross-entropy per example; targeted: ``-CE(z, target)``."""
    if target is None:
        return F.cross_entropy(logits, y, reduction="none")
    return -F.cross_entropy(logits, target, reduction="none")


def cw_loss(logits: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
    """Carlini-Wagner margin: ``max_{j != y} z_j - z_y``; targeted ``z_t - max_{j != t} z_j``.

    Unclamped, so the attack keeps pushing after the flip.
    """
    if target is None:
        return -true_margin(logits, y)
    return true_margin(logits, target)


def dlr_loss(logits: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
    """Difference-of-logits ratio (Croce & Hein 2020), invariant to logit shift and scale.

    Untargeted: ``-(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3)`` (needs k >= 3);
    targeted: ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)`` (needs k >= 4),
    with ``z_pi1 >= z_pi2 >= ...`` the sorted logits.
    """
    k = logits.shape[1]
    srt = logits.sort(dim=1, descending=True).values
    z_y = logits.gather(1, y[:, None])[:, 0]
    if target is None:
        if k < 3:
            raise ValueError(f"the DLR loss needs at least 3 classes, got {k}; use loss='cw'")
        return -(z_y - _other_max(logits, y)) / (srt[:, 0] - srt[:, 2] + 1e-12)
    if k < 4:
        raise ValueError(f"the targeted DLR loss needs at least 4 classes, got {k}; use loss='cw'")
    z_t = logits.gather(1, target[:, None])[:, 0]
    return -(z_y - z_t) / (srt[:, 0] - 0.5 * (srt[:, 2] + srt[:, 3]) + 1e-12)


_LOSS_FNS = {"ce": ce_loss, "cw": cw_loss, "dlr": dlr_loss}


# ---------------------------------------------------------------------------
# Validation and model handling
# ---------------------------------------------------------------------------


def _check_common(x: Tensor, y: Tensor, eps: float, norm: str, loss: str, losses: tuple, clip, target) -> None:
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if loss not in losses:
        raise ValueError(f"loss must be one of {losses}, got {loss!r}")
    if y.dim() != 1 or x.dim() < 2 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x must be (N, ...) and y (N,) with the same N, got x {tuple(x.shape)} and y {tuple(y.shape)}"
        )
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
        # one host sync per attack call, not per step
        if bool(((x < lo) | (x > hi)).any()):
            raise ValueError(
                f"x has values outside [{lo}, {hi}] = clip; pass pixels in [0, 1] "
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


def _norm(d: Tensor, norm: str) -> Tensor:
    if norm == "linf":
        return d.abs().amax(dim=_rdims(d))
    return d.pow(2).sum(dim=_rdims(d)).sqrt()


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
    """Device-side state of one attack run; no host syncs."""

    def __init__(self, model, x, y, target, loss_name, norm, steps, record, record_inputs):
        self.x, self.y, self.target, self.norm = x, y, target, norm
        self.loss_fn = _LOSS_FNS[loss_name]
        n = x.shape[0]
        dev = x.device
        self.flip = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.best_x = None
        self.record = record
        if record:
            w = model.head.weight.detach()
            w = w.to(torch.promote_types(w.dtype, torch.float32))  # never record curvature in bf16
            self.weight, self.distances = w, class_distances(w)
            names = ("loss", "p_y", "p_top", "margin", "phi_sq", "gini", "kappa_sq", "kappa_unsq",
                     "kappa_neuron", "delta_norm")
            self.buf = {k: torch.empty(steps + 1, n, device=dev, dtype=w.dtype) for k in names}
            self.buf["pred"] = torch.empty(steps + 1, n, dtype=torch.long, device=dev)
            self.xs = torch.empty((steps + 1,) + tuple(x.shape), device=dev, dtype=x.dtype) if record_inputs else None

    def success_of(self, pred: Tensor) -> Tensor:
        return pred == self.target if self.target is not None else pred != self.y

    def init_best(self, x0: Tensor, loss: Tensor, pred: Tensor) -> None:
        self.best_x = x0.detach().clone()
        self.best_loss = loss.detach().clone()
        self.best_succ = self.success_of(pred)

    def step(self, t: int, x_t: Tensor, phi: Tensor, logits: Tensor, loss: Tensor) -> Tensor:
        """Book iterate ``t``; returns its success mask."""
        logits, loss = logits.detach(), loss.detach()
        pred = logits.argmax(dim=1)
        succ = self.success_of(pred)
        self.flip = torch.where((self.flip < 0) & succ, torch.full_like(self.flip, t), self.flip)
        # a successful iterate beats an unsuccessful one; then the higher loss wins
        better = (succ & ~self.best_succ) | ((succ == self.best_succ) & (loss > self.best_loss))
        self.best_x = torch.where(_view(better, x_t), x_t.detach(), self.best_x)
        self.best_loss = torch.where(better, loss, self.best_loss)
        self.best_succ = self.best_succ | succ
        if self.record:
            phi, logits = phi.detach().to(self.weight.dtype), logits.to(self.weight.dtype)
            probs = torch.softmax(logits, dim=1)
            terms = closed_form(phi, logits, self.weight, self.distances)
            b = self.buf
            b["loss"][t] = loss
            b["p_y"][t] = probs.gather(1, self.y[:, None])[:, 0]
            b["p_top"][t] = probs.amax(dim=1)
            b["pred"][t] = pred
            b["margin"][t] = true_margin(logits, self.y)
            b["phi_sq"][t] = terms.phi_sq
            b["gini"][t] = terms.gini
            b["kappa_sq"][t] = terms.kappa_sq
            b["kappa_unsq"][t] = terms.kappa_unsq
            b["kappa_neuron"][t] = terms.kappa_neuron
            b["delta_norm"][t] = _norm(x_t.detach() - self.x, self.norm)
            if self.xs is not None:
                self.xs[t] = x_t.detach()
        return succ

    def trajectory(self, steps_run: int) -> Trajectory | None:
        if not self.record:
            return None
        traj = Trajectory(**self.buf, flip_step=self.flip.clone(), x=self.xs)
        return traj.truncate(steps_run)


def _loss_and_grad(model, x_t, y, target, loss_fn, autocast_dtype):
    x_t = x_t.detach().requires_grad_(True)
    with torch.enable_grad():
        phi, logits = _forward(model, x_t, autocast_dtype)
        loss = loss_fn(_at_least_fp32(logits), y, target)
        # sum, not mean: per-example gradients are not scaled by 1/N (no extra underflow)
        grad = torch.autograd.grad(loss.sum(), x_t)[0]
    return phi, logits, loss, grad


def _zero_grad_mask(grad: Tensor) -> Tensor:
    return grad.abs().amax(dim=_rdims(grad)) == 0


def _warn_zero_grad(zero: Tensor, loss: str) -> None:
    n = int(zero.sum())  # the single end-of-attack sync
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
        return phi, logits, loss_fn(logits, y, target)


# ---------------------------------------------------------------------------
# PGD and FGSM
# ---------------------------------------------------------------------------


def _pgd_run(model, x, y, target, eps, steps, step_size, norm, loss, random_start, clip, generator,
             early_stop, check_every, record, record_inputs, autocast_dtype, clean):
    """One PGD run.  ``clean`` is ``None`` without a random start: iterate 0 is then
    the clean input and its forward pass doubles as the clean evaluation."""
    tr = _Tracker(model, x, y, target, loss, norm, steps, record, record_inputs)
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
            lval = loss_fn(_at_least_fp32(logits), y, target)
        tr.step(steps, x_t, phi, logits, lval)
    return tr, x_t, lval.detach(), zero, steps_run, clean_correct


def _validate_steps(steps, step_size):
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if step_size is not None and (not math.isfinite(step_size) or step_size <= 0):
        raise ValueError(f"step_size must be > 0, got {step_size!r}")


def _combine(results, x, clean_correct, steps_run, record):
    """Merge runs (restarts) with the same success-then-loss rule as within a run."""
    tr0, x_last, lf, zero = results[0][:4]
    bx, bl, bs = tr0.best_x, tr0.best_loss, tr0.best_succ
    for tr, x_last, lf in (r[:3] for r in results[1:]):
        better = (tr.best_succ & ~bs) | ((tr.best_succ == bs) & (tr.best_loss > bl))
        bx = torch.where(_view(better, x), tr.best_x, bx)
        bl = torch.where(better, tr.best_loss, bl)
        bs = bs | tr.best_succ
    return AttackResult(
        x_adv=bx, x_last=x_last, success=bs, clean_correct=clean_correct, loss_final=lf, loss_best=bl,
        flip_step=tr0.flip, zero_grad=zero, steps_run=steps_run,
        trajectory=tr0.trajectory(results[0][4]) if record else None,
    )


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    norm: str = "linf",
    loss: str = "ce",
    random_start: bool = False,
    restarts: int = 1,
    target: Tensor | None = None,
    early_stop: bool = False,
    check_every: int = 5,
    record: bool = False,
    record_inputs: bool = False,
    clip: tuple[float, float] | None = (0.0, 1.0),
    autocast_dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
    warn: bool = True,
) -> AttackResult:
    """Projected gradient descent (Madry et al. 2018), ℓ∞ (sign steps) or ℓ2 (normalised steps).

    The ℓ∞ update is torchattacks' exactly: ``x += step_size * sign(grad)``,
    ``delta = clamp(x - x0, -eps, eps)``, ``x = clamp(x0 + delta, 0, 1)``.
    ``step_size`` defaults to ``2.5 * eps / steps``.  No random start by default
    (the Uncanny Valley setting for trajectories); use ``random_start=True`` and
    ``restarts`` for robustness numbers.  ``target`` (N,) makes it targeted.
    ``record=True`` fills ``result.trajectory`` (needs ``restarts == 1``);
    ``early_stop`` stops once every example succeeded, checked every
    ``check_every`` steps.  ``clip=None`` lifts the [0, 1] box and its input check.
    """
    check_contract(model)
    _check_common(x, y, eps, norm, loss, LOSSES, clip, target)
    _validate_steps(steps, step_size)
    if not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts must be an integer >= 1, got {restarts!r}")
    if restarts > 1 and not random_start:
        raise ValueError("restarts > 1 repeats the same deterministic attack; set random_start=True")
    if record and restarts > 1:
        raise ValueError("record=True records one run; use restarts=1")
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every!r}")
    if step_size is None:
        step_size = 2.5 * eps / steps if eps > 0 else 1.0
    x = x.detach()
    with _eval_mode(model):
        clean = _clean_eval(model, x, y, target, _LOSS_FNS[loss], autocast_dtype) if random_start else None
        results = [
            _pgd_run(model, x, y, target, eps, steps, step_size, norm, loss, random_start, clip, generator,
                     early_stop, check_every, record, record_inputs, autocast_dtype, clean)
            for _ in range(restarts)
        ]
    clean_correct = clean[1].argmax(dim=1) == y if random_start else results[0][5]
    res = _combine(results, x, clean_correct, results[-1][4], record)
    if warn:
        _warn_zero_grad(res.zero_grad, loss)
    return res


def fgsm(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: str = "linf",
    loss: str = "ce",
    target: Tensor | None = None,
    record: bool = False,
    record_inputs: bool = False,
    clip: tuple[float, float] | None = (0.0, 1.0),
    autocast_dtype: torch.dtype | None = None,
    warn: bool = True,
) -> AttackResult:
    """Fast gradient sign method (Goodfellow et al. 2015): one step of size ``eps``.

    ``result.x_last`` is the stepped point; ``result.x_adv`` the better of it and
    the clean input (same rule as PGD).  ``norm="l2"`` is the fast gradient method.
    """
    return pgd(model, x, y, eps, steps=1, step_size=eps if eps > 0 else 1.0, norm=norm, loss=loss,
               target=target, record=record, record_inputs=record_inputs, clip=clip,
               autocast_dtype=autocast_dtype, warn=warn)


# ---------------------------------------------------------------------------
# APGD (Croce & Hein 2020)
# ---------------------------------------------------------------------------


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


def _apgd_run(model, x, y, target, eps, steps, norm, loss, rho, clip, generator, record, record_inputs,
              autocast_dtype, clean):
    tr = _Tracker(model, x, y, target, loss, norm, steps, record, record_inputs)
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
    record: bool = False,
    record_inputs: bool = False,
    clip: tuple[float, float] | None = (0.0, 1.0),
    autocast_dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
    warn: bool = True,
) -> AttackResult:
    """Auto-PGD (Croce & Hein 2020): step size ``2 eps`` halved at checkpoints, momentum 0.75.

    At each checkpoint (:func:`apgd_checkpoints`) an example's step size halves
    and it restarts from its best point if fewer than ``rho`` of the steps since
    the last checkpoint increased the loss, or if its step size was not halved
    last time and its best loss did not improve.  Random start on the ball's
    sphere; ``steps=100`` as in the reference (torchattacks' AutoAttack uses 10,
    PAPER §6.8).  Losses ``"ce"`` and ``"dlr"``; ``target`` gives APGD-CE-T /
    APGD-T (targeted DLR, k >= 4).  Deviation: the oscillation count of the
    first period compares with the starting loss, where the reference code reads
    an uninitialised 0.  ``record`` / ``record_inputs`` as in :func:`pgd`.
    """
    check_contract(model)
    _check_common(x, y, eps, norm, loss, APGD_LOSSES, clip, target)
    _validate_steps(steps, None)
    if not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts must be an integer >= 1, got {restarts!r}")
    if record and restarts > 1:
        raise ValueError("record=True records one run; use restarts=1")
    if not 0 < rho <= 1:
        raise ValueError(f"rho must be in (0, 1], got {rho!r}")
    x = x.detach()
    with _eval_mode(model):
        clean = _clean_eval(model, x, y, target, _LOSS_FNS[loss], autocast_dtype)
        clean_correct = clean[1].argmax(dim=1) == y
        results = [
            _apgd_run(model, x, y, target, eps, steps, norm, loss, rho, clip, generator, record, record_inputs,
                      autocast_dtype, clean)
            for _ in range(restarts)
        ]
    res = _combine(results, x, clean_correct, steps, record)
    if warn:
        _warn_zero_grad(res.zero_grad, f"APGD-{loss}")
    return res


# ---------------------------------------------------------------------------
# Transfer
# ---------------------------------------------------------------------------


def transfer(
    x_adv: Tensor | AttackResult,
    y: Tensor,
    model_b: nn.Module,
    target: Tensor | None = None,
    batch_size: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> TransferResult:
    """Evaluate inputs crafted on model A (a tensor or an :class:`AttackResult`) on ``model_b``.

    ``success``: ``model_b`` misclassifies (or predicts ``target``).  E4 of the
    paper: examples crafted at scale 1 transfer to every temperature-scaled copy.
    """
    if isinstance(x_adv, AttackResult):
        x_adv = x_adv.x_adv
    check_contract(model_b)
    if y.dim() != 1 or x_adv.shape[0] != y.shape[0]:
        raise ValueError(f"x_adv must be (N, ...) and y (N,), got {tuple(x_adv.shape)} and {tuple(y.shape)}")
    bs = batch_size or x_adv.shape[0]
    preds, losses, margins = [], [], []
    with _eval_mode(model_b), torch.no_grad():
        for i in range(0, x_adv.shape[0], bs):
            _, logits = _forward(model_b, x_adv[i: i + bs], autocast_dtype)
            logits = _at_least_fp32(logits)
            yb = y[i: i + bs]
            preds.append(logits.argmax(dim=1))
            losses.append(F.cross_entropy(logits, yb, reduction="none"))
            margins.append(true_margin(logits, yb))
    pred = torch.cat(preds)
    success = pred == target if target is not None else pred != y
    return TransferResult(pred=pred, success=success, loss_ce=torch.cat(losses), margin=torch.cat(margins))
