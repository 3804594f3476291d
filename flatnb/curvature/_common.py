"""Private helpers shared by the curvature modules."""
from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def require_eval(model: torch.nn.Module) -> None:
    """BatchNorm / dropout in training mode couple samples or add noise: curvature needs eval mode."""
    for name, mod in model.named_modules():
        if mod.training and isinstance(mod, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.dropout._DropoutNd)):
            raise ValueError(
                f"module {name or type(mod).__name__} ({type(mod).__name__}) is in training mode; "
                "curvature and flatness are defined for the frozen network: call model.eval() first"
            )


class NonFiniteError(ValueError, FloatingPointError):
    """NaN or inf where a finite value is needed.  A ``ValueError`` (bad input); also a
    ``FloatingPointError`` so that code written against the earlier error keeps working."""


def _bad_rows(rows: Tensor) -> str:
    shown = rows[:10].tolist()
    return f"{rows.numel()} row(s) {shown}{' ...' if rows.numel() > 10 else ''}"


def _raise_nonfinite(what: str, rows: Tensor | None = None) -> None:
    where = "" if rows is None else f" in {_bad_rows(rows)}"
    raise NonFiniteError(
        f"{what} contain NaN or inf{where}, so flatness would be NaN; check those inputs (pixels in [0,1]), "
        "the weights (a NaN or inf parameter), or use dtype=torch.float64 for extreme weight scales"
    )


def _math_attention():
    """Force the math SDPA backend: flash / memory-efficient kernels have no double
    backward and no forward-mode AD (PyTorch issues #116350, #117629)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def _ce_mean(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits, targets)


def _ce_sum(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits, targets, reduction="sum")
