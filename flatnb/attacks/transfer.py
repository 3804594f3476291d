"""Transfer: inputs crafted on one model, evaluated on another (E4 of Walter et al. 2026)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from flatnb.attacks.core import (AttackResult, TransferResult, _at_least_fp32, _check_values, _eval_mode, _forward,
                                 _rows)
from flatnb.attacks.losses import true_margin
from flatnb.models import check_contract

Tensor = torch.Tensor


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
    Empty, NaN or infinite inputs, NaN/inf weights of ``model_b`` and overflowing logits raise
    ``ValueError`` (never a success rate computed from NaN).
    """
    if isinstance(x_adv, AttackResult):
        x_adv = x_adv.x_adv
    check_contract(model_b)
    if y.dim() != 1 or x_adv.shape[0] != y.shape[0]:
        raise ValueError(f"x_adv must be (N, ...) and y (N,), got {tuple(x_adv.shape)} and {tuple(y.shape)}")
    if x_adv.shape[0] == 0:
        raise ValueError("x_adv is empty (N = 0): there is nothing to evaluate")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    _check_values(model_b, x_adv, None)  # NaN/inf inputs or weights: ValueError naming rows / parameters
    bs = batch_size or x_adv.shape[0]
    preds, losses, margins, finite = [], [], [], []
    with _eval_mode(model_b), torch.no_grad():
        for i in range(0, x_adv.shape[0], bs):
            _, logits = _forward(model_b, x_adv[i: i + bs], autocast_dtype)
            logits = _at_least_fp32(logits)
            yb = y[i: i + bs]
            finite.append(torch.isfinite(logits).all(dim=1))
            preds.append(logits.argmax(dim=1))
            losses.append(F.cross_entropy(logits, yb, reduction="none"))
            margins.append(true_margin(logits, yb))
    bad = ~torch.cat(finite)
    if bool(bad.any()):  # the end-of-call sync
        raise ValueError(f"model_b's logits are NaN or inf in {_rows(bad)} although inputs and weights are finite: "
                         "they overflow; check the head's scale or evaluate in float64")
    pred = torch.cat(preds)
    success = pred == target if target is not None else pred != y
    return TransferResult(pred=pred, success=success, loss_ce=torch.cat(losses), margin=torch.cat(margins))
