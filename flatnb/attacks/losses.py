"""Attack losses, per example, to be maximised (Carlini & Wagner 2017; Croce & Hein 2020)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

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


LOSS_FNS = {"ce": ce_loss, "cw": cw_loss, "dlr": dlr_loss}
