"""A flatness detector evaluated as a detector: grouped folds, AUROC, TPR at low FPR, a baseline,
and an adaptive attack.

Walter et al. (2026, §5, E5) fit a decision stump on the relative sharpness κ of clean and
adversarial inputs and report 5-fold accuracies of 0.92-0.93.  A detector needs more than that
(Carlini & Wagner 2017, "Adversarial examples are not easily detected"; Tramèr et al. 2020,
"On adaptive attacks to adversarial example defenses"):

* **folds grouped by image** (:func:`grouped_folds`): a clean image and its own adversarial example
  are always on the same side of a split, so the test fold holds images the stump has never seen;
* **threshold-free numbers** on out-of-fold scores (:func:`out_of_fold_scores`): the AUROC
  (:func:`auroc`, with a bootstrap interval over images, :func:`auroc_ci`) and the true-positive
  rate at a fixed false-positive rate (:func:`tpr_at_fpr`); the direction of each fold's rule is
  learnt on its training folds only;
* **a baseline**: the same evaluation on the maximum softmax probability (Hendrycks & Gimpel 2017),
  since per-input κ = ||w||² (1 - ||p||²) ||φ||² is close to a confidence score;
* **an adaptive attack** (:func:`confidence_matched_steps`): stop each attack path at the first wrong
  iterate whose top-class probability reaches a confidence drawn from the clean inputs'
  distribution, so adversarial and clean inputs look alike to a confidence score.

Scores are plain 1-D arrays (numpy or torch), labels 0 (clean) / 1 (adversarial), groups the image
index of each sample.  The stump is :func:`flatnb.measure.stump.fit_stump` (one threshold on one number).
"""
from __future__ import annotations

import numpy as np
import torch

from flatnb.measure.stump import fit_stump, predict_stump
from flatnb.stats import Fraction


def _arr(v, name: str, dtype=np.float64) -> np.ndarray:
    a = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
    a = a.astype(dtype).ravel()
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    if dtype == np.float64 and not np.isfinite(a).all():
        raise ValueError(f"{name} has {int((~np.isfinite(a)).sum())} non-finite values "
                         "(take log10 of κ only where κ > 0, or clamp it first)")
    return a


def _check(scores, labels, groups=None):
    s, t = _arr(scores, "scores"), _arr(labels, "labels", np.int64)
    if s.shape != t.shape:
        raise ValueError(f"scores and labels differ in length: {s.size} vs {t.size}")
    if not np.isin(t, (0, 1)).all():
        raise ValueError("labels must be 0 (clean) or 1 (adversarial)")
    if t.min() == t.max():
        raise ValueError("labels hold one class only; a detector needs clean and adversarial inputs")
    if groups is None:
        return s, t
    g = _arr(groups, "groups", np.int64)
    if g.shape != s.shape:
        raise ValueError(f"groups must give one image index per score, got {g.size} for {s.size}")
    return s, t, g


