"""flatnb.measure.detector: AUROC and TPR@FPR against brute-force references, grouped folds, the
bootstrap interval and the confidence-matching adaptive attack."""
import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from flatnb.measure import detector as de


def _brute_auroc(s, t):
    pos, neg = s[t == 1], s[t == 0]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auroc_matches_the_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = rng.integers(4, 40)
        s = rng.integers(0, 6, n).astype(float)  # many ties
        t = rng.integers(0, 2, n)
        if t.min() == t.max():
            continue
        assert de.auroc(s, t) == pytest.approx(_brute_auroc(s, t), abs=1e-12)
    assert de.auroc([0, 1, 2, 3], [0, 0, 1, 1]) == 1.0
    assert de.auroc([3, 2, 1, 0], [0, 0, 1, 1]) == 0.0


def test_tpr_at_fpr_respects_the_false_positive_budget():
    rng = np.random.default_rng(1)
    neg, pos = rng.normal(0, 1, 200), rng.normal(1.5, 1, 300)
    s, t = np.r_[neg, pos], np.r_[np.zeros(200), np.ones(300)]
    for fpr in (0.0, 0.05, 0.2):
        tpr = de.tpr_at_fpr(s, t, fpr)
        # brute force: the best threshold among the scores whose FPR stays within budget
        best = max(((pos > thr).mean() for thr in np.r_[s, np.inf] if (neg > thr).mean() <= fpr))
        assert tpr == pytest.approx(best)
    with pytest.raises(ValueError):
        de.tpr_at_fpr(s, t, 1.0)


def test_grouped_folds_keep_an_image_and_its_adversarial_example_together():
    groups = np.r_[np.arange(50), np.arange(50)]
    fold = de.grouped_folds(groups, 5, seed=3)
    for g in range(50):
        assert len(set(fold[groups == g])) == 1
    assert sorted(np.bincount(fold).tolist()) == [20] * 5
    with pytest.raises(ValueError):
        de.grouped_folds(np.arange(3), 5)


def test_out_of_fold_scores_learn_the_direction_on_training_folds():
    rng = np.random.default_rng(2)
    n = 100
    clean, adv = rng.normal(2, 0.5, n), rng.normal(0, 0.5, n)  # adversarial is *lower*
    s = np.r_[clean, adv]
    t = np.r_[np.zeros(n), np.ones(n)]
    g = np.r_[np.arange(n), np.arange(n)]
    oriented, pred, accs, pols = de.out_of_fold_scores(s, t, g, folds=5, seed=0)
    assert (pols == -1).all() and accs.mean() > 0.95
    assert de.auroc(oriented, t) > 0.97
    est, lo, hi = de.auroc_ci(oriented, t, g, n_boot=200)
    assert lo <= est <= hi and hi - lo < 0.1
    # pure noise: chance level, and the interval covers 0.5
    noise = rng.normal(0, 1, 2 * n)
    oriented, pred, accs, _ = de.out_of_fold_scores(noise, t, g, folds=5, seed=0)
    est, lo, hi = de.auroc_ci(oriented, t, g, n_boot=200)
    assert lo < 0.5 < hi


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="non-finite"):
        de.auroc([0.0, np.nan], [0, 1])
    with pytest.raises(ValueError, match="one class"):
        de.auroc([0.0, 1.0], [1, 1])
    with pytest.raises(ValueError, match="labels"):
        de.auroc([0.0, 1.0], [0, 2])


def test_confidence_matched_steps_stop_at_the_first_wrong_iterate_that_is_confident_enough():
    # 3 paths, 5 iterates; margin <= 0 means wrong
    margin = torch.tensor([[1, -1, -1, -1, -1], [1, 1, -1, -1, -1], [1, 1, 1, 1, 1]], dtype=torch.float32).T
    p_top = torch.tensor([[.9, .5, .6, .8, .95], [.9, .8, .4, .5, .6], [.9, .9, .9, .9, .9]]).T
    traj = SimpleNamespace(margin=margin, p_top=p_top, flip_step=torch.tensor([1, 2, -1]))
    steps, matched = de.confidence_matched_steps(traj, [0.75])  # one target for all
    assert steps.tolist() == [3, 4, 4] and matched.tolist() == [True, False, False]
    steps, matched = de.confidence_matched_steps(traj, [0.1])
    assert steps.tolist() == [1, 2, 4] and matched.tolist() == [True, True, False]
    with pytest.raises(ValueError):
        de.confidence_matched_steps(traj, [float("nan")])


