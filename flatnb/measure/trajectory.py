"""Attack trajectories: what is recorded per iterate, the recorder, and statistics over paths.

The recorded quantities are listed once, in :data:`FIELDS`: the attack's own
(:data:`ATTACK_FIELDS`) followed by every per-sample term of
:class:`flatnb.curvature.FlatnessTerms` (:data:`CURVATURE_FIELDS`).  Buffers, truncation,
concatenation and the figure labels (:mod:`flatnb.book.figures`) all iterate over that list.

A :class:`Recorder` is an ``on_iterate`` hook of the attacks in :mod:`flatnb.attacks`:
``recorder(t, x_t, phi, logits, loss)`` is called once per iterate with that iterate's own
forward pass, and the closed-form curvature terms (Walter et al. 2026; Petzka et al. 2021)
are computed from it, so recording costs no extra forward pass.  ``record=Recorder`` on an attack
builds one per run (``attacks.pgd(model, x, y, eps, record=Recorder)``).

Statistics over paths: :func:`align_at_flip`, :func:`step_summary`, :func:`range_ratio`, :func:`basin_width`;
:func:`boundary_crossing` locates where each path crosses the decision boundary. The uncanny valley's
shape (experiment E6 of Walter et al. 2026) is measured on paths refined at their boundary crossing, in
:mod:`flatnb.measure.crossing`.
Trajectories are (T+1, N) tensors, row 0 the starting point; ``flip_step`` is the first
iterate whose prediction is wrong (0: misclassified when clean, -1: never).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn

from flatnb.attacks.losses import true_margin
from flatnb.curvature import require_eval
from flatnb.curvature.last_layer import FlatnessTerms, class_distances, closed_form
from flatnb.models import check_contract

Tensor = torch.Tensor

#: quantities the attack itself defines per iterate (``pred`` is an int64 row, the rest float)
ATTACK_FIELDS = ("loss", "p_y", "p_top", "pred", "margin", "delta_norm")
#: the per-sample closed-form curvature terms (``weight_sq`` is a per-model scalar, not recorded)
CURVATURE_FIELDS = tuple(f for f in FlatnessTerms._fields if f != "weight_sq")
#: every recorded quantity, in order
FIELDS = ATTACK_FIELDS + CURVATURE_FIELDS


class Trajectory:
    """Per-iterate, per-example quantities, each (T+1, N) on the attack's device, one attribute per
    name in :data:`FIELDS`, plus ``flip_step`` (N,) and ``x`` (iterates (T+1, N, ...) with
    ``record_inputs=True``, else ``None``).

    Row ``t`` belongs to iterate ``x_t`` (row 0: the starting point).  ``margin`` is
    ``z_y - max_{j != y} z_j`` for the true label (positive: correctly classified);
    ``kappa_sq = ||w||_F^2 Tr H``, ``kappa_unsq = ||w||_F Tr H``, ``kappa_neuron`` the neuron-wise
    value, ``trace_h = gini * phi_sq`` (see :func:`flatnb.curvature.closed_form`);
    ``delta_norm = ||x_t - x||`` in the attack's norm.
    """

    def __init__(self, flip_step: Tensor, x: Tensor | None = None, **values: Tensor):
        missing, extra = set(FIELDS) - set(values), set(values) - set(FIELDS)
        if missing or extra:
            raise ValueError(f"a Trajectory needs exactly the fields {FIELDS}; missing {sorted(missing)}, "
                             f"unknown {sorted(extra)}")
        for f in FIELDS:
            setattr(self, f, values[f])
        self.flip_step, self.x = flip_step, x

    def values(self) -> dict[str, Tensor]:
        """The recorded (T+1, N) rows by name, in :data:`FIELDS` order."""
        return {f: getattr(self, f) for f in FIELDS}

    @property
    def steps(self) -> int:
        """T: the number of attack steps recorded (rows minus one)."""
        return int(self.loss.shape[0]) - 1

    def truncate(self, steps: int) -> "Trajectory":
        """The first ``steps + 1`` rows (used after an early stop)."""
        return Trajectory(self.flip_step, None if self.x is None else self.x[: steps + 1],
                          **{f: v[: steps + 1] for f, v in self.values().items()})

    @classmethod
    def cat(cls, trajs: list["Trajectory"]) -> "Trajectory":
        """Join trajectories of consecutive batches along the example axis."""
        if not trajs:
            raise ValueError("Trajectory.cat needs at least one trajectory")
        xs = [t.x for t in trajs]
        return cls(torch.cat([t.flip_step for t in trajs]),
                   None if any(x is None for x in xs) else torch.cat(xs, dim=1),
                   **{f: torch.cat([getattr(t, f) for t in trajs], dim=1) for f in FIELDS})


def _norm(d: Tensor, norm: str) -> Tensor:
    dims = tuple(range(1, d.dim()))
    return d.abs().amax(dim=dims) if norm == "linf" else d.pow(2).sum(dim=dims).sqrt()


class Recorder:
    """An ``on_iterate(t, x_t, phi, logits, loss)`` hook that fills a :class:`Trajectory`.

    ``x`` (N, ...) the clean inputs, ``y`` (N,) the true labels, ``norm`` the attack's norm
    (for ``delta_norm``), ``steps`` the most iterates to expect (rows ``0 .. steps``).
    Everything is computed on the device in at least float32 (curvature is never taken in bf16,
    Walter et al. 2026) with no host sync; :meth:`trajectory` checks once that every
    recorded value is finite and raises ``ValueError`` naming the rows otherwise.
    """

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, norm: str, steps: int, record_inputs: bool = False):
        w = model.head.weight.detach()
        self.weight = w.to(torch.promote_types(w.dtype, torch.float32))
        self.distances = class_distances(self.weight)
        self.x, self.y, self.norm = x.detach(), y, norm
        n, dev = x.shape[0], x.device
        self.buf = {f: torch.empty(steps + 1, n, device=dev, dtype=torch.long if f == "pred" else self.weight.dtype)
                    for f in FIELDS}
        self.xs = torch.empty((steps + 1,) + tuple(x.shape), device=dev, dtype=x.dtype) if record_inputs else None
        self.bad = torch.zeros(n, dtype=torch.bool, device=dev)
        self.rows = 0

    def __call__(self, t: int, x_t: Tensor, phi: Tensor, logits: Tensor, loss: Tensor) -> None:
        dt = self.weight.dtype
        phi, logits = phi.detach().to(dt), logits.detach().to(dt)
        probs = torch.softmax(logits, dim=1)
        terms = closed_form(phi, logits, self.weight, self.distances, check=False)
        pred = logits.argmax(dim=1)
        row = {
            "loss": loss.detach().to(dt),
            "p_y": probs.gather(1, self.y[:, None])[:, 0],
            "p_top": probs.amax(dim=1),
            "pred": pred,
            "margin": true_margin(logits, self.y),
            "delta_norm": _norm(x_t.detach().to(dt) - self.x.to(dt), self.norm),
            **{f: getattr(terms, f) for f in CURVATURE_FIELDS},
        }
        for f in FIELDS:
            self.buf[f][t] = row[f]
            if f != "pred":
                self.bad |= ~torch.isfinite(row[f])
        if self.xs is not None:
            self.xs[t] = x_t.detach()
        self.rows = max(self.rows, t + 1)

    def trajectory(self, flip_step: Tensor, steps_run: int | None = None) -> Trajectory:
        """The recorded rows ``0 .. steps_run`` (default: every row written) as a :class:`Trajectory`.

        Raises ``ValueError`` if any recorded value is NaN or infinite (one host sync)."""
        rows = torch.nonzero(self.bad)[:, 0]
        if rows.numel():
            shown = rows[:10].tolist()
            raise ValueError(
                f"the recorded trajectory has NaN or inf values for {rows.numel()} example(s), rows {shown}"
                f"{' ...' if rows.numel() > 10 else ''}; check those inputs, the model's weights, and whether the "
                "logits overflow (a large head scale in float32: use float64)")
        steps = self.rows - 1 if steps_run is None else steps_run
        return Trajectory(flip_step.clone(), None if self.xs is None else self.xs[: steps + 1],
                          **{f: v[: steps + 1] for f, v in self.buf.items()})


# ----------------------------------------------------------------------------- statistics over paths


def field_values(traj, name: str) -> Tensor:
    """The (T+1, N) rows of one recorded quantity of :data:`FIELDS` (a ``ValueError`` names the others)."""
    if name not in FIELDS:
        raise ValueError(f"unknown trajectory quantity {name!r}; choose one of {FIELDS}")
    return getattr(traj, name)


def align_at_flip(values: Tensor, flip_step: Tensor, before: int, after: int) -> tuple[np.ndarray, Tensor]:
    """Re-index (T+1, N) per-step values at each example's flip step.

    Returns ``offsets`` (``-before .. after``) and a (before+after+1, N') float
    tensor whose row ``j`` holds the value at step ``flip_step + offsets[j]``
    (NaN where that step lies outside ``0 .. T``).  Only examples that start
    correctly classified and flip during the attack (``flip_step >= 1``) are
    kept: the others have no flip to align at.
    """
    if values.dim() != 2 or flip_step.dim() != 1 or values.shape[1] != flip_step.shape[0]:
        raise ValueError(f"values must be (T+1, N) and flip_step (N,), got {tuple(values.shape)}, {tuple(flip_step.shape)}")
    if before < 0 or after < 0:
        raise ValueError(f"before and after must be >= 0, got {before}, {after}")
    keep = flip_step >= 1
    v = values[:, keep].to(torch.float64)
    f = flip_step[keep].to(values.device)
    offsets = np.arange(-before, after + 1)
    idx = f[None, :] + torch.as_tensor(offsets, device=values.device)[:, None]
    valid = (idx >= 0) & (idx < values.shape[0])
    got = v.gather(0, idx.clamp(0, values.shape[0] - 1))
    return offsets, torch.where(valid, got, torch.full_like(got, float("nan")))


def step_summary(values: Tensor, quantiles=(0.25, 0.5, 0.75)) -> dict[float, np.ndarray]:
    """Per-row quantiles of a (L, N) tensor, ignoring NaNs (rows with no value give NaN)."""
    v = values.detach().to(torch.float64).cpu()
    q = torch.tensor(list(quantiles), dtype=torch.float64)
    out = torch.full((len(quantiles), v.shape[0]), float("nan"), dtype=torch.float64)
    for i in range(v.shape[0]):
        row = v[i][~torch.isnan(v[i])]
        if row.numel():
            out[:, i] = torch.quantile(row, q)
    return {float(qq): out[j].numpy() for j, qq in enumerate(quantiles)}


def range_ratio(values: torch.Tensor) -> float:
    """The median over examples (columns) of ``max / min`` along the path (rows): how far a positive
    per-step quantity (``‖φ‖²``, ``1 − ‖p‖²``) moves along an attack. Clamp zeros away first."""
    v = values.double()
    if v.ndim != 2 or v.shape[1] == 0:
        raise ValueError(f"range_ratio needs a (steps, examples) tensor with examples, got shape {tuple(v.shape)}")
    if bool((v <= 0).any()):
        raise ValueError("range_ratio needs positive values (clamp zeros, e.g. .clamp_min(1e-300))")
    return float((v.max(0).values / v.min(0).values).median())


def basin_width(loss: Tensor, rise: float | None = None, fraction: float | None = None) -> Tensor:
    """Attack iterations before the loss "takes off", per example, from (T+1, N) losses (row 0 clean).

    Exactly one criterion:

    * ``rise``: the first iterate ``t >= 1`` with ``loss[t] - loss[0] > rise`` (an absolute
      threshold, e.g. ``0.1 * log k``; with ``rise = ε`` this is the first loss-change
      adversarial example of the paper's Definition 4 along the path);
    * ``fraction``: the first iterate with ``loss[t] - loss[0] >= fraction * R``, where
      ``R = max_t (loss[t] - loss[0]) > 0`` is the largest rise along the path (scale-free:
      the step by which the loss has covered that fraction of its rise).

    Returns float64 (N,) iterate indices; ``inf`` where the criterion is never met within
    the T steps (for ``fraction``: where the loss never rises above its clean value), so a
    median of ``inf`` reads "wider than the attack is long".  With a fixed step size the
    width times the step is the distance travelled before take-off.
    """
    if not isinstance(loss, Tensor) or loss.dim() != 2 or loss.shape[0] < 2:
        raise ValueError(f"loss must be a (T+1, N) tensor with T >= 1 attack steps, got "
                         f"{tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__}")
    if (rise is None) == (fraction is None):
        raise ValueError("give exactly one of rise= (absolute loss increase) or fraction= (share of the largest rise)")
    v = loss.detach().to(torch.float64)
    if not bool(torch.isfinite(v).all()):
        raise ValueError("loss has NaN or inf entries; basin width is undefined there")
    up = v[1:] - v[:1]  # rise over the clean loss at iterates 1..T
    if rise is not None:
        if not math.isfinite(rise) or rise < 0:
            raise ValueError(f"rise must be a finite number >= 0, got {rise!r}")
        hit = up > rise
    else:
        if not (0 < fraction <= 1):
            raise ValueError(f"fraction must lie in (0, 1], got {fraction!r}")
        top = up.max(dim=0).values
        hit = (up >= fraction * top) & (top > 0)
    steps = torch.arange(1, v.shape[0], dtype=torch.float64, device=v.device)[:, None].expand_as(up)
    first = torch.where(hit, steps, torch.full_like(steps, math.inf)).min(dim=0).values
    return first


def flipping_columns(traj) -> Tensor:
    """Indices of the examples that start correct and flip during the attack (``flip_step >= 1``)."""
    return torch.nonzero(traj.flip_step >= 1)[:, 0]


# ----------------------------------------------------------------------------- the boundary crossing


class Crossing(NamedTuple):
    """Where each flipping path crosses the decision boundary (see :func:`boundary_crossing`).

    ``columns`` (M,): the examples (trajectory columns) with a flip; ``s`` (M,): position on the
    segment from the last correct iterate ``x_{f-1}`` (s = 0) to the first wrong one ``x_f`` (s = 1);
    ``step`` (M,): ``f - 1 + s``, the crossing in attack-step units; ``x`` (M, ...): the crossing
    point; ``margin`` (M,): the true-label margin there (about 0); ``terms``: the closed-form
    curvature terms there (:class:`flatnb.curvature.FlatnessTerms`, each (M,)).
    """

    columns: Tensor
    s: Tensor
    step: Tensor
    x: Tensor
    margin: Tensor
    terms: FlatnessTerms


def boundary_crossing(model: nn.Module, traj: Trajectory, y: Tensor, iters: int = 40) -> Crossing:
    """Locate each flipping path's boundary crossing by bisection on the logit margin.

    For every example that starts correct and flips (``flip_step = f >= 1``), the straight segment
    between the last correct iterate ``x_{f-1}`` (margin ``z_y - max_{j != y} z_j > 0``) and the
    first wrong one ``x_f`` (margin <= 0) is bisected ``iters`` times, keeping a correct left end and
    a wrong right end, so the crossing is bracketed to ``2**-iters`` of the segment; κ and the other
    closed-form terms are evaluated at the bracket's midpoint (Walter et al. 2026, E6: where the
    valley's peak is claimed to sit).  Needs the iterates (``record_inputs=True``) and the true labels
    ``y``.  One forward pass of the M flipping examples per bisection step; the model runs in eval
    mode, without gradients, in its own dtype (curvature in at least float32).
    """
    check_contract(model)
    require_eval(model)
    if traj.x is None:
        raise ValueError("boundary_crossing needs the iterates: attack with record=Recorder, record_inputs=True")
    if y.shape != traj.flip_step.shape:
        raise ValueError(f"y must be (N,) = {tuple(traj.flip_step.shape)}, got {tuple(y.shape)}")
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be an integer >= 1, got {iters!r}")
    y = y.to(traj.flip_step.device)
    cols = torch.nonzero(traj.flip_step >= 1)[:, 0]
    f = traj.flip_step[cols]
    # only untargeted flips bracket the boundary of y: correct before, wrong after
    ok = (traj.pred[f - 1, cols] == y[cols]) & (traj.pred[f, cols] != y[cols])
    cols, f = cols[ok], f[ok]
    a, b = traj.x[f - 1, cols], traj.x[f, cols]
    yc = y[cols].to(a.device)
    p0 = next(model.parameters())
    lo = torch.zeros(cols.numel(), dtype=torch.float64, device=a.device)
    hi = torch.ones_like(lo)

    def at(s):
        pts = (a + (b - a) * s.to(a.dtype).view(-1, *[1] * (a.dim() - 1))).to(p0.dtype)
        phi = model.features(pts)
        logits = model.head(phi)
        return pts, phi, logits, true_margin(logits.to(torch.promote_types(logits.dtype, torch.float32)), yc)

    with torch.no_grad():
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            correct = at(mid)[3] > 0
            lo = torch.where(correct, mid, lo)
            hi = torch.where(correct, hi, mid)
        s = 0.5 * (lo + hi)
        pts, phi, logits, margin = at(s)
        w = model.head.weight.detach()
        dt = torch.promote_types(w.dtype, torch.float32)
        terms = closed_form(phi.to(dt), logits.to(dt), w.to(dt)) if cols.numel() else None
    if terms is None:
        empty = torch.zeros(0, dtype=torch.float64, device=a.device)
        terms = FlatnessTerms(*(empty,) * len(FlatnessTerms._fields))
    return Crossing(columns=cols, s=s, step=(f - 1).to(s.dtype) + s, x=pts, margin=margin, terms=terms)
