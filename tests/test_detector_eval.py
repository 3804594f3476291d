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