def test_samples_and_evaluate_keep_every_path_and_pool_the_folds():
    # 6 iterates, 40 paths: κ falls along every path, so the end points are flatter than the start
    g = torch.Generator().manual_seed(0)
    kappa = torch.rand(6, 40, generator=g).cumsum(0).flip(0) + 1
    kappa[:, 0] = 0.0  # an underflowed path stays finite on the log scale
    traj = SimpleNamespace(kappa_sq=kappa, p_top=torch.rand(6, 40, generator=g))
    s, t, grp = de.samples(traj, "kappa_sq")
    assert s.shape == (80,) and np.isfinite(s).all() and t.sum() == 40
    assert s[0] == pytest.approx(-300.0)
    np.testing.assert_allclose(s[41:], np.log10(kappa[-1, 1:].double().numpy()))
    s2, _, _ = de.samples(traj, "kappa_sq", end_step=torch.full((40,), 2))
    np.testing.assert_allclose(s2[41:], np.log10(kappa[2, 1:].double().numpy()))
    np.testing.assert_allclose(de.samples(traj, "p_top")[0][:40], traj.p_top[0].double().numpy())
    out = de.evaluate(s, t, grp, folds=5, seed=0, n_boot=100)
    assert out["accuracy"].n == 80 and out["tpr"].n == 40
    # pooled out-of-fold accuracy equals the fold accuracies weighted by fold size (16 each)
    assert out["accuracy"].value == pytest.approx(out["fold_accuracies"].mean())
    lo, hi = out["auroc"][1:]
    assert lo <= out["auroc"][0] <= hi


# ----------------------------------------------------------------------------- the κ-aware adaptive attack

import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from flatnb import attacks  # noqa: E402
from flatnb.curvature import closed_form  # noqa: E402
from flatnb.data import Dataset  # noqa: E402


class _Tiny(nn.Module):
    """The flatnb model contract: features -> (N, m), head = final nn.Linear."""

    def __init__(self, k=5, m=16):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                  nn.Linear(8 * 4 * 4, m), nn.ReLU())
        self.head = nn.Linear(m, k)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


def _prototypes(n, seed, k=5):
    g = torch.Generator().manual_seed(seed)
    # close prototypes, little noise: a model that PGD pushes far past its boundary within eps = 0.1
    protos = torch.rand(k, 3, 8, 8, generator=torch.Generator().manual_seed(7)) * 0.1 + 0.45
    y = torch.randint(0, k, (n,), generator=g)
    x = (protos[y] + 0.05 * torch.randn(n, 3, 8, 8, generator=g)).clamp(0, 1)
    return (x * 255).round().to(torch.uint8), y


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = _Tiny()
    xi, y = _prototypes(1000, 0)
    x = xi.float() / 255
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(150):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    xi, y = _prototypes(200, 1)
    return model.eval(), Dataset(xi, y, [str(i) for i in range(5)])


def test_log_kappa_matches_the_closed_form_and_stays_finite_where_kappa_underflows():
    g = torch.Generator().manual_seed(0)
    phi = torch.rand(50, 6, generator=g, dtype=torch.float64) * 3
    w = torch.randn(4, 6, generator=g, dtype=torch.float64)
    z = phi @ w.T * torch.linspace(0.1, 20, 50, dtype=torch.float64)[:, None]
    ref = torch.log(closed_form(phi, z, w).kappa_sq)
    assert torch.allclose(de.log_kappa_sq(phi, z, w), ref, rtol=1e-10, atol=1e-10)
    # very confident logits: κ underflows to 0 in float32, the log stays finite and equals the float64 value
    big = z.clone()
    big[:, 0] += 150.0
    k32 = closed_form(phi.float(), big.float(), w.float()).kappa_sq
    assert bool((k32 == 0).any())
    lk = de.log_kappa_sq(phi.float(), big.float(), w.float())
    assert torch.allclose(lk.double(), torch.log(closed_form(phi, big, w).kappa_sq), rtol=1e-5)
    # differentiable: float64 gradcheck, and a finite float32 gradient in the underflow regime
    p = phi[:5].clone().requires_grad_(True)
    zz = z[:5].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: de.log_kappa_sq(a, b, w), (p, zz))
    b32 = big.float()[:8].requires_grad_(True)
    (gb,) = torch.autograd.grad(de.log_kappa_sq(phi.float()[:8], b32, w.float()).sum(), b32)
    assert bool(torch.isfinite(gb).all()) and bool((gb.abs() > 0).any())


