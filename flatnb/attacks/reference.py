"""The reference AutoAttack (Croce & Hein 2020) and Square attack (Andriushchenko et al. 2020).

Thin wrappers around fra31's code as packaged in ``pyautoattack`` (0.2.0): the evaluation a
referee expects for a positive robustness claim (issue 17 item 5; Croce & Hein 2020).  Both
return an :class:`~flatnb.attacks.AttackResult`, so ``robust_accuracy()``, :func:`cat_results` and
:func:`~flatnb.attacks.attack_dataset` work as for this package's attacks.  What the reference
does not report is filled conservatively: ``flip_step`` is 0 for a clean misclassification and
-1 otherwise (the step of the flip is unknown), ``zero_grad`` is False, ``steps_run`` 0,
``loss_final = loss_best`` the cross-entropy at ``x_adv``, ``attacked`` the clean-correct examples
(the reference skips the others).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from flatnb.attacks.core import (NORMS, AttackResult, _at_least_fp32, _check_values, _eval_mode, _finish)

Tensor = torch.Tensor

_REF_NORM = {"linf": "Linf", "l2": "L2"}
VERSIONS = ("standard", "plus", "rand")


def _import():
    try:
        import pyautoattack
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the reference attacks need the pyautoattack package: "
                          "python -m pip install pyautoattack==0.2.0") from e
    return pyautoattack


def _check(model, x, y, eps, norm):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module returning logits, got {type(model).__name__}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if not isinstance(eps, (int, float)) or not eps >= 0 or eps == float("inf"):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if y.dim() != 1 or x.dim() < 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x must be (N, ...) and y (N,) with the same N, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] == 0:
        raise ValueError("the batch is empty (N = 0): an attack needs at least one example")
    if x.dtype != torch.float32:
        raise ValueError(f"the reference attacks run in float32; got x of dtype {x.dtype}")
    _check_values(model, x, (0.0, 1.0))


def _result(model, x, y, x_adv) -> AttackResult:
    with torch.no_grad():
        clean = _at_least_fp32(model(x))
        adv = _at_least_fp32(model(x_adv))
    clean_correct = clean.argmax(dim=1) == y
    success = adv.argmax(dim=1) != y
    loss = F.cross_entropy(adv, y, reduction="none")
    res = AttackResult(
        x_adv=x_adv, x_last=x_adv, success=success | ~clean_correct, clean_correct=clean_correct,
        loss_final=loss, loss_best=loss.clone(), flip_step=torch.where(clean_correct, -1, 0),
        zero_grad=torch.zeros_like(success), steps_run=0, attacked=clean_correct.clone(),
    )
    finite = torch.isfinite(clean).all(dim=1) & torch.isfinite(adv).all(dim=1)
    return _finish(res, finite, False, "reference")


#: the reference's iterations (APGD-CE, APGD-T, FAB-T) and Square queries in every version
REFERENCE_ITER, REFERENCE_QUERIES = 100, 5000


def _set_iterations(attack, n_iter: int) -> None:
    """``n_iter`` for one of the reference's attacks, with APGD's step-size checkpoints derived from it as
    its constructor derives them."""
    attack.n_iter = n_iter
    if hasattr(attack, "n_iter_2"):
        attack.n_iter_orig = n_iter
        attack.n_iter_2 = max(int(0.22 * n_iter), 1)
        attack.n_iter_min = max(int(0.06 * n_iter), 1)
        attack.size_decr = max(int(0.03 * n_iter), 1)


def autoattack(model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: str = "linf", version: str = "standard",
               batch_size: int = 250, seed: int = 0, n_iter: int = REFERENCE_ITER,
               n_queries: int = REFERENCE_QUERIES) -> AttackResult:
    """The reference AutoAttack (APGD-CE, APGD-T, FAB-T, Square in the standard version) on ``x``.

    Any ``nn.Module`` whose ``model(x)`` returns logits of pixels in [0, 1] (float32) will do (no
    ``features``/``head`` contract needed); it is run in eval mode and restored.  With fewer than 10 classes the targeted attacks (APGD-T, FAB-T) target all k - 1
    other classes instead of the standard 9.  ``seed`` fixes the reference's random starts.  ``robust_accuracy()`` of the result is
    the reference's robust accuracy.  ``n_iter`` and ``n_queries`` default to the reference's budget
    (:data:`REFERENCE_ITER`, :data:`REFERENCE_QUERIES`); a smaller one is no longer the reference AutoAttack
    (the smoke profile uses one only to exercise the code).
    """
    ref = _import()
    _check(model, x, y, eps, norm)
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
    for name, value in (("n_iter", n_iter), ("n_queries", n_queries)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    x = x.detach()
    with _eval_mode(model):
        aa = ref.AutoAttack(model, norm=_REF_NORM[norm], eps=float(eps), version=version, seed=seed,
                            device=x.device)
        aa.verbose = False
        with torch.no_grad():
            k = int(model(x[:1]).shape[1])
        # the standard version targets the 9 runner-up classes (k >= 10); with fewer classes, all k - 1
        aa.apgd_targeted.n_target_classes = min(aa.apgd_targeted.n_target_classes, k - 1)
        aa.fab.n_target_classes = min(aa.fab.n_target_classes, k - 1)
        if (n_iter, n_queries) != (REFERENCE_ITER, REFERENCE_QUERIES):
            for attack in (aa.apgd, aa.apgd_targeted, aa.fab):
                _set_iterations(attack, n_iter)
            aa.square.n_queries = n_queries
        x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=batch_size)
        return _result(model, x, y, x_adv.to(x.device))


def square(model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: str = "linf", n_queries: int = 5000,
           p_init: float = 0.8, restarts: int = 1, seed: int = 0) -> AttackResult:
    """The reference Square attack (score-based, no gradients; margin loss), as AutoAttack runs it.

    Useful where gradients are masked (a temperature-scaled head, experiment E3 of Walter et al. 2026):
    it needs only the logits.  Attacks the clean-correct examples, ``n_queries`` model calls each.
    """
    _import()
    from pyautoattack.square import SquareAttack

    _check(model, x, y, eps, norm)
    if not isinstance(n_queries, int) or n_queries < 1:
        raise ValueError(f"n_queries must be an integer >= 1, got {n_queries!r}")
    x = x.detach()
    with _eval_mode(model):
        atk = SquareAttack(model, norm=_REF_NORM[norm], n_queries=n_queries, eps=float(eps), p_init=p_init,
                           n_restarts=restarts, seed=seed, verbose=False, device=x.device, resc_schedule=False)
        with torch.no_grad():
            x_adv = atk.perturb(x, y)
        return _result(model, x, y, x_adv.to(x.device))
