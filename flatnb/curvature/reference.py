"""Exact references for the last-layer Hessian: dense Kronecker products and autograd.

Independent of :mod:`flatnb.curvature.last_layer`'s closed forms; tests and chapter 1 check
the closed forms against these in float64.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from flatnb.curvature.last_layer import _check_phi, _check_probs, _check_weight, softmax_hessian

Tensor = torch.Tensor


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


def last_layer_hessian_batch(phi: Tensor, probs: Tensor) -> Tensor:
    """Closed-form Hessian of the *mean* loss over the batch, ``H(w, S)``, (k*m, k*m).

    ``H(w, S) = 1/N sum_i M(p_i) kron phi_i phi_i^T`` (the dataset average of the per-sample Hessians).  Dense.
    """
    _check_phi(phi)
    _check_probs(probs)
    m_mat = softmax_hessian(probs)
    k, m = probs.shape[1], phi.shape[1]
    h = torch.einsum("nab,ni,nj->aibj", m_mat, phi, phi) / phi.shape[0]
    return h.reshape(k * m, k * m)


def last_layer_hessian_batch_autograd(
    phi: Tensor, labels: Tensor, weight: Tensor, bias: Tensor | None = None
) -> Tensor:
    """Exact Hessian of the batch-mean CE loss w.r.t. ``vec(w)`` by one autograd call, (k*m, k*m)."""
    _check_phi(phi)
    _check_weight(weight, m=phi.shape[1])
    if labels.shape != (phi.shape[0],):
        raise ValueError(f"labels must have shape ({phi.shape[0]},), got {tuple(labels.shape)}")
    k, m = weight.shape
    phi0 = phi.detach()
    b0 = None if bias is None else bias.detach()

    def loss(w_flat: Tensor) -> Tensor:
        z = phi0 @ w_flat.reshape(k, m).T
        if b0 is not None:
            z = z + b0
        return F.cross_entropy(z, labels)

    return torch.autograd.functional.hessian(loss, weight.detach().reshape(-1))


# ---------------------------------------------------------------------------
# The closed form on a model (one forward pass), streamed over a loader
# ---------------------------------------------------------------------------

# The model contract is owned by flatnb.models; kept under this name for callers of flatness.