def test_kappa_matching_loss_is_the_margin_until_the_flip_then_the_kappa_gap_and_refuses_bad_weights():
    g = torch.Generator().manual_seed(1)
    phi, w = torch.rand(6, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    z = phi @ w.T
    y = z.argmax(1)
    y[:3] = (y[:3] + 1) % 3  # the first three are misclassified
    tgt = torch.full((6,), -2.0, dtype=torch.float64)
    loss = de.kappa_matching_loss(w, tgt, lam=0.5, margin=0.2)(phi, z, y, None)
    m = -attacks.true_margin(z, y)
    gap = (de.log_kappa_sq(phi, z, w) - tgt).abs()
    want = torch.where(m > 0, m.clamp(max=0.2) - 0.5 * gap, m)
    assert torch.allclose(loss, want, rtol=0, atol=1e-12) and bool(torch.isfinite(loss).all())
    zr = z.clone().requires_grad_(True)
    (gz,) = torch.autograd.grad(de.kappa_matching_loss(w, tgt, 0.5)(phi, zr, y, None).sum(), zr)
    assert bool(torch.isfinite(gz).all())
    for bad in (0.0, -1.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="lam must be"):
            de.kappa_matching_loss(w, tgt, lam=bad)
    with pytest.raises(ValueError, match="margin must be"):
        de.kappa_matching_loss(w, tgt, margin=-0.1)
    with pytest.raises(ValueError, match="finite natural logs"):
        de.kappa_matching_loss(w, torch.tensor([0.0, float("-inf")]))
    with pytest.raises(ValueError, match="untargeted"):
        de.kappa_matching_loss(w, tgt)(phi, z, y, (y + 1) % 3)


def test_kappa_aware_attack_takes_the_kappa_detectors_separation_away(tiny):
    """On a small trained model plain PGD's end points are far flatter than clean inputs (κ AUROC near 1);
    the κ-aware attack, with the same budget, still flips them but lands on clean κ values (AUROC near 0.5)."""
    model, ds = tiny
    budget = dict(norm="linf", eps=0.1, steps=10, step_size=0.025)
    x = ds.images.float() / 255
    plain = attacks.pgd(model, x, ds.labels, **budget)
    sc_plain = de.clean_and_adversarial(model, x, plain.x_adv)
    res, sc, log_target = de.kappa_aware_attack(model, ds, 64, "cpu", generator=torch.Generator().manual_seed(0),
                                                **budget)
    ev_plain = de.evaluate(*de.pair_samples(*sc_plain["kappa_sq"], "kappa_sq"), n_boot=200)
    ev_aware = de.evaluate(*de.pair_samples(*sc["kappa_sq"], "kappa_sq"), n_boot=200)
    assert float(res.success.float().mean()) >= 0.9 * float(plain.success.float().mean())
    assert ev_plain["auroc"][1] > 0.85, ev_plain["auroc"]
    assert ev_aware["auroc"][2] < ev_plain["auroc"][1] - 0.2 and abs(ev_aware["auroc"][0] - 0.5) < 0.15, \
        (ev_plain["auroc"], ev_aware["auroc"])
    # x_adv stays in the ball and the box, and its κ is close to its target where the attack succeeded
    assert float((res.x_adv - x).abs().amax()) <= 0.1 + 1e-6 and 0 <= float(res.x_adv.min()) <= float(res.x_adv.max()) <= 1
    gap = (sc["kappa_sq"][1].log() - log_target).abs()[res.success.cpu()]
    assert float(gap.median()) < 0.5, float(gap.median())
    with pytest.raises(ValueError, match="lam must be"):
        de.kappa_aware_attack(model, ds, 64, "cpu", lam=-1.0, **budget)
    with pytest.raises(ValueError, match="drop loss"):
        de.kappa_aware_attack(model, ds, 64, "cpu", loss="ce", **budget)


def test_accuracy_ci_resamples_images_so_paired_decisions_widen_the_interval():
    rng = np.random.default_rng(0)
    n = 400
    per_image = (rng.random(n) < 0.8).astype(float)
    correct = np.r_[per_image, per_image]  # the clean input and its adversarial example decided alike
    est, lo, hi = de.accuracy_ci(correct, np.r_[np.arange(n), np.arange(n)], seed=1)
    assert est == correct.mean() and lo < est < hi
    # the same 2n decisions treated as independent: the interval shrinks by about sqrt(2)
    _, lo1, hi1 = de.accuracy_ci(correct, np.arange(2 * n), seed=1)
    assert 1.25 < (hi - lo) / (hi1 - lo1) < 1.6
    # independent decisions: close to the normal approximation's 2 * 1.96 * sqrt(p (1 - p) / 2n)
    p = correct.mean()
    assert abs((hi1 - lo1) - 2 * 1.96 * np.sqrt(p * (1 - p) / (2 * n))) < 0.01
    with pytest.raises(ValueError, match="0/1"):
        de.accuracy_ci([0.5, 1.0], [0, 1])
    with pytest.raises(ValueError, match="equal-length"):
        de.accuracy_ci([1, 0, 1], [0, 1])
