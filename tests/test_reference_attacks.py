"""APGD-CE of this package against the reference (pyautoattack, fra31's code), the skip of
misclassified points, and the AutoAttack / Square wrappers."""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from flatnb import attacks
from flatnb.measure.trajectory import Recorder

pyautoattack = pytest.importorskip("pyautoattack")
K = 5


class TinyCNN(nn.Module):
    def __init__(self, k: int = K, m: int = 16):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(72, m), nn.ReLU())
        self.head = nn.Linear(m, k)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


def make_data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(K, 1, 6, 6, generator=torch.Generator().manual_seed(123)) * 0.6 + 0.2
    y = torch.randint(0, K, (n,), generator=g)
    return (protos[y] + 0.15 * torch.randn(n, 1, 6, 6, generator=g)).clamp(0, 1), y


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = TinyCNN()
    x, y = make_data(1000, 0)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(100):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


EPS = 0.08
TOL = 0.04  # two runs of one random-start APGD-CE on 300 points; measured gap 0.000-0.01


def test_apgd_ce_matches_the_reference(trained):
    from pyautoattack.autopgd_base import APGDAttack

    x, y = make_data(300, 7)
    t0 = time.perf_counter()
    ours = attacks.apgd(trained, x, y, EPS, loss="ce", steps=100, generator=torch.Generator().manual_seed(0))
    t1 = time.perf_counter()
    ref = APGDAttack(trained, n_iter=100, norm="Linf", n_restarts=1, eps=EPS, seed=0, loss="ce", rho=0.75,
                     device="cpu")
    with torch.no_grad():
        adv = ref.perturb(x, y)
        ref_acc = float((trained(adv).argmax(1) == y).float().mean())
    t2 = time.perf_counter()
    clean = ours.clean_accuracy()
    assert 0.3 < ref_acc < clean - 0.1, "the budget must leave something to compare (neither 0 nor clean)"
    assert abs(ours.robust_accuracy() - ref_acc) <= TOL, (ours.robust_accuracy(), ref_acc)
    assert (ours.x_adv - x).abs().amax() <= EPS + 1e-6
    print(f"APGD-CE robust accuracy: flatnb {ours.robust_accuracy():.3f} ({t1 - t0:.2f} s), "
          f"reference {ref_acc:.3f} ({t2 - t1:.2f} s), clean {clean:.3f}")


def test_misclassified_points_are_skipped_by_default(trained):
    x, y = make_data(40, 3)
    y[:6] = (y[:6] + 1) % K  # some clean misclassifications
    seen = []
    r = attacks.apgd(trained, x, y, EPS, steps=10, generator=torch.Generator().manual_seed(1), record=Recorder,
                     on_iterate=lambda t, x_t, *a: seen.append(x_t.shape[0]))
    assert torch.equal(r.attacked, r.clean_correct) and not bool(r.attacked.all())
    skipped = ~r.attacked
    assert torch.equal(r.x_adv[skipped], x[skipped]) and bool(r.success[skipped].all())
    assert bool((r.flip_step[skipped] == 0).all()) and not bool(r.zero_grad[skipped].any())
    assert set(seen) == {40} and r.trajectory.loss.shape == (11, 40)
    # a skipped example's rows repeat its clean forward pass
    with torch.no_grad():
        clean_loss = F.cross_entropy(trained(x), y, reduction="none")
    torch.testing.assert_close(r.trajectory.loss[:, skipped], clean_loss[skipped].expand(11, -1))
    # the attacked rows are exactly APGD on the clean-correct subset (same generator draws)
    idx = torch.nonzero(r.attacked)[:, 0]
    sub = attacks.apgd(trained, x[idx], y[idx], EPS, steps=10, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(r.x_adv[idx], sub.x_adv)
    assert torch.equal(r.success[idx], sub.success)
    # attacking every point is still available, and cannot be less robust on the correct ones than skipping
    a = attacks.apgd(trained, x, y, EPS, steps=10, generator=torch.Generator().manual_seed(1),
                     attack_misclassified=True)
    assert bool(a.attacked.all())
    assert a.robust_accuracy() == pytest.approx(r.robust_accuracy(), abs=0.1)


def test_autoattack_and_square_wrappers(trained):
    x, y = make_data(12, 11)
    aa = attacks.autoattack(trained, x, y, EPS, norm="linf", version="standard")
    ap = attacks.apgd(trained, x, y, EPS, steps=100, generator=torch.Generator().manual_seed(0))
    assert isinstance(aa, attacks.AttackResult)
    assert (aa.x_adv - x).abs().amax() <= EPS + 1e-6 and aa.x_adv.min() >= 0 and aa.x_adv.max() <= 1
    assert aa.robust_accuracy() <= ap.robust_accuracy() + 1 / 12 + 1e-9  # the ensemble is at least as strong
    assert aa.clean_accuracy() == ap.clean_accuracy()
    sq = attacks.square(trained, x, y, EPS, n_queries=200)
    assert (sq.x_adv - x).abs().amax() <= EPS + 1e-6
    assert sq.robust_accuracy() <= sq.clean_accuracy()
    with torch.no_grad():
        assert torch.equal(sq.success & sq.clean_correct, (trained(sq.x_adv).argmax(1) != y) & sq.clean_correct)
    with pytest.raises(ValueError, match="NaN or inf"):
        bad = x.clone()
        bad[2, 0, 0, 0] = float("nan")
        attacks.autoattack(trained, bad, y, EPS)
    with pytest.raises(ValueError, match="version"):
        attacks.autoattack(trained, x, y, EPS, version="fast")


def test_a_reduced_autoattack_budget_reaches_every_attack(trained, monkeypatch):
    """The smoke profile's budget (n_iter, n_queries) is what the four attacks run with, APGD's step-size
    checkpoints derived as its constructor derives them; the default is the reference's untouched."""
    import pyautoattack

    seen = []
    real = pyautoattack.AutoAttack.run_standard_evaluation

    def spy(self, *a, **kw):
        seen.append({name: (getattr(self, name).n_iter if name != "square" else getattr(self, name).n_queries)
                     for name in ("apgd", "apgd_targeted", "fab", "square")} | {"n_iter_2": self.apgd.n_iter_2})
        return real(self, *a, **kw)

    monkeypatch.setattr(pyautoattack.AutoAttack, "run_standard_evaluation", spy)
    x, y = make_data(6, 12)
    r = attacks.autoattack(trained, x, y, EPS, n_iter=10, n_queries=20)
    assert (r.x_adv - x).abs().amax() <= EPS + 1e-6
    attacks.autoattack(trained, x, y, EPS)
    assert seen == [dict(apgd=10, apgd_targeted=10, fab=10, square=20, n_iter_2=2),
                    dict(apgd=100, apgd_targeted=100, fab=100, square=5000, n_iter_2=22)]
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="n_iter must be an integer"):
            attacks.autoattack(trained, x, y, EPS, n_iter=bad)
