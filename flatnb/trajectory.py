"""Attack trajectories: what is recorded per iterate, the recorder, and statistics over paths.

The recorded quantities are listed once, in :data:`FIELDS`: the attack's own
(:data:`ATTACK_FIELDS`) followed by every per-sample term of
:class:`flatnb.curvature.FlatnessTerms` (:data:`CURVATURE_FIELDS`).  Buffers, truncation,
concatenation and the figure labels (:mod:`flatnb.figures`) all iterate over that list.

A :class:`Recorder` is an ``on_iterate`` hook of the attacks in :mod:`flatnb.attacks`:
``recorder(t, x_t, phi, logits, loss)`` is called once per iterate with that iterate's own
forward pass, and the closed-form curvature terms (Walter et al. 2026, §3; Petzka et al. 2021)
are computed from it, so recording costs no extra forward pass.  ``record=True`` on an attack
builds one.

Statistics (the "uncanny valley" of Walter et al. 2026, §5-6): :func:`align_at_flip`,
:func:`step_summary`, :func:`valley_stats`, :func:`valley_medians`, :func:`basin_width`.
Trajectories are (T+1, N) tensors, row 0 the starting point; ``flip_step`` is the first
iterate whose prediction is wrong (0: misclassified when clean, -1: never).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from flatnb.attacks.losses import true_margin
from flatnb.curvature.last_layer import FlatnessTerms, class_distances, closed_form

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
    Walter et al. 2026, §6.7) with no host sync; :meth:`trajectory` checks once that every
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
