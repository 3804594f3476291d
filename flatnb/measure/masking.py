"""Gradient masking by temperature (chapter 7; Walter et al. 2026, §5, E3 and E4), per model and pooled.

:func:`masking_run` attacks the temperature-scaled copies ``f_s`` (``models.scale_head``: weight and bias scaled)
of one model with CE-PGD, transfers the ``s = 1`` adversarial examples to every ``f_s`` and to the weight-only
copies ``g_s`` (bias unchanged), and runs the controls at the largest scale on the first ``n_ctrl`` images. A
:class:`MaskingRun` keeps only per-image masks, so several models pool by concatenation
(:meth:`MaskingRun.pool`), and every fraction is read the same way from one model or from all.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from flatnb.stats import EmptySelection, Fraction

Tensor = torch.Tensor

#: the controls at the largest scale, in the order the chapter shows them
CONTROLS = ("CE-PGD float32 (the paper's)", "CW-margin PGD", "CE-PGD, random start", "CE-PGD float64", "APGD-DLR")


@dataclass
class MaskingRun:
    """Per-image results (CPU tensors, images along dim 0) of :func:`masking_run`.

    ``scales``; ``correct`` (N,) clean-correct; per scale ``s``: ``robust[s]`` (correct and not broken by CE-PGD),
    ``zero[s]`` (input gradient exactly zero at the first step), ``kappa[s]`` (squared κ at the clean input,
    float64), ``to_f[s]``/``to_g[s]`` (the ``s = 1`` adversarial example fools ``f_s``/``g_s``), ``agree_g[s]``
    (``g_s`` makes ``f_1``'s clean decision); ``broken1`` (correct when clean and broken by CE-PGD at ``s = 1``); the controls on the first ``n_ctrl`` images: ``ctrl_robust[name]``, ``ctrl_zero[name]`` for
    each name of :data:`CONTROLS`, ``ctrl_correct``, and ``cw_same`` (CW-margin PGD breaks the same images on
    ``f_smax`` and on ``f_1``)."""

    scales: tuple
    correct: Tensor
    robust: dict
    zero: dict
    kappa: dict
    to_f: dict
    to_g: dict
    agree_g: dict
    broken1: Tensor
    ctrl_correct: Tensor
    ctrl_robust: dict
    ctrl_zero: dict
    cw_same: Tensor

    @property
    def n(self) -> int:
        return int(self.correct.numel())

    def rob(self, s) -> Fraction:
        """CE-PGD robust accuracy of ``f_s`` over all images."""
        return Fraction.of(self.robust[s])

    def not_broken(self, s) -> Fraction:
        """Among the clean-correct images, the share CE-PGD fails to break at ``s`` (E3's graded share)."""
        return Fraction.of(self.robust[s][self.correct])

    def transfer(self, s, weight_only: bool = False) -> Fraction:
        """Among the images CE-PGD breaks at ``s = 1``, the share whose adversarial example fools ``f_s``
        (``weight_only``: ``g_s``)."""
        return Fraction.of((self.to_g if weight_only else self.to_f)[s][self.broken1])

    def control(self, name) -> Fraction:
        """A control's robust accuracy at the largest scale, over the control images."""
        return Fraction.of(self.ctrl_robust[name])

    @classmethod
    def pool(cls, runs) -> "MaskingRun":
        """Several models' runs (``{label: MaskingRun}`` or a list) as one, images concatenated in model order."""
        got = list(runs.values()) if isinstance(runs, dict) else list(runs)
        if not got:
            raise EmptySelection("MaskingRun.pool got no runs (no model in the list?)")
        if any(tuple(g.scales) != tuple(got[0].scales) for g in got):
            raise ValueError(f"the runs have different scales: {[g.scales for g in got]}")
        cat = lambda t: torch.cat(t)  # noqa: E731 - a local shorthand
        per_s = lambda name: {s: cat([getattr(g, name)[s] for g in got]) for s in got[0].scales}  # noqa: E731
        per_c = lambda name: {c: cat([getattr(g, name)[c] for g in got]) for c in CONTROLS}  # noqa: E731
        return cls(scales=tuple(got[0].scales), correct=cat([g.correct for g in got]), robust=per_s("robust"),
                   zero=per_s("zero"), kappa=per_s("kappa"), to_f=per_s("to_f"), to_g=per_s("to_g"),
                   agree_g=per_s("agree_g"), broken1=cat([g.broken1 for g in got]),
                   ctrl_correct=cat([g.ctrl_correct for g in got]), ctrl_robust=per_c("ctrl_robust"),
                   ctrl_zero=per_c("ctrl_zero"), cw_same=cat([g.cw_same for g in got]))


def weight_only(model, s: float):
    """``g_s``: the head's weight scaled by ``s``, its bias unchanged (``models.scale_head`` scales both)."""
    from flatnb import models

    g = models.scale_head(model, s)
    if g.head.bias is not None:
        with torch.no_grad():
            g.head.bias.copy_(model.head.bias)
    return g


def masking_run(model, dataset, scales, batch_size: int, device, attack: dict, n_ctrl: int, apgd_steps: int,
                seed: int = 0) -> MaskingRun:
    """Chapter 7's measurement on one model. ``attack``: keyword arguments of :func:`flatnb.attacks.pgd` (the
    paper's PGD-ℓ∞ 8/255 × 10, ``budgets.ATTACKS["pgd_linf_8"]``); ``scales`` must contain 1; the controls
    (:data:`CONTROLS`: CW-margin PGD, CE-PGD with a random start, CE-PGD in float64, APGD-DLR with ``apgd_steps``)
    run at the largest scale on the first ``n_ctrl`` images of ``dataset``."""
    from flatnb import attacks, data, models
    from flatnb.measure.trajectory import Recorder

    scales = tuple(scales)
    if 1.0 not in scales:
        raise ValueError(f"scales must contain 1 (the unscaled model the others are compared with), got {scales}")
    if not isinstance(n_ctrl, int) or n_ctrl < 1:
        raise ValueError(f"n_ctrl must be a positive number of images, got {n_ctrl!r}")
    pgd = dict(batch_size=batch_size, device=device, warn=False, **attack)
    f = {s: models.scale_head(model, s) for s in scales}
    ce = {s: attacks.attack_dataset(attacks.pgd, f[s], dataset, record=Recorder, **pgd) for s in scales}
    y = dataset.labels.to(device)
    x_clean = torch.cat([x for x, _ in data.batches(dataset, batch_size, device=device)])
    pred1 = attacks.transfer(x_clean, y, f[1.0], batch_size=batch_size).pred
    to_f, to_g, agree = {}, {}, {}
    for s in scales:
        g = weight_only(model, s)
        to_f[s] = attacks.transfer(ce[1.0].x_adv, y, f[s], batch_size=batch_size).success.cpu()
        to_g[s] = attacks.transfer(ce[1.0].x_adv, y, g, batch_size=batch_size).success.cpu()
        agree[s] = (attacks.transfer(x_clean, y, g, batch_size=batch_size).pred == pred1).cpu()
    m = f[max(scales)]
    if n_ctrl >= len(dataset):  # the controls run on every image: CE-PGD at the largest scale is already done
        ctrl, first = dataset, ce[max(scales)]
    else:
        ctrl = data.subset(dataset, n=n_ctrl, seed=seed)
        first = attacks.attack_dataset(attacks.pgd, m, ctrl, **pgd)
    runs = {CONTROLS[0]: first,
            CONTROLS[1]: attacks.attack_dataset(attacks.pgd, m, ctrl, loss="cw", **pgd),
            CONTROLS[2]: attacks.attack_dataset(attacks.pgd, m, ctrl, random_start=True, seed=seed, **pgd),
            CONTROLS[3]: attacks.attack_dataset(attacks.pgd, copy.deepcopy(m).double(), ctrl, dtype=torch.float64,
                                                **pgd),
            CONTROLS[4]: attacks.attack_dataset(attacks.apgd, m, ctrl, batch_size, device, eps=attack["eps"],
                                                norm=attack["norm"], loss="dlr", steps=apgd_steps, seed=seed,
                                                warn=False)}
    cw_f1 = attacks.attack_dataset(attacks.pgd, f[1.0], ctrl, loss="cw", **pgd).success.cpu()
    return MaskingRun(
        scales=scales, correct=ce[1.0].clean_correct.cpu(),
        robust={s: (r.clean_correct & ~r.success).cpu() for s, r in ce.items()},
        zero={s: r.zero_grad.cpu() for s, r in ce.items()},
        kappa={s: r.trajectory.kappa_sq[0].double().cpu() for s, r in ce.items()},
        to_f=to_f, to_g=to_g, agree_g=agree, broken1=(ce[1.0].success & ce[1.0].clean_correct).cpu(),
        ctrl_correct=first.clean_correct.cpu(),
        ctrl_robust={n: (r.clean_correct & ~r.success).cpu() for n, r in runs.items()},
        ctrl_zero={n: r.zero_grad.cpu() for n, r in runs.items()},
        cw_same=(runs[CONTROLS[1]].success.cpu() == cw_f1))
