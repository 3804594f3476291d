"""flatnb.models.tta: the flip-averaged network equals the mean of two independently computed logits."""
import pytest
import torch
import torch.nn as nn

from flatnb.models import HeadModel, check_contract
from flatnb.models.tta import flip_average


def _net():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 5, 7), nn.Tanh())
    return HeadModel(body, nn.Linear(7, 3)).double().eval()


def test_flip_average_is_the_mean_of_the_logits_of_an_image_and_its_mirror():
    net = _net()
    x = torch.rand(5, 3, 6, 5, dtype=torch.float64)
    mirror = x[..., torch.arange(x.shape[-1] - 1, -1, -1)]  # indexing, not torch.flip
    want = 0.5 * (net(x) + net(mirror))
    tta = flip_average(net)
    check_contract(tta)
    assert tta.head is net.head and not tta.training
    torch.testing.assert_close(tta(x), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(tta.head(tta.features(x)), want, rtol=0, atol=1e-12)
    sym = 0.5 * (x + mirror)  # a mirror-symmetric image: the average changes nothing
    torch.testing.assert_close(tta(sym), net(sym), rtol=0, atol=1e-12)
    assert not torch.allclose(tta(x), net(x))  # and on an ordinary image it does change the logits


def test_flip_average_rejects_what_is_not_an_image():
    with pytest.raises(ValueError, match="images"):
        flip_average(_net())(torch.rand(2, 90, dtype=torch.float64))
