"""Test-time augmentation as a network of its own: :func:`flip_average`.

airbench94 reports its CIFAR-10 accuracy with horizontal-flip test-time augmentation: the logits of an image and
of its mirror image, averaged. Because the head is linear, that average is the head applied to the average of the
two penultimate feature vectors, so the flip-averaged network keeps the model contract with
φ'(x) = (φ(x) + φ(flip x)) / 2 and the same head: relative flatness, attacks and AutoAttack apply to it unchanged
(it is deterministic and differentiable, at twice the cost per input).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from flatnb.models.contract import HeadModel, check_contract


class FlipFeatures(nn.Module):
    """φ'(x) = (φ(x) + φ(x mirrored left to right)) / 2 of a contract model (its weights shared, not copied)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        check_contract(model)
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"flip averaging needs images (N, C, H, W), got a tensor of shape {tuple(x.shape)}")
        return 0.5 * (self.model.features(x) + self.model.features(torch.flip(x, dims=(-1,))))


def flip_average(model: nn.Module) -> HeadModel:
    """``model`` with horizontal-flip test-time augmentation, as a contract model: its logits are the mean of the
    logits of ``x`` and of ``x`` mirrored (the head is ``model.head`` itself, so κ of the last layer is defined
    on the averaged features). Keeps ``model``'s train/eval mode; shares its weights."""
    out = HeadModel(FlipFeatures(model), model.head)
    out.train(model.training)
    return out
