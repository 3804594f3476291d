"""Relative flatness of the penultimate layer in closed form.

Notation (Walter et al. 2026, after Petzka et al. 2021): features ``phi`` (N x m), last-layer
weight ``w`` (k x m, rows ``w_s``), logits ``z = w phi + b``, probabilities ``p``. For softmax
cross-entropy the Hessian of the loss w.r.t. row-major ``vec(w)`` is

    H = (diag(p) - p p^T)  kron  phi phi^T,

independent of the label, so every quantity here is a cheap function of ``(phi, p, w)``:
one forward pass gives all three κ conventions. The bias is not part of ``w``.
Functions are batched over samples (leading dimension N) and keep the device and dtype of
their inputs. Independent references live in :mod:`flatnb.curvature.reference`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from flatnb.curvature._common import NonFiniteError, _bad_rows, _raise_nonfinite, require_eval
from flatnb.models import check_contract

Tensor = torch.Tensor


def _check_probs(probs: Tensor) -> None:
    if probs.dim() != 2:
        raise ValueError(f"probs must have shape (N, k), got {tuple(probs.shape)}")


def _check_phi(phi: Tensor) -> None:
    if phi.dim() != 2:
        raise ValueError(f"phi must have shape (N, m), got {tuple(phi.shape)}")


def _check_weight(weight: Tensor, k: int | None = None, m: int | None = None) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (k, m), got {tuple(weight.shape)}")
    if k is not None and weight.shape[0] != k:
        raise ValueError(f"weight has {weight.shape[0]} rows but probs has {k} classes")
    if m is not None and weight.shape[1] != m:
        raise ValueError(f"weight has {weight.shape[1]} columns but phi has {m} features")


def _check_finite_rows(phi: Tensor, logits: Tensor, weight: Tensor) -> None:
    """One host sync: an empty batch, or NaN/inf in ``weight``, ``phi`` or ``logits``, raise ``ValueError``."""
    if phi.shape[0] == 0:
        raise ValueError("the batch is empty (N = 0); pass at least one sample")
    row_ok = torch.isfinite(phi).all(dim=1) & torch.isfinite(logits).all(dim=1)
    flags = torch.cat([torch.isfinite(weight).all().reshape(1), row_ok]).cpu()
    if not bool(flags[0]):
        raise NonFiniteError("the last-layer weight contains NaN or inf; check the model's head (a diverged "
                             "training run, a corrupt checkpoint, or an overflowing scale factor)")
    if not bool(flags[1:].all()):
        rows = torch.nonzero(~flags[1:])[:, 0]
        raise NonFiniteError(f"phi or logits contain NaN or inf in {_bad_rows(rows)}; check those inputs "
                             "(pixels in [0, 1], no NaN) and the weights, or use float64 if the logits overflow")


def softmax_hessian(probs: Tensor) -> Tensor:
    """``M(p) = diag(p) - p p^T`` per sample: the CE Hessian in the logits, (N, k, k)."""
    _check_probs(probs)
    return torch.diag_embed(probs) - probs.unsqueeze(-1) * probs.unsqueeze(-2)


def gini(probs: Tensor) -> Tensor:
    """``1 - ||p||^2 = sum_j p_j (1 - p_j)`` per sample, (N,).

    Computed without cancellation: for the most likely class ``1 - p_max`` is
    taken as the sum of the other probabilities, so a confidently classified
    input (``p_max = 1 - 1e-20``) still gets a correct, tiny value in float32
    instead of 0 or rounding noise.  This is the regime the uncanny valley lives in.
    """
    _check_probs(probs)
    top = probs.argmax(dim=-1, keepdim=True)
    rest = probs.scatter(-1, top, 0.0).sum(dim=-1, keepdim=True)
    one_minus = (1.0 - probs).scatter(-1, top, rest)
    return (probs * one_minus).sum(dim=-1)


def trace_hessian(phi: Tensor, probs: Tensor) -> Tensor:
    """Per-sample ``Tr H = (1 - ||p||^2) ||phi||^2``, (N,)."""
    _check_phi(phi)
    _check_probs(probs)
    return gini(probs) * phi.pow(2).sum(dim=-1)


def weight_norm(weight: Tensor, squared: bool = True) -> Tensor:
    """Frobenius norm of the last-layer weight (bias excluded), squared or not."""
    sq = weight.pow(2).sum()
    return sq if squared else sq.sqrt()


def kappa_layerwise(phi: Tensor, probs: Tensor, weight: Tensor, squared: bool = True) -> Tensor:
    """Layer-wise relative flatness per sample, (N,).

    ``squared=True``: ``||w||_F^2 Tr H`` (Petzka et al. supplement, the paper's text);
    ``squared=False``: ``||w||_F Tr H`` (the Uncanny Valley code and plots).
    Only the squared version is invariant to ``phi -> c phi, w -> w / c``.
    """
    _check_weight(weight, probs.shape[-1], phi.shape[-1])
    return weight_norm(weight, squared) * trace_hessian(phi, probs)


def class_distances(weight: Tensor) -> Tensor:
    """``D[s, s'] = ||w_s - w_s'||^2`` (k, k), computed exactly (no Gram-matrix trick)."""
    return torch.cdist(weight, weight, compute_mode="donot_use_mm_for_euclid_dist").pow(2)


def kappa_neuronwise(phi: Tensor, probs: Tensor, weight: Tensor, distances: Tensor | None = None) -> Tensor:
    """Neuron-wise relative flatness ``kappa^phi_Tr`` per sample, (N,).

    ``kappa = ||phi||^2 (sum_s p_s ||w_s||^2 - ||sum_s p_s w_s||^2)
            = ||phi||^2 Var_{s~p}(w_s)
            = ||phi||^2 * 1/2 sum_{s,s'} p_s p_s' ||w_s - w_s'||^2``.

    The last form has only non-negative terms, so it stays accurate when ``p`` is
    nearly one-hot (the first form then subtracts two nearly equal numbers).
    Pass ``distances=class_distances(weight)`` to reuse it across batches.
    """
    _check_phi(phi)
    _check_probs(probs)
    _check_weight(weight, probs.shape[-1], phi.shape[-1])
    d = class_distances(weight) if distances is None else distances
    var = 0.5 * ((probs @ d.to(probs.dtype)) * probs).sum(dim=-1)
    return phi.pow(2).sum(dim=-1) * var


class FlatnessTerms(NamedTuple):
    """Per-sample closed-form quantities, each of shape (N,), plus ``||w||^2`` (scalar)."""

    phi_sq: Tensor  # ||phi(x)||^2
    gini: Tensor  # 1 - ||p||^2
    trace_h: Tensor  # Tr H = gini * phi_sq
    weight_sq: Tensor  # ||w||_F^2 (scalar)
    kappa_sq: Tensor  # ||w||_F^2 Tr H
    kappa_unsq: Tensor  # ||w||_F Tr H
    kappa_neuron: Tensor  # neuron-wise kappa^phi_Tr


def closed_form(phi: Tensor, logits: Tensor, weight: Tensor, distances: Tensor | None = None,
                check: bool = True) -> FlatnessTerms:
    """All closed-form flatness quantities from one forward pass' ``phi`` and ``logits``.

    ``check=True`` raises ``ValueError`` on an empty batch or on NaN/inf in ``phi``, ``logits`` or
    ``weight``, naming the rows (one host sync); callers that check once at the end of a loop
    (the trajectory recorder, :func:`flatness_over`) pass ``check=False``.
    """
    _check_phi(phi)
    if logits.dim() != 2 or logits.shape[0] != phi.shape[0]:
        raise ValueError(f"logits must have shape (N, k) with N={phi.shape[0]}, got {tuple(logits.shape)}")
    _check_weight(weight, logits.shape[-1], phi.shape[-1])
    if check:
        _check_finite_rows(phi, logits, weight)
    probs = torch.softmax(logits, dim=-1)
    phi_sq = phi.pow(2).sum(dim=-1)
    g = gini(probs)
    tr = g * phi_sq
    w_sq = weight_norm(weight, squared=True).to(tr.dtype)
    return FlatnessTerms(
        phi_sq=phi_sq,
        gini=g,
        trace_h=tr,
        weight_sq=w_sq,
        kappa_sq=w_sq * tr,
        kappa_unsq=w_sq.sqrt() * tr,
        kappa_neuron=kappa_neuronwise(phi, probs, weight, distances),
    )


def model_flatness(
    model: torch.nn.Module, x: Tensor, distances: Tensor | None = None, check: bool = True
) -> tuple[FlatnessTerms, Tensor]:
    """Closed-form flatness of one batch from a single forward pass: ``(terms, logits)``.

    ``phi = model.features(x)``, ``logits = model.head(phi)``; nothing else is run,
    so the cost is one forward pass plus O(N k m) work.  ``check=True`` raises on
    non-finite logits (one host sync); :func:`flatness_over` defers that check.
    """
    phi = model.features(x)
    if phi.dim() != 2:
        raise ValueError(f"model.features(x) must return (N, m) features, got {tuple(phi.shape)}")
    logits = model.head(phi)
    return closed_form(phi, logits, model.head.weight, distances, check=check), logits


class FlatnessOver(NamedTuple):
    """Result of :func:`flatness_over`.

    ``terms``: per-sample :class:`FlatnessTerms` over the whole loader (each (N,),
    ``weight_sq`` a scalar).  ``mean``: dataset averages of every per-sample term
    (0-dim tensors on the device).  Because ``H(w, S)`` is the mean of the
    per-sample Hessians and every kappa is linear in ``H``, ``mean["trace_h"]`` is
    ``Tr H(w, S)`` and ``mean["kappa_*"]`` are the dataset-level kappas.
    ``pred`` (N,), and, when the loader yields labels, ``labels``, ``loss`` (N,)
    and ``mean["loss"]``, ``mean["accuracy"]``.
    """

    terms: FlatnessTerms
    mean: dict
    pred: Tensor
    labels: Tensor | None
    loss: Tensor | None


def flatness_over(
    model: torch.nn.Module,
    batches,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> FlatnessOver:
    """Closed-form flatness over a loader: one forward pass per batch, no second pass.

    ``batches`` yields input tensors or ``(x, y, ...)`` tuples.  ``device`` defaults
    to the model's; ``dtype`` (default: the model's) is the computation dtype: a
    copy of the model is cast if it differs, the model itself is never changed.
    Per-sample values stay on the device; the only host sync is one finite-check
    at the end: NaN/inf inputs, features, logits or head weights raise ``ValueError`` naming the rows
    (in loader order), as does a loader whose batches are all empty.  The bias enters the
    logits but not ``w``: curvature and ``||w||`` are w.r.t. the weight matrix.
    """
    check_contract(model)
    require_eval(model)
    p0 = next(model.parameters())
    device = p0.device if device is None else torch.device(device)
    dtype = p0.dtype if dtype is None else dtype
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point dtype, got {dtype}")
    if p0.device != device or p0.dtype != dtype:
        import copy

        model = copy.deepcopy(model).to(device=device, dtype=dtype)
    distances = class_distances(model.head.weight.detach())
    parts: dict[str, list[Tensor]] = {f: [] for f in FlatnessTerms._fields if f != "weight_sq"}
    preds, labels, losses = [], [], []
    finite = []
    with torch.no_grad():
        for batch in batches:
            x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
            x = x.to(device=device, dtype=dtype, non_blocking=True)
            terms, logits = model_flatness(model, x, distances, check=False)
            finite.append(torch.isfinite(x.flatten(1)).all(dim=1) & torch.isfinite(logits).all(dim=1)
                          & torch.isfinite(terms.phi_sq))
            for f in parts:
                parts[f].append(getattr(terms, f))
            preds.append(logits.argmax(-1))
            if y is not None:
                y = y.to(device, non_blocking=True)
                labels.append(y)
                losses.append(F.cross_entropy(logits, y, reduction="none"))
    if not preds:
        raise ValueError("batches was empty: pass a loader (or list) yielding at least one batch")
    row_ok = torch.cat(finite)
    if row_ok.numel() == 0:
        raise ValueError("every batch was empty (N = 0): pass at least one sample")
    flags = torch.cat([torch.isfinite(model.head.weight.detach()).all().reshape(1), row_ok]).cpu()  # the one sync
    if not bool(flags[0]):
        raise NonFiniteError("the last-layer weight contains NaN or inf; check the model's head (a diverged "
                             "training run, a corrupt checkpoint, or an overflowing scale factor)")
    if not bool(flags[1:].all()):
        _raise_nonfinite("inputs, features or logits", torch.nonzero(~flags[1:])[:, 0])
    cat = {f: torch.cat(v) for f, v in parts.items()}
    terms = FlatnessTerms(weight_sq=weight_norm(model.head.weight.detach()).to(dtype), **cat)
    mean = {f: v.mean() for f, v in cat.items()}
    pred = torch.cat(preds)
    lab = loss = None
    if labels:
        if len(labels) != len(preds):
            raise ValueError("some batches had labels and some did not")
        lab, loss = torch.cat(labels), torch.cat(losses)
        mean["loss"] = loss.mean()
        mean["accuracy"] = (pred == lab).to(dtype).mean()
    return FlatnessOver(terms=terms, mean=mean, pred=pred, labels=lab, loss=loss)
