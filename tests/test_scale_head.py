"""flatnb.models.scale_head: the temperature-scaled copy f_s (weight and bias times s)."""
import pytest
import torch
import torch.nn as nn

from flatnb import models
from conftest import Tiny


def test_scale_head_scales_weight_and_bias_keeps_argmax_and_original():
    torch.manual_seed(0)
    model = Tiny().double()
    x = torch.rand(64, 12, dtype=torch.float64)
    w0, b0 = model.head.weight.clone(), model.head.bias.clone()
    for s in (0.25, 3.0, 100.0):
        ms = models.scale_head(model, s)
        assert ms is not model
        torch.testing.assert_close(ms.head.weight, s * w0)
        torch.testing.assert_close(ms.head.bias, s * b0)
        # logits of the copy are s times the original's: temperature 1/s
        torch.testing.assert_close(ms(x), s * model(x))
        assert torch.equal(ms(x).argmax(1), model(x).argmax(1))
    # the original is untouched
    assert torch.equal(model.head.weight, w0) and torch.equal(model.head.bias, b0)


def test_scale_head_rejects_bad_scale_and_models():
    with pytest.raises(ValueError, match="scale"):
        models.scale_head(Tiny(), 0.0)
    with pytest.raises(ValueError, match="scale"):
        models.scale_head(Tiny(), float("nan"))
    with pytest.raises(TypeError, match="head"):
        models.scale_head(nn.Linear(3, 2), 2.0)
