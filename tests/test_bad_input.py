"""Bad input never becomes a number (issue 14): NaN/inf inputs, weights or logits and empty batches
raise ValueError naming the rows or the parameter, in every entry point that returns an accuracy,
a success rate or a flatness value."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flatnb import attacks
from flatnb.curvature import closed_form, flatness_over
from flatnb.measure.trajectory import Recorder

K = 4


class Tiny(nn.Module):
    def __init__(self, n_in: int = 12, m: int = 6, k: int = K):
        super().__init__()
        # no squashing: an inf pixel must stay visible in phi (a tanh would map it to 1)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(n_in, m))
        self.head = nn.Linear(m, k)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


def _model(seed=0):
    torch.manual_seed(seed)
    return Tiny().eval()


def _data(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 3, 4, generator=g), torch.randint(0, K, (n,), generator=g)


ATTACKS = {
    "pgd": lambda m, x, y: attacks.pgd(m, x, y, 0.05, steps=2),
    "pgd_random": lambda m, x, y: attacks.pgd(m, x, y, 0.05, steps=2, random_start=True,
                                              generator=torch.Generator().manual_seed(0)),
    "apgd": lambda m, x, y: attacks.apgd(m, x, y, 0.05, steps=3, generator=torch.Generator().manual_seed(0)),
    "fgsm": lambda m, x, y: attacks.fgsm(m, x, y, 0.05),
    "transfer": lambda m, x, y: attacks.transfer(x, y, m),
    "recorded": lambda m, x, y: attacks.pgd(m, x, y, 0.05, steps=2, record=Recorder),
}


def _flatness(m, x, y):
    return flatness_over(m, [(x, y)])


def _closed_form(m, x, y):
    with torch.no_grad():
        phi = m.features(x)
        return closed_form(phi, m.head(phi), m.head.weight)


ENTRIES = {**ATTACKS, "flatness_over": _flatness, "closed_form": _closed_form}


@pytest.mark.parametrize("name", list(ENTRIES))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_pixel_raises_naming_the_row(name, bad):
    m = _model()
    x, y = _data()
    x[3, 0, 1, 2] = bad
    y[3] = 0  # a NaN row's argmax is 0: labelled 0 it would count as correct and robust
    with pytest.raises(ValueError, match=r"NaN or inf.*\[3\]"):
        ENTRIES[name](m, x, y)


@pytest.mark.parametrize("name", list(ENTRIES))
@pytest.mark.parametrize("where", ["head.weight", "body.1.bias", "head.bias"])
def test_nonfinite_weight_raises(name, where):
    m = copy.deepcopy(_model())
    with torch.no_grad():
        dict(m.named_parameters())[where].view(-1)[0] = float("nan")
    x, y = _data()
    # the attacks name the parameter; the curvature functions name the head or the rows it spoils
    with pytest.raises(ValueError, match=r"NaN or inf"):
        ENTRIES[name](m, x, y)
    if name in ATTACKS:
        with pytest.raises(ValueError, match=where.replace(".", r"\.")):
            ENTRIES[name](m, x, y)


@pytest.mark.parametrize("name", list(ENTRIES))
def test_overflowing_logits_raise(name):
    """Finite inputs and weights, but features of ~1e20 times head weights of ~1e20 overflow float32."""
    m = copy.deepcopy(_model())
    with torch.no_grad():
        m.body[1].weight.mul_(1e20)
        m.head.weight.mul_(1e20)
    x, y = _data()
    with pytest.raises(ValueError, match=r"NaN or inf|overflow"):
        ENTRIES[name](m, x, y)


@pytest.mark.parametrize("name", list(ENTRIES))
def test_empty_batch_raises(name):
    m = _model()
    x, y = _data()
    with pytest.raises(ValueError, match="empty"):
        ENTRIES[name](m, x[:0], y[:0])


HYP = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@HYP
@given(name=st.sampled_from(sorted(ENTRIES)), n=st.integers(1, 7), seed=st.integers(0, 10_000),
       poison=st.sampled_from([None, "nan", "inf", "-inf"]), row=st.integers(0, 6), col=st.integers(0, 11))
def test_finite_in_finite_out_nonfinite_in_raises(name, n, seed, poison, row, col):
    """Every entry point that returns an accuracy or a flatness value: finite numbers for finite
    inputs, ValueError for a non-finite one, never a number computed from NaN."""
    m = _model(seed % 7)
    x, y = _data(n, seed)
    if poison is not None:
        x.view(n, -1)[row % n, col] = float(poison)
        with pytest.raises(ValueError, match=rf"\[{row % n}\]"):
            ENTRIES[name](m, x, y)
        return
    out = ENTRIES[name](m, x, y)
    if isinstance(out, attacks.AttackResult):
        vals = [out.robust_accuracy(), out.clean_accuracy()]
        assert torch.isfinite(out.loss_best).all() and torch.isfinite(out.x_adv).all()
        if out.trajectory is not None:
            assert all(torch.isfinite(v.double()).all() for v in out.trajectory.values().values())
    elif isinstance(out, attacks.TransferResult):
        vals = [out.accuracy(), out.success_rate()]
        assert torch.isfinite(out.loss_ce).all() and torch.isfinite(out.margin).all()
    elif name == "flatness_over":
        vals = [float(v) for v in out.mean.values()]
        assert all(torch.isfinite(getattr(out.terms, f)).all() for f in out.terms._fields)
    else:
        vals = [float(v.sum()) for v in out]
    assert all(torch.isfinite(torch.tensor(v)) for v in vals)
    if isinstance(out, (attacks.AttackResult, attacks.TransferResult)):
        assert all(0.0 <= v <= 1.0 for v in vals)


def test_evaluate_rejects_nan_weights_and_nan_pixels():
    import torch
    from torch import nn

    from flatnb import data as fdata
    from flatnb import models
    from flatnb.training import train

    torch.manual_seed(0)
    model = models.build("resnet18", 3, width=4).eval()
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    ds = fdata.Dataset(images, torch.tensor([0, 1, 2, 0, 1, 2]), ["a", "b", "c"], "test", "toy")
    ev = train.evaluate(model, ds, "cpu")
    assert 0 <= ev["accuracy"] <= 1 and ev["n"] == 6
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="head.weight"):
        train.evaluate(model, ds, "cpu")
    with torch.no_grad():
        model.head.weight[0, 0] = 0.0
        model.head.bias.fill_(float("inf"))  # finite parameters are checked; this one is not finite
    with pytest.raises(ValueError, match="NaN or inf"):
        train.evaluate(model, ds, "cpu")
