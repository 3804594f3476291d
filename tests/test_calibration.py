"""Temperature scaling and ECE, checked in float64 against independent NumPy computations."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from flatnb.measure import calibration as cal
from flatnb import data as fdata


def _np_nll(z: np.ndarray, y: np.ndarray, t: float) -> float:
    """Independent NLL: log-sum-exp by hand with the max subtracted."""
    a = z / t
    m = a.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(a - m).sum(axis=1))
    return float(np.mean(lse - a[np.arange(len(y)), y]))


def _np_ece(z: np.ndarray, y: np.ndarray, n_bins: int, t: float = 1.0) -> float:
    """Independent ECE: a plain loop over examples into (a, b] bins."""
    a = z / t
    p = np.exp(a - a.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    conf, pred = p.max(axis=1), p.argmax(axis=1)
    sums = [[0, 0.0, 0.0] for _ in range(n_bins)]  # count, sum correct, sum confidence
    for c, pr, lab in zip(conf, pred, y):
        b = min(int(math.ceil(c * n_bins)) - 1, n_bins - 1)
        b = max(b, 0)
        sums[b][0] += 1
        sums[b][1] += float(pr == lab)
        sums[b][2] += c
    n = len(y)
    return sum(cnt / n * abs(sc / cnt - sf / cnt) for cnt, sc, sf in sums if cnt)


def _sample(n=4000, k=10, t_true=2.5, seed=0):
    """Logits and labels drawn from softmax(logits / t_true): the NLL-optimal temperature is t_true."""
    g = torch.Generator().manual_seed(seed)
    z = 3.0 * torch.randn(n, k, generator=g, dtype=torch.float64)
    p = torch.softmax(z / t_true, dim=1)
    y = torch.multinomial(p, 1, generator=g).squeeze(1)
    return z, y


def test_nll_matches_numpy():
    z, y = _sample(n=300)
    for t in (0.3, 1.0, 4.0):
        assert cal.nll(z, y, t) == pytest.approx(_np_nll(z.numpy(), y.numpy(), t), rel=1e-12, abs=1e-12)


def test_fit_temperature_is_the_grid_minimiser():
    z, y = _sample(n=500, t_true=1.7, seed=1)
    t_hat = cal.fit_temperature(z, y)
    grid = np.exp(np.linspace(np.log(0.2), np.log(20), 20001))
    vals = np.array([_np_nll(z.numpy(), y.numpy(), t) for t in grid])
    t_grid = grid[vals.argmin()]
    assert t_hat == pytest.approx(t_grid, rel=5e-4)
    # first-order condition by central differences of the independent NLL
    h = 1e-5 * t_hat
    d = (_np_nll(z.numpy(), y.numpy(), t_hat + h) - _np_nll(z.numpy(), y.numpy(), t_hat - h)) / (2 * h)
    assert abs(d) < 1e-6
    assert _np_nll(z.numpy(), y.numpy(), t_hat) <= vals.min() + 1e-12


def test_fit_temperature_recovers_the_generating_temperature():
    z, y = _sample(n=20000, t_true=2.5, seed=2)
    assert cal.fit_temperature(z, y) == pytest.approx(2.5, rel=0.05)


def test_fit_temperature_scales_with_the_logits():
    z, y = _sample(n=800, t_true=1.3, seed=3)
    t1 = cal.fit_temperature(z, y)
    assert cal.fit_temperature(7.0 * z, y) == pytest.approx(7.0 * t1, rel=1e-8)
    # float32 input gives the same answer up to float32 rounding of the logits
    assert cal.fit_temperature(z.float(), y) == pytest.approx(t1, rel=1e-5)


def test_fit_temperature_refuses_separated_and_uninformative_logits():
    y = torch.arange(6) % 3
    z = 5.0 * torch.nn.functional.one_hot(y, 3).double()  # every prediction right: NLL falls as T -> 0
    with pytest.raises(ValueError, match="perfectly separated"):
        cal.fit_temperature(z, y)
    with pytest.raises(ValueError, match="worse than a uniform"):
        cal.fit_temperature(-z, y)  # every prediction confidently wrong
    with pytest.raises(ValueError, match="non-finite"):
        cal.fit_temperature(torch.tensor([[0.0, float("nan")], [1.0, 0.0]]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="N = 0"):
        cal.fit_temperature(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="bounds"):
        cal.fit_temperature(z, y, bounds=(2.0, 1.0))
    # the smoke profile's escape: the bound that minimises the NLL over the allowed interval
    assert cal.fit_temperature(-z, y, at_bound="clip") == 100.0
    assert cal.fit_temperature(z, y, bounds=(0.5, 20.0), at_bound="clip") == 0.5
    assert cal.nll(-z, y, 100.0) < cal.nll(-z, y, 99.0) and cal.nll(z, y, 0.5) < cal.nll(z, y, 0.51)
    z2, y2 = _sample(n=500, t_true=2.5, seed=1)  # an interior optimum is the same either way
    assert cal.fit_temperature(z2, y2, at_bound="clip") == cal.fit_temperature(z2, y2)
    with pytest.raises(ValueError, match="at_bound"):
        cal.fit_temperature(z2, y2, at_bound="ignore")


@pytest.mark.parametrize("n_bins", [1, 5, 15])
def test_ece_matches_a_loop(n_bins):
    z, y = _sample(n=700, t_true=0.7, seed=4)
    for t in (1.0, 0.5):
        assert cal.expected_calibration_error(z, y, n_bins, t) == pytest.approx(
            _np_ece(z.numpy(), y.numpy(), n_bins, t), abs=1e-12)


def test_ece_by_hand():
    # two classes; confidences 0.9, 0.9 (one right, one wrong) and 0.6 (right); 10 bins:
    # bin (0.8, 0.9]: acc 0.5, conf 0.9 -> 2/3 * 0.4; bin (0.5, 0.6]: acc 1, conf 0.6 -> 1/3 * 0.4
    lg = math.log
    z = torch.tensor([[lg(9.0), 0.0], [lg(9.0), 0.0], [lg(1.5), 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 1, 0])
    assert cal.expected_calibration_error(z, y, 10) == pytest.approx(2 / 3 * 0.4 + 1 / 3 * 0.4, abs=1e-12)


def test_temperature_scaling_lowers_nll_and_keeps_predictions():
    z, y = _sample(n=3000, t_true=3.0, seed=5)
    t = cal.fit_temperature(z, y)
    assert cal.nll(z, y, t) < cal.nll(z, y, 1.0)
    assert cal.expected_calibration_error(z, y, temperature=t) < cal.expected_calibration_error(z, y)
    assert torch.equal((z / t).argmax(1), z.argmax(1))


def test_loss_functions():
    z, y = _sample(n=50, seed=6)
    t = 2.0
    ref = np.array([_np_nll(z[i: i + 1].numpy(), y[i: i + 1].numpy(), t) for i in range(50)])
    assert np.allclose(cal.calibrated_ce(t)(z, y).numpy(), ref, rtol=1e-12, atol=1e-12)
    assert float(cal.calibrated_ce(t, "sum")(z, y)) == pytest.approx(ref.sum(), rel=1e-12)
    zs = z.numpy()
    other = np.array([max(v for j, v in enumerate(row) if j != lab) for row, lab in zip(zs, y.numpy())])
    ref_m = other - zs[np.arange(50), y.numpy()]
    assert np.array_equal(cal.negative_margin(z, y).numpy(), ref_m)
    assert torch.equal(cal.negative_margin(z, y) > 0, z.argmax(1) != y)
    with pytest.raises(ValueError):
        cal.calibrated_ce(0.0)
    with pytest.raises(ValueError, match="reduction"):
        cal.calibrated_ce(1.0, "mean")


def test_model_logits_over_a_dataset():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (13, 3, 4, 4), generator=g, dtype=torch.uint8)
    ds = fdata.Dataset(images, torch.arange(13) % 3, ["a", "b", "c"])
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 3)).train()
    z, y = cal.model_logits(model, ds, "cpu", batch_size=5)
    assert z.shape == (13, 3) and z.dtype == torch.float32 and torch.equal(y, ds.labels)
    with torch.no_grad():
        ref = model(images.float() / 255).double()
    assert torch.allclose(z.double(), ref, atol=1e-5)
    assert model.training  # mode restored
