"""The on_iterate hook, the Recorder, the one field list and attack_dataset."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from flatnb import attacks
from flatnb.measure import trajectory
from flatnb.curvature import FlatnessTerms, closed_form
from flatnb.data import Dataset
from flatnb.measure.trajectory import Recorder

K = 5


class Tiny(nn.Module):
    def __init__(self, channels: int = 3, k: int = K, m: int = 12):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(channels * 36, m), nn.Tanh())
        self.head = nn.Linear(m, k)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Tiny()
    with torch.no_grad():
        m.head.weight.mul_(4)
    return m.eval()


def data(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 6, 6, generator=g), torch.randint(0, K, (n,), generator=g)


def test_field_list_is_flatness_terms_plus_attack_fields():
    assert set(trajectory.CURVATURE_FIELDS) == set(FlatnessTerms._fields) - {"weight_sq"}
    assert trajectory.FIELDS == trajectory.ATTACK_FIELDS + trajectory.CURVATURE_FIELDS
    assert {"loss", "p_y", "p_top", "pred", "margin", "delta_norm"} == set(trajectory.ATTACK_FIELDS)


@pytest.mark.parametrize("attack", ["pgd", "apgd", "fgsm"])
def test_on_iterate_sees_each_iterates_own_forward_pass(model, attack):
    x, y = data()
    seen = []

    def hook(t, x_t, phi, logits, loss):
        seen.append((t, x_t.clone(), phi.clone(), logits.clone(), loss.clone()))

    kw = dict(steps=4) if attack != "fgsm" else {}
    res = getattr(attacks, attack)(model, x, y, 0.1, on_iterate=hook, record=Recorder, **kw)
    T = res.trajectory.steps
    assert [s[0] for s in seen] == list(range(T + 1))
    for t, x_t, phi, logits, loss in seen:
        assert logits.dtype == torch.float32 and not logits.requires_grad
        with torch.no_grad():
            torch.testing.assert_close(phi, model.features(x_t))
            torch.testing.assert_close(logits, model(x_t))
            torch.testing.assert_close(loss, F.cross_entropy(model(x_t), y, reduction="none"))
        # the recorder and an independent closed form agree on the same pass
        terms = closed_form(phi.double(), logits.double(), model.head.weight.detach().double())
        for f in trajectory.CURVATURE_FIELDS:
            torch.testing.assert_close(getattr(res.trajectory, f)[t].double(), getattr(terms, f), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(res.trajectory.loss[t], loss)


def test_hook_with_restarts_restarts_the_count(model):
    x, y = data()
    ts = []
    attacks.pgd(model, x, y, 0.1, steps=3, random_start=True, restarts=2, on_iterate=lambda t, *a: ts.append(t),
                generator=torch.Generator().manual_seed(0))
    assert ts == [0, 1, 2, 3, 0, 1, 2, 3]


def test_truncate_and_cat_iterate_over_the_field_list(model):
    x, y = data()
    r = attacks.pgd(model, x, y, 0.1, steps=4, record=Recorder, record_inputs=True)
    tr = r.trajectory
    short = tr.truncate(2)
    both = trajectory.Trajectory.cat([tr, tr])
    for f in trajectory.FIELDS:
        assert getattr(short, f).shape == (3, 16)
        assert getattr(both, f).shape == (5, 32)
    assert short.x.shape == (3, 16, 3, 6, 6) and both.x.shape == (5, 32, 3, 6, 6)
    with pytest.raises(ValueError, match="missing"):
        trajectory.Trajectory(tr.flip_step, loss=tr.loss)


def _dataset(n=23, seed=1):
    x, y = data(n, seed)
    return Dataset(images=(x * 255).round().to(torch.uint8), labels=y, classes=[str(i) for i in range(K)])


@pytest.mark.parametrize("batch_size", [5, 23, 64])
def test_attack_dataset_equals_one_attack_per_batch(model, batch_size):
    ds = _dataset()
    got = attacks.attack_dataset(attacks.pgd, model, ds, batch_size, "cpu", eps=0.05, steps=3, record=Recorder)
    x = ds.images.float() / 255
    ref = attacks.pgd(model, x, ds.labels, 0.05, steps=3, record=Recorder)
    torch.testing.assert_close(got.x_adv, ref.x_adv)
    assert torch.equal(got.success, ref.success) and torch.equal(got.flip_step, ref.flip_step)
    for f in trajectory.FIELDS:
        torch.testing.assert_close(getattr(got.trajectory, f), getattr(ref.trajectory, f))


def test_attack_dataset_seeds_each_batch_and_casts(model):
    ds = _dataset()
    a = attacks.attack_dataset(attacks.pgd, model, ds, 8, "cpu", eps=0.05, steps=2, random_start=True, seed=3)
    b = attacks.attack_dataset(attacks.pgd, model, ds, 8, "cpu", eps=0.05, steps=2, random_start=True, seed=3)
    c = attacks.attack_dataset(attacks.pgd, model, ds, 8, "cpu", eps=0.05, steps=2, random_start=True,
                               seed=lambda i: 100 + i)
    assert torch.equal(a.x_last, b.x_last) and not torch.equal(a.x_last, c.x_last)
    # an int seed restarts every batch from the same generator state (the chapters' helpers did this)
    d0 = a.x_last[:8] - ds.images[:8].float() / 255
    d1 = a.x_last[8:16] - ds.images[8:16].float() / 255
    assert d0.shape == d1.shape
    m64 = Tiny().double().eval()
    r = attacks.attack_dataset(attacks.fgsm, m64, ds, 8, "cpu", dtype=torch.float64, eps=0.05)
    assert r.x_adv.dtype == torch.float64 and r.x_adv.shape[0] == 23
    with pytest.raises(ValueError, match="seed"):
        attacks.attack_dataset(attacks.fgsm, model, ds, 8, "cpu", eps=0.05, seed=1)
    with pytest.raises(ValueError, match="seed="):
        attacks.attack_dataset(attacks.pgd, model, ds, 8, "cpu", eps=0.05, generator=torch.Generator())
    with pytest.raises(ValueError, match="empty"):
        attacks.attack_dataset(attacks.pgd, model, Dataset(ds.images[:0], ds.labels[:0], ds.classes), 8, "cpu",
                               eps=0.05)


def test_attack_modules_import_nothing_from_curvature(model):
    """The attack loop records through a hook: the attacks import neither the recorder nor curvature, and
    record=True (which would need them) is refused with the fix."""
    import subprocess
    import sys

    code = ("import sys, flatnb.attacks as a; "
            "assert not [m for m in sys.modules if m.startswith(('flatnb.curvature', 'flatnb.measure'))]")
    subprocess.run([sys.executable, "-c", code], check=True)
    x, y = data()
    with pytest.raises(TypeError, match="record=flatnb.measure.trajectory.Recorder"):
        attacks.pgd(model, x, y, 0.1, steps=2, record=True)
