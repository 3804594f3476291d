"""Closed-form last-layer curvature vs independent computations (float64)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flatnb import curvature as fl
from flatnb.runtime import resolve_profile

DT = torch.float64


def _random_head(n, k, m, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(n, m, generator=g, dtype=DT).relu()  # post-ReLU features are non-negative
    w = torch.randn(k, m, generator=g, dtype=DT) * scale
    b = torch.randn(k, generator=g, dtype=DT)
    y = torch.randint(0, k, (n,), generator=g)
    return phi, w, b, y


@pytest.mark.parametrize("k,m", [(2, 1), (3, 4), (5, 3), (10, 8)])
def test_closed_form_hessian_equals_autograd(k, m):
    phi, w, b, y = _random_head(4, k, m, seed=k * 100 + m)
    probs = torch.softmax(phi @ w.T + b, dim=-1)
    exact = fl.last_layer_hessian_autograd(phi, y, w, b)
    closed = fl.last_layer_hessian(phi, probs)
    torch.testing.assert_close(closed, exact, rtol=1e-10, atol=1e-12)


def test_hessian_does_not_depend_on_label():
    phi, w, b, y = _random_head(6, 4, 5, seed=1)
    h1 = fl.last_layer_hessian_autograd(phi, y, w, b)
    h2 = fl.last_layer_hessian_autograd(phi, (y + 1) % 4, w, b)
    torch.testing.assert_close(h1, h2, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("k,m", [(3, 4), (7, 6)])
def test_kappas_equal_definitions_on_autograd_hessian(k, m):
    phi, w, b, y = _random_head(5, k, m, seed=7 + k)
    logits = phi @ w.T + b
    exact = fl.last_layer_hessian_autograd(phi, y, w, b)
    layer_ref, neuron_ref = fl.kappa_from_hessian(exact, w)
    terms = fl.closed_form(phi, logits, w)
    torch.testing.assert_close(terms.kappa_sq, layer_ref, rtol=1e-10, atol=0)
    torch.testing.assert_close(terms.kappa_neuron, neuron_ref, rtol=1e-10, atol=0)
    torch.testing.assert_close(terms.kappa_unsq, layer_ref / w.norm(), rtol=1e-10, atol=0)
    tr_ref = torch.diagonal(exact, dim1=-2, dim2=-1).sum(-1)
    torch.testing.assert_close(terms.trace_h, tr_ref, rtol=1e-10, atol=0)
    # neuron-wise <= squared layer-wise (PAPER 2.4)
    assert torch.all(terms.kappa_neuron <= terms.kappa_sq * (1 + 1e-12))


def test_dataset_average_equals_hessian_of_mean_loss():
    phi, w, b, y = _random_head(8, 3, 4, seed=3)

    def mean_loss(w_flat):
        return torch.nn.functional.cross_entropy(phi @ w_flat.reshape(3, 4).T + b, y)

    h_mean = torch.autograd.functional.hessian(mean_loss, w.reshape(-1))
    probs = torch.softmax(phi @ w.T + b, dim=-1)
    torch.testing.assert_close(fl.last_layer_hessian(phi, probs).mean(0), h_mean, rtol=1e-10, atol=1e-13)
    assert math.isclose(fl.trace_hessian(phi, probs).mean().item(), torch.trace(h_mean).item(), rel_tol=1e-10)


@settings(max_examples=60, deadline=None)
@given(
    logits=st.lists(st.floats(-60, 60), min_size=2, max_size=12),
)
def test_gini_matches_exact_formula_without_cancellation(logits):
    z = torch.tensor([logits], dtype=torch.float64)
    p = torch.softmax(z, -1)
    # independent reference: sum_j p_j * sum_{i != j} p_i, all terms non-negative
    ref = sum(p[0, j] * torch.cat([p[0, :j], p[0, j + 1 :]]).sum() for j in range(p.shape[1]))
    torch.testing.assert_close(fl.gini(p)[0], ref, rtol=1e-12, atol=0)
    assert 0 <= fl.gini(p)[0] <= 1 - 1 / p.shape[1] + 1e-12


def test_gini_float32_keeps_relative_precision_when_confident():
    # p_max = 1 - ~1e-17: the naive 1 - ||p||^2 is exactly 0 in float32
    z = torch.tensor([[40.0, 0.0, 0.0]])
    g32 = fl.gini(torch.softmax(z, -1))
    g64 = fl.gini(torch.softmax(z.double(), -1))
    assert (1 - torch.softmax(z, -1).pow(2).sum()).item() == 0.0
    assert g32.item() > 0
    assert math.isclose(g32.item(), g64.item(), rel_tol=1e-5)


def test_neuronwise_matches_variance_form_and_is_nonnegative_when_confident():
    phi, w, b, _ = _random_head(6, 5, 7, seed=11, scale=3.0)
    probs = torch.softmax(20 * (phi @ w.T + b), -1)
    mu = probs @ w
    var_ref = (probs * (w.unsqueeze(0) - mu.unsqueeze(1)).pow(2).sum(-1)).sum(-1)
    torch.testing.assert_close(fl.kappa_neuronwise(phi, probs, w), phi.pow(2).sum(-1) * var_ref, rtol=1e-9, atol=1e-300)
    assert torch.all(fl.kappa_neuronwise(phi.float(), probs.float(), w.float()) >= 0)


def test_two_class_gini_is_inverse_cosh():
    delta = torch.linspace(-20, 20, 81, dtype=DT)
    p = torch.softmax(torch.stack([delta, torch.zeros_like(delta)], -1), -1)
    torch.testing.assert_close(fl.gini(p), 1 / (1 + torch.cosh(delta)), rtol=1e-12, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_closed_form_on_cuda_matches_cpu():
    phi, w, b, _ = _random_head(32, 10, 16, seed=5)
    logits = phi @ w.T + b
    cpu = fl.closed_form(phi, logits, w)
    gpu = fl.closed_form(phi.cuda(), logits.cuda(), w.cuda())
    for a, g in zip(cpu, gpu):
        torch.testing.assert_close(g.cpu(), a, rtol=1e-10, atol=0)


def test_dtype_and_device_are_kept():
    phi, w, b, _ = _random_head(3, 4, 5, seed=2)
    for dtype in (torch.float32, torch.float64):
        terms = fl.closed_form(phi.to(dtype), (phi @ w.T + b).to(dtype), w.to(dtype))
        assert all(t.dtype == dtype for t in terms)
        assert terms.kappa_sq.shape == (3,)


@pytest.mark.parametrize(
    "phi_shape,logit_shape,w_shape,match",
    [
        ((4,), (4, 3), (3, 4), "phi must have shape"),
        ((2, 4), (3, 3), (3, 4), "logits must have shape"),
        ((2, 4), (2, 3), (3, 5), "columns but phi has 4"),
        ((2, 4), (2, 3), (2, 4), "rows but probs has 3"),
    ],
)
def test_wrong_shapes_name_the_expected_shapes(phi_shape, logit_shape, w_shape, match):
    with pytest.raises(ValueError, match=match):
        fl.closed_form(torch.rand(phi_shape), torch.rand(logit_shape), torch.rand(w_shape))


def test_unknown_profile_lists_allowed_ones():
    with pytest.raises(ValueError, match="'auto', 'quick', 'full' or 'smoke'"):
        resolve_profile("fast")
    assert resolve_profile("auto", "cpu") == "quick"
    assert resolve_profile("auto", "cuda") == "full"
