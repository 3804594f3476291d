"""The head-scale sweep of chapter 6 (Walter et al. 2026, §5, E1 and E1b), per model and pooled over models.

:func:`scale_sweep` attacks every temperature-scaled copy ``f_s`` (``models.scale_head``) of one model with the
same weak attack and keeps, per image and scale, what the chapter's claims read: κ (squared and unsquared) at
the clean input, the loss along the path, the loss increase, the exactly-zero input gradients, and whether the
attack broke the image. A :class:`Sweep` holds only per-image tensors, so several models' sweeps pool by
concatenation (:meth:`Sweep.pool`) and every statistic (:meth:`Sweep.median_kappa`, :meth:`Sweep.paired_earlier`,
...) is computed the same way on one model and on the pooled images.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from flatnb.measure.trajectory import basin_width
from flatnb.stats import EmptySelection, Fraction, bootstrap_ci

Tensor = torch.Tensor


@dataclass
class Sweep:
    """Per-image results of a head-scale sweep (all CPU tensors, images along the last dimension).

    ``scales``: the head scales; ``correct``: (N,) bool, classified correctly when clean (the same at every
    scale: temperature keeps the decisions); per scale ``s``: ``kappa[s]``/``kappa_unsq[s]`` (N,) float64,
    squared and unsquared κ at the clean input; ``loss[s]`` (T+1, N) float64, the loss along the path;
    ``zero_grad[s]`` (N,) bool, the input gradient exactly zero at the first step; ``broken[s]`` (N,) bool,
    the attack's final point misclassified."""

    scales: tuple
    correct: Tensor
    kappa: dict
    kappa_unsq: dict
    loss: dict
    zero_grad: dict
    broken: dict

    @property
    def n(self) -> int:
        return int(self.correct.numel())

    def increase(self, s, correct_only: bool = False) -> Tensor:
        """The loss increase (last iterate minus clean) at scale ``s``, over all or the correct images."""
        inc = self.loss[s][-1] - self.loss[s][0]
        return inc[self.correct] if correct_only else inc

    def median_kappa(self) -> dict:
        """``{s: (median, lo, hi)}``: median squared κ at the clean inputs, bootstrap intervals."""
        return {s: bootstrap_ci(self.kappa[s]) for s in self.scales}

    def median_increase(self, correct_only: bool = False) -> dict:
        """``{s: (median, lo, hi)}``: median loss increase under the attack, bootstrap intervals."""
        return {s: bootstrap_ci(self.increase(s, correct_only)) for s in self.scales}

    def zero(self) -> dict:
        """``{s: Fraction}``: the share of images whose input gradient is exactly zero in float32."""
        return {s: Fraction.of(self.zero_grad[s]) for s in self.scales}

    def robust(self, s=1.0) -> Fraction:
        """Robust accuracy at scale ``s``: correct when clean and not broken, over all images."""
        return Fraction.of(self.correct & ~self.broken[s])

    def kept(self, s=1.0) -> Fraction:
        """Robust over clean: the share of correctly classified images the attack leaves correct at ``s``."""
        return Fraction.of(~self.broken[s][self.correct])

    def paired_earlier(self, soft=0.25, ref=1.0, fraction: float = 0.5) -> dict:
        """The paired test of "for s < 1 the loss rises earlier": per correct image whose loss rises at both
        scales, the first step at which it covers ``fraction`` of its own largest rise
        (:func:`flatnb.measure.trajectory.basin_width`), at ``soft`` and at ``ref``. Returns ``earlier``,
        ``later``, ``tied`` (counts), ``both`` (images compared) and ``share`` (earlier among the untied, a
        :class:`Fraction`)."""
        for s in (soft, ref):
            if s not in self.loss:
                raise ValueError(f"scale {s!r} is not in the sweep's scales {self.scales}")
        a = basin_width(self.loss[soft], fraction=fraction)
        b = basin_width(self.loss[ref], fraction=fraction)
        both = self.correct & torch.isfinite(a) & torch.isfinite(b)
        earlier, later = int((a < b)[both].sum()), int((a > b)[both].sum())
        return dict(earlier=earlier, later=later, tied=int(both.sum()) - earlier - later, both=int(both.sum()),
                    share=Fraction(earlier, earlier + later))

    @classmethod
    def pool(cls, sweeps) -> "Sweep":
        """Several models' sweeps (``{label: Sweep}`` or a list) as one, their images concatenated in model
        order; the sweeps must share their scales and path length."""
        got = list(sweeps.values()) if isinstance(sweeps, dict) else list(sweeps)
        if not got:
            raise EmptySelection("Sweep.pool got no sweeps (no model in the list?)")
        scales = got[0].scales
        if any(tuple(g.scales) != tuple(scales) for g in got):
            raise ValueError(f"the sweeps have different scales: {[g.scales for g in got]}")
        steps = {g.loss[scales[0]].shape[0] for g in got}
        if len(steps) != 1:
            raise ValueError(f"the sweeps' paths have different lengths {sorted(steps)}: use one attack")
        cat = lambda name, dim=0: {s: torch.cat([getattr(g, name)[s] for g in got], dim=dim)  # noqa: E731
                                   for s in scales}
        return cls(scales=tuple(scales), correct=torch.cat([g.correct for g in got]), kappa=cat("kappa"),
                   kappa_unsq=cat("kappa_unsq"), loss=cat("loss", 1), zero_grad=cat("zero_grad"),
                   broken=cat("broken"))


def scale_sweep(model, dataset, scales, batch_size: int, device, attack: dict) -> Sweep:
    """Attack ``models.scale_head(model, s)`` for every ``s`` in ``scales`` with ``attack`` (keyword arguments
    of :func:`flatnb.attacks.pgd`, e.g. ``budgets.ATTACKS["pgd_l2_e1"]``) over ``dataset``, recording the path.
    The zero-gradient warning is off: the sweep counts the zero gradients itself. Raises if a scaled copy
    changes a clean decision (temperature scaling must keep every one: a check of the code)."""
    from flatnb import attacks, models
    from flatnb.measure.trajectory import Recorder

    scales = tuple(scales)
    if not scales or any(not s > 0 for s in scales):
        raise ValueError(f"scales must be positive head scales, got {scales!r}")
    out = dict(kappa={}, kappa_unsq={}, loss={}, zero_grad={}, broken={})
    pred0 = correct = None
    for s in scales:
        r = attacks.attack_dataset(attacks.pgd, models.scale_head(model, s), dataset, batch_size, device,
                                   record=Recorder, warn=False, **attack)
        tr = r.trajectory
        if pred0 is None:
            pred0, correct = tr.pred[0].cpu(), r.clean_correct.cpu()
        elif not torch.equal(tr.pred[0].cpu(), pred0):
            raise RuntimeError(f"the head scaled by {s:g} changes a clean decision: scale_head must scale the "
                               "weight and the bias together (a temperature)")
        out["kappa"][s] = tr.kappa_sq[0].double().cpu()
        out["kappa_unsq"][s] = tr.kappa_unsq[0].double().cpu()
        out["loss"][s] = tr.loss.double().cpu()
        out["zero_grad"][s] = r.zero_grad.cpu()
        out["broken"][s] = r.success.cpu()
    return Sweep(scales=scales, correct=correct, **out)