def auroc(scores, labels) -> float:
    """Area under the ROC curve: P(score of an adversarial input > score of a clean one), ties
    counting one half (the Mann-Whitney U statistic over n_1 n_0), in float64."""
    s, t = _check(scores, labels)
    order = np.argsort(s, kind="stable")
    ranks = np.empty(s.size, dtype=np.float64)
    ss = s[order]
    # average ranks over ties
    starts = np.r_[0, np.flatnonzero(ss[1:] != ss[:-1]) + 1]
    ends = np.r_[starts[1:], s.size]
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = 0.5 * (a + b - 1) + 1
    n1, n0 = int(t.sum()), int((1 - t).sum())
    return float((ranks[t == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def tpr_at_fpr(scores, labels, fpr: float = 0.05) -> float:
    """True-positive rate of the rule "adversarial if score > thr", with ``thr`` the smallest
    threshold whose false-positive rate on the clean inputs is at most ``fpr``."""
    if not 0 <= fpr < 1:
        raise ValueError(f"fpr must lie in [0, 1), got {fpr}")
    s, t = _check(scores, labels)
    neg, pos = np.sort(s[t == 0]), s[t == 1]
    allowed = int(np.floor(fpr * neg.size))  # clean inputs that may lie above the threshold
    thr = neg[neg.size - 1 - allowed]
    return float((pos > thr).mean())


def grouped_folds(groups, folds: int = 5, seed: int = 0) -> np.ndarray:
    """A fold index per sample such that all samples of one group (image) share a fold; groups are
    shuffled with ``seed`` and dealt round-robin."""
    g = _arr(groups, "groups", np.int64)
    uniq = np.unique(g)
    if folds < 2 or uniq.size < folds:
        raise ValueError(f"need folds >= 2 and at least that many groups, got folds={folds}, "
                         f"{uniq.size} groups")
    perm = np.random.default_rng(seed).permutation(uniq)
    fold_of_group = {int(v): i % folds for i, v in enumerate(perm)}
    return np.array([fold_of_group[int(v)] for v in g], dtype=np.int64)


def out_of_fold_scores(scores, labels, groups, folds: int = 5, seed: int = 0):
    """Grouped cross-validation of a stump: ``(oriented, predictions, accuracies, polarities)``.

    In each fold a stump (:func:`flatnb.measure.stump.fit_stump`) is fitted on the other folds; its
    polarity orients the held-out scores (``polarity * score``: larger means "adversarial"), so the
    direction of the rule is never chosen on test data.  ``oriented`` holds every sample's
    out-of-fold oriented score (for :func:`auroc`, :func:`tpr_at_fpr`), ``predictions`` its
    out-of-fold 0/1 prediction, ``accuracies`` the stump's test accuracy per fold, ``polarities``
    the fitted direction per fold (+1: adversarial if the score is large).
    """
    s, t, g = _check(scores, labels, groups)
    fold = grouped_folds(g, folds, seed)
    oriented, pred = np.empty_like(s), np.empty_like(t)
    accs, pols = [], []
    for f in range(folds):
        test = fold == f
        if np.unique(t[~test]).size < 2:
            raise ValueError(f"fold {f}: its training folds hold one class only")
        thr, pol, _ = fit_stump(s[~test], t[~test])
        oriented[test] = pol * s[test]
        pred[test] = predict_stump(s[test], thr, pol)
        accs.append(float((pred[test] == t[test]).mean()))
        pols.append(pol)
    return oriented, pred, np.array(accs), np.array(pols)


def auroc_ci(scores, labels, groups, n_boot: int = 1000, seed: int = 0, level: float = 0.95):
    """``(auroc, lo, hi)``: the AUROC and its percentile-bootstrap interval, resampling images
    (groups) with replacement and keeping each image's samples together."""
    s, t, g = _check(scores, labels, groups)
    est = auroc(s, t)
    uniq, inv = np.unique(g, return_inverse=True)
    members = [np.flatnonzero(inv == i) for i in range(uniq.size)]
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        pick = rng.integers(0, uniq.size, uniq.size)
        idx = np.concatenate([members[i] for i in pick])
        if t[idx].min() == t[idx].max():
            continue
        boots.append(auroc(s[idx], t[idx]))
    if len(boots) < n_boot // 2:
        raise ValueError("too few bootstrap samples held both classes; give more images")
    a = (1 - level) / 2
    return est, float(np.quantile(boots, a)), float(np.quantile(boots, 1 - a))


def confidence_matched_steps(traj, target_confidence, generator: torch.Generator | None = None):
    """The adaptive attack's stopping step per path: ``(steps, matched)``.

    A confidence-matching attacker runs the same attack but stops each path at the first iterate
    ``t >= 1`` that is misclassified (``pred != y``) and whose top-class probability reaches a target
    drawn (with ``generator``) from ``target_confidence`` (1-D: the clean inputs' top-class
    probabilities).  Because a PGD path does not depend on when it is stopped, this is read off a
    recorded trajectory.  Paths that never reach their target stop at their last wrong iterate
    (``matched`` False); paths that are never wrong stop at the last iterate.
    """
    conf = torch.as_tensor(target_confidence, dtype=torch.float64).ravel()
    if conf.numel() == 0 or not bool(torch.isfinite(conf).all()):
        raise ValueError("target_confidence must hold finite clean confidences")
    T1, n = traj.p_top.shape
    if T1 < 2:
        raise ValueError("the trajectory needs at least one attack step")
    idx = torch.randint(0, conf.numel(), (n,), generator=generator)
    target = conf[idx]
    p_top = traj.p_top.double().cpu()
    steps = torch.arange(T1)[:, None]
    wrong = (traj.margin.cpu() <= 0) & (steps >= 1)  # misclassified iterates after the start
    hit = wrong & (p_top >= target[None, :])
    big = torch.full_like(steps.expand(T1, n), T1)
    first_hit = torch.where(hit, steps.expand(T1, n), big).amin(dim=0)
    last_wrong = torch.where(wrong, steps.expand(T1, n), torch.full_like(big, -1)).amax(dim=0)
    matched = first_hit < T1
    out = torch.where(matched, first_hit, torch.where(last_wrong >= 1, last_wrong,
                                                       torch.full_like(first_hit, T1 - 1)))
    return out, matched


def samples(traj, field: str, end_step=None):
    """``(scores, labels, groups)`` for a detector from a recorded attack: every path's start (the
    clean input, label 0) and its end point (label 1), grouped by image.

    All paths count: clean inputs that are misclassified and attacks that failed are not dropped
    (a deployed detector sees them too).  ``end_step`` (N,) picks each path's end iterate (e.g.
    :func:`confidence_matched_steps`); default the last one.  κ-type fields (``kappa_*``,
    ``trace_h``, ``gini``) are returned as ``log10`` (a stump is invariant to monotone maps; the log
    only makes thresholds readable), with exact zeros (float32 underflow) at ``log10(1e-300)``.
    """
    v = getattr(traj, field).detach().double().cpu()
    n = v.shape[1]
    end = v[-1] if end_step is None else v[torch.as_tensor(end_step).long().cpu(), torch.arange(n)]
    x = torch.cat([v[0], end])
    if field.startswith("kappa") or field in ("trace_h", "gini"):
        if bool((x < 0).any()):
            raise ValueError(f"{field} has negative values; it cannot be a flatness measure")
        x = torch.log10(x.clamp_min(1e-300))
    labels = np.r_[np.zeros(n, dtype=np.int64), np.ones(n, dtype=np.int64)]
    groups = np.r_[np.arange(n), np.arange(n)]
    return _arr(x, field), labels, groups


def evaluate(scores, labels, groups, folds: int = 5, seed: int = 0, fpr: float = 0.05,
             n_boot: int = 1000) -> dict:
    """A stump evaluated as a detector on grouped folds: ``accuracy`` (out-of-fold, a
    :class:`flatnb.stats.Fraction`), ``fold_accuracies``, ``polarity`` (per fold), ``auroc``
    ``(estimate, lo, hi)`` with an image-bootstrap interval, and ``tpr`` (a Fraction of the
    adversarial inputs detected at a false-positive rate of at most ``fpr`` on clean inputs)."""
    oriented, pred, accs, pols = out_of_fold_scores(scores, labels, groups, folds, seed)
    t = _arr(labels, "labels", np.int64)
    tpr = tpr_at_fpr(oriented, t, fpr)
    n1 = int(t.sum())
    return dict(accuracy=Fraction(int((pred == t).sum()), t.size), fold_accuracies=accs,
                polarity=pols, auroc=auroc_ci(oriented, t, groups, n_boot, seed),
                tpr=Fraction(int(round(tpr * n1)), n1))
