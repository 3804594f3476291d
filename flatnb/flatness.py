"""Relative flatness of the penultimate layer: closed forms and exact references.

Notation follows ``PAPER.md``: features ``phi`` (N x m), last-layer weight ``w``
(k x m, rows ``w_s``), logits ``z = w phi + b``, probabilities ``p``.  For softmax
cross-entropy the Hessian of the loss w.r.t. row-major ``vec(w)`` is

    H = (diag(p) - p p^T)  kron  phi phi^T,

independent of the label, so every quantity below is a cheap function of
``(phi, p, w)``.  The bias is not part of ``w``: curvature is taken w.r.t. the
weight matrix only and ``||w||`` is the weight's norm (as in the Uncanny Valley
code and Petzka et al.).

Functions are batched over samples (leading dimension N) and keep the device
and dtype of their inputs.  The ``*_autograd`` / ``*_from_hessian`` functions
are independent references used by tests and chapters to check the closed forms.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

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


def closed_form(phi: Tensor, logits: Tensor, weight: Tensor, distances: Tensor | None = None) -> FlatnessTerms:
    """All closed-form flatness quantities from one forward pass' ``phi`` and ``logits``."""
    _check_phi(phi)
    if logits.dim() != 2 or logits.shape[0] != phi.shape[0]:
        raise ValueError(f"logits must have shape (N, k) with N={phi.shape[0]}, got {tuple(logits.shape)}")
    _check_weight(weight, logits.shape[-1], phi.shape[-1])
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


def last_layer_hessian(phi: Tensor, probs: Tensor) -> Tensor:
    """Closed-form per-sample Hessian w.r.t. row-major ``vec(w)``, (N, k*m, k*m).

    Dense, so only for small ``k * m``; the other functions never build it.
    """
    _check_phi(phi)
    m_mat = softmax_hessian(probs)
    outer = phi.unsqueeze(-1) * phi.unsqueeze(-2)
    n, k, m = probs.shape[0], probs.shape[1], phi.shape[1]
    return (m_mat[:, :, None, :, None] * outer[:, None, :, None, :]).reshape(n, k * m, k * m)


# ---------------------------------------------------------------------------
# Independent references (autograd, the double-sum definition)
# ---------------------------------------------------------------------------


def last_layer_hessian_autograd(phi: Tensor, labels: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Exact per-sample Hessian of the CE loss w.r.t. ``vec(w)`` by autograd, (N, k*m, k*m).

    One ``torch.autograd.functional.hessian`` call per sample: slow and obviously
    correct, which is what a reference should be.
    """
    _check_phi(phi)
    _check_weight(weight, m=phi.shape[1])
    k, m = weight.shape
    w0 = weight.detach().reshape(-1)
    b0 = None if bias is None else bias.detach()
    out = []
    for i in range(phi.shape[0]):
        phi_i = phi[i].detach()
        y_i = labels[i].reshape(1)

        def loss(w_flat: Tensor, phi_i=phi_i, y_i=y_i) -> Tensor:
            z = w_flat.reshape(k, m) @ phi_i
            if b0 is not None:
                z = z + b0
            return F.cross_entropy(z.unsqueeze(0), y_i)

        out.append(torch.autograd.functional.hessian(loss, w0))
    return torch.stack(out)


def kappa_from_hessian(hessian: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """``(||w||^2 Tr H, sum_{s,s'} <w_s, w_s'> Tr H_{s,s'})`` from dense Hessians.

    ``hessian`` is (N, k*m, k*m) or (k*m, k*m) over row-major ``vec(w)``; the
    neuron-wise value follows Petzka et al.'s double-sum definition literally.
    """
    squeeze = hessian.dim() == 2
    h = hessian.unsqueeze(0) if squeeze else hessian
    k, m = weight.shape
    blocks = h.reshape(h.shape[0], k, m, k, m)
    block_traces = torch.diagonal(blocks, dim1=2, dim2=4).sum(-1)  # (N, k, k): Tr H_{s,s'}
    gram = weight @ weight.T
    neuron = (gram.unsqueeze(0) * block_traces).sum(dim=(-1, -2))
    layer = weight.pow(2).sum() * torch.diagonal(h, dim1=-2, dim2=-1).sum(-1)
    if squeeze:
        return layer[0], neuron[0]
    return layer, neuron
