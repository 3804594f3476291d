"""A one-feature decision stump and its cross-validation (plain numpy), the detector of chapter 8.

Walter et al. (2026) suggest that relative flatness along an attack path separates clean
from adversarial inputs; :func:`fit_stump` is the simplest detector on one score (e.g. log κ).
"""
from __future__ import annotations

import numpy as np


def fit_stump(scores, labels) -> tuple[float, int, float]:
    """Best one-feature threshold classifier on the training data.

    Predicts ``1`` where ``polarity * (score - threshold) > 0``.  Candidate
    thresholds are the midpoints between consecutive distinct scores plus one
    below the minimum (predict one class everywhere).  Returns
    ``(threshold, polarity, training accuracy)``; ties go to the smallest
    threshold with polarity +1.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    t = np.asarray(labels).ravel()
    if s.shape != t.shape or s.size == 0:
        raise ValueError(f"scores and labels must be non-empty and of equal length, got {s.shape}, {t.shape}")
    if not np.all(np.isin(t, (0, 1))):
        raise ValueError("labels must be 0 or 1")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite (take log of κ only where κ > 0)")
    t = t.astype(np.int64)
    order = np.argsort(s, kind="stable")
    ss, tt = s[order], t[order]
    n, n1 = s.size, int(t.sum())
    # split after position i (0..n): left = ss[:i] predicted 0 under polarity +1
    ones_left = np.concatenate([[0], np.cumsum(tt)])
    zeros_left = np.arange(n + 1) - ones_left
    correct_pos = zeros_left + (n1 - ones_left)  # polarity +1: left 0, right 1
    correct_neg = n - correct_pos  # polarity -1: left 1, right 0
    # a split is only realisable between distinct values (or at the ends)
    ok = np.ones(n + 1, dtype=bool)
    ok[1:n] = ss[1:] > ss[:-1]
    cand_pos = np.where(ok, correct_pos, -1)
    cand_neg = np.where(ok, correct_neg, -1)
    i_pos, i_neg = int(np.argmax(cand_pos)), int(np.argmax(cand_neg))
    if cand_pos[i_pos] >= cand_neg[i_neg]:
        i, pol, c = i_pos, 1, cand_pos[i_pos]
    else:
        i, pol, c = i_neg, -1, cand_neg[i_neg]
    if i == 0:
        thr = ss[0] - 1.0
    elif i == n:
        thr = ss[-1] + 1.0
    else:
        thr = 0.5 * (ss[i - 1] + ss[i])
    return float(thr), pol, float(c) / n


def predict_stump(scores, threshold: float, polarity: int) -> np.ndarray:
    """0/1 predictions of a stump from :func:`fit_stump`."""
    s = np.asarray(scores, dtype=np.float64)
    return (polarity * (s - threshold) > 0).astype(np.int64)


def cross_validate_stump(scores, labels, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Test accuracy of a decision stump in each of ``folds`` stratified, shuffled folds.

    Each fold's stump is fitted on the other folds only.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    t = np.asarray(labels).ravel().astype(np.int64)
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    rng = np.random.default_rng(seed)
    fold_of = np.empty(s.size, dtype=np.int64)
    for c in (0, 1):
        idx = np.flatnonzero(t == c)
        if idx.size < folds:
            raise ValueError(f"class {c} has {idx.size} examples, fewer than folds={folds}")
        idx = rng.permutation(idx)
        fold_of[idx] = np.arange(idx.size) % folds
    accs = []
    for f in range(folds):
        test = fold_of == f
        thr, pol, _ = fit_stump(s[~test], t[~test])
        accs.append(float((predict_stump(s[test], thr, pol) == t[test]).mean()))
    return np.array(accs)
