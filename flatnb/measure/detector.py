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
  distribution, so adversarial and clean inputs look alike to a confidence score;
* **a κ-aware adaptive attack** (:func:`kappa_aware_attack`): PGD (:func:`flatnb.attacks.pgd`) on a loss
  that first flips the label and then, while the input stays misclassified, pulls ``log κ`` onto a value
  drawn from the clean inputs' κ (:func:`kappa_matching_loss`, built on the float32-safe :func:`log_kappa_sq`).

Scores are plain 1-D arrays (numpy or torch), labels 0 (clean) / 1 (adversarial), groups the image
index of each sample.  The stump is :func:`flatnb.measure.stump.fit_stump` (one threshold on one number).
"""
from __future__ import annotations

import numpy as np
import torch

from flatnb import attacks
from flatnb import data as fdata
from flatnb.attacks.losses import true_margin
from flatnb.curvature import require_eval
from flatnb.curvature.last_layer import closed_form
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


def accuracy_ci(correct, groups, n_boot: int = 1000, seed: int = 0, level: float = 0.95):
    """``(accuracy, lo, hi)``: the share of correct decisions and its percentile-bootstrap interval, resampling
    images (``groups``) with replacement and keeping each image's samples together. A detector decides on the
    clean input *and* the adversarial example of each image, two decisions that are not independent, so a
    Wilson interval over the 2n decisions would be too narrow."""
    c = _arr(correct, "correct").astype(np.float64)
    g = np.asarray(groups)
    if c.shape != g.shape or c.ndim != 1 or c.size == 0:
        raise ValueError(f"correct and groups must be equal-length 1-D arrays, got {c.shape} and {g.shape}")
    if not np.isin(c, (0.0, 1.0)).all():
        raise ValueError("correct must hold 0/1 (or bool) decisions")
    uniq, inv = np.unique(g, return_inverse=True)
    k, m = np.bincount(inv, weights=c), np.bincount(inv).astype(np.float64)  # correct and samples per image
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, uniq.size, (n_boot, uniq.size))
    boots = k[pick].sum(1) / m[pick].sum(1)
    a = (1 - level) / 2
    return float(c.mean()), float(np.quantile(boots, a)), float(np.quantile(boots, 1 - a))


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
    :class:`flatnb.stats.Fraction` over all decisions), ``accuracy_ci`` (the same with an image-bootstrap interval,
    :func:`accuracy_ci`: the one to decide on), ``fold_accuracies``, ``polarity`` (per fold), ``auroc``
    ``(estimate, lo, hi)`` with an image-bootstrap interval, and ``tpr`` (a Fraction of the
    adversarial inputs detected at a false-positive rate of at most ``fpr`` on clean inputs)."""
    oriented, pred, accs, pols = out_of_fold_scores(scores, labels, groups, folds, seed)
    t = _arr(labels, "labels", np.int64)
    tpr = tpr_at_fpr(oriented, t, fpr)
    n1 = int(t.sum())
    return dict(accuracy=Fraction(int((pred == t).sum()), t.size), fold_accuracies=accs,
                accuracy_ci=accuracy_ci(pred == t, groups, n_boot, seed),
                polarity=pols, auroc=auroc_ci(oriented, t, groups, n_boot, seed),
                tpr=Fraction(int(round(tpr * n1)), n1))


# ----------------------------------------------------------------------------- the κ-aware adaptive attack

def log_kappa_sq(phi: torch.Tensor, logits: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``log κ = log ||w||_F^2 + log(1 - ||p||^2) + log ||phi||^2`` per sample (N,), differentiable.

    The same quantity as :func:`flatnb.curvature.closed_form`'s ``kappa_sq``, in the log domain:
    ``1 - ||p||^2 = sum_j p_j (1 - p_j)`` with ``log(1 - p_j) = logsumexp_{i != j} log p_i``, so a
    confidently classified input (whose κ underflows to 0 in float32) keeps a finite log and a finite
    gradient. A zero feature vector (``||phi|| = 0``) is clamped to the smallest positive float."""
    if phi.dim() != 2 or logits.dim() != 2 or logits.shape[0] != phi.shape[0]:
        raise ValueError(f"phi must be (N, m) and logits (N, k), got {tuple(phi.shape)} and {tuple(logits.shape)}")
    k = logits.shape[1]
    if k < 2 or weight.shape != (k, phi.shape[1]):
        raise ValueError(f"weight must be (k, m) = {(k, phi.shape[1])} with k >= 2, got {tuple(weight.shape)}")
    logp = torch.log_softmax(logits, dim=1)
    eye = torch.eye(k, dtype=torch.bool, device=logits.device)
    log1m = torch.logsumexp(logp[:, None, :].masked_fill(eye, float("-inf")), dim=2)  # log(1 - p_j)
    log_gini = torch.logsumexp(logp + log1m, dim=1)
    tiny = torch.finfo(phi.dtype).tiny
    w_sq = weight.to(logits.dtype).pow(2).sum()
    return torch.log(w_sq) + log_gini + torch.log(phi.pow(2).sum(dim=1).clamp_min(tiny)).to(logits.dtype)


def kappa_matching_loss(weight: torch.Tensor, log_kappa_target: torch.Tensor, lam: float = 1.0,
                        margin: float = 0.0):
    """The κ-aware attacker's loss, a callable ``loss(phi, logits, y, target) -> (N,)`` for
    :func:`flatnb.attacks.pgd`:

        ``min(m(x), margin) - lam * [m(x) > 0] * |log κ(x) - log κ_target|``,

    with ``m(x) = max_{j != y} z_j - z_y`` (positive: misclassified). While the input is classified
    correctly the loss is the margin alone (the attack flips the label first); once it is wrong the
    attacker pulls ``log κ`` (:func:`log_kappa_sq`) onto its target and keeps a margin of at least
    ``margin`` (logits). PGD keeps the best *successful* iterate by this loss, i.e. the misclassified
    iterate closest to its target. ``log_kappa_target`` (N,) is natural-log κ per example; ``lam > 0``
    weighs the κ gap against the margin below ``margin`` (with ``margin = 0`` a sign-step attack is
    invariant to it)."""
    if not isinstance(lam, (int, float)) or isinstance(lam, bool) or not np.isfinite(lam) or lam <= 0:
        raise ValueError(f"lam must be a finite number > 0 (the weight of the κ gap), got {lam!r}")
    if not isinstance(margin, (int, float)) or isinstance(margin, bool) or not np.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be a finite number >= 0 (logits), got {margin!r}")
    tgt = torch.as_tensor(log_kappa_target)
    if tgt.dim() != 1 or not bool(torch.isfinite(tgt).all()):
        raise ValueError("log_kappa_target must be a 1-D tensor of finite natural logs of κ (one per example; "
                         "take torch.log of κ > 0)")

    def kappa_matching(phi, logits, y, target):
        if target is not None:
            raise ValueError("the κ-matching loss is untargeted; pass target=None")
        if y.shape[0] != tgt.shape[0]:
            raise ValueError(f"log_kappa_target holds {tgt.shape[0]} values for a batch of {y.shape[0]}")
        m = -true_margin(logits, y)
        gap = (log_kappa_sq(phi, logits, weight) - tgt.to(logits.device, logits.dtype)).abs()
        return torch.clamp(m, max=margin) - lam * (m > 0).to(logits.dtype) * gap

    return kappa_matching


def clean_and_adversarial(model, x_clean: torch.Tensor, x_adv: torch.Tensor, batch_size: int = 500) -> dict:
    """Detector scores of clean and adversarial inputs from one forward pass each: ``{field: (clean, adv)}``
    for ``kappa_sq``, ``kappa_neuron`` and ``p_top`` (the top-class probability), each (N,) float64 on
    the CPU (:func:`flatnb.curvature.closed_form`, the recorder's quantities; the head in float64)."""
    require_eval(model)
    if x_clean.shape != x_adv.shape:
        raise ValueError(f"x_clean and x_adv differ in shape: {tuple(x_clean.shape)} vs {tuple(x_adv.shape)}")
    out = {f: ([], []) for f in ("kappa_sq", "kappa_neuron", "p_top")}
    with torch.no_grad():
        for i in range(0, x_clean.shape[0], batch_size):
            for j, xb in enumerate((x_clean[i:i + batch_size], x_adv[i:i + batch_size])):
                phi = model.features(xb).double()  # κ in float64: no underflow on confident inputs
                bias = None if model.head.bias is None else model.head.bias.double()
                logits = torch.nn.functional.linear(phi, model.head.weight.double(), bias)
                terms = closed_form(phi, logits, model.head.weight.double())
                out["kappa_sq"][j].append(terms.kappa_sq)
                out["kappa_neuron"][j].append(terms.kappa_neuron)
                out["p_top"][j].append(logits.softmax(1).amax(1))
    return {f: tuple(torch.cat(v).double().cpu() for v in pair) for f, pair in out.items()}


def pair_samples(clean, adv, field: str):
    """``(scores, labels, groups)`` for a detector from per-image clean and adversarial scores (N,) each,
    transformed as :func:`samples` does (``log10`` for κ-type fields)."""
    c, a = (torch.as_tensor(v).double().cpu().ravel() for v in (clean, adv))
    if c.shape != a.shape:
        raise ValueError(f"clean and adv must hold one score per image each, got {c.numel()} and {a.numel()}")
    x = torch.cat([c, a])
    if field.startswith("kappa") or field in ("trace_h", "gini"):
        if bool((x < 0).any()):
            raise ValueError(f"{field} has negative values; it cannot be a flatness measure")
        x = torch.log10(x.clamp_min(1e-300))
    n = c.numel()
    labels = np.r_[np.zeros(n, dtype=np.int64), np.ones(n, dtype=np.int64)]
    return _arr(x, field), labels, np.r_[np.arange(n), np.arange(n)]


def kappa_aware_attack(model, dataset, batch_size: int, device, lam: float = 1.0, margin: float = 0.0,
                       generator: torch.Generator | None = None, **budget):
    """The κ-aware adaptive attack over ``dataset``: ``(result, scores, log_target)``.

    The attacker first measures ``log κ`` (:func:`log_kappa_sq`) of every clean image of ``dataset`` (the
    negatives a detector sees, misclassified ones included) and gives each image a target drawn (with
    ``generator``) from them; :func:`flatnb.attacks.pgd` then runs with :func:`kappa_matching_loss` and the
    keyword arguments ``budget`` (norm, eps, steps, step_size): it flips the label and moves κ onto the target
    while the input stays wrong, and its ``x_adv`` is the wrong iterate closest to the target. ``scores`` are
    :func:`clean_and_adversarial` of the clean images and ``x_adv``; ``log_target`` (N,) the natural-log
    targets. Cost: the budget's steps plus three forward passes per image."""
    require_eval(model)
    if "loss" in budget or "record" in budget:
        raise ValueError("kappa_aware_attack sets the loss itself and records no path; drop loss= and record=")
    kappa_matching_loss(model.head.weight, torch.zeros(1), lam, margin)  # validates lam and margin up front
    with torch.no_grad():
        ref = torch.cat([log_kappa_sq(phi, model.head(phi).float(), model.head.weight.float()).double().cpu()
                         for phi in (model.features(x).float() for x, _ in fdata.batches(dataset, batch_size,
                                                                                          device=device))])
    if not bool(torch.isfinite(ref).all()):
        raise ValueError("log κ of some clean images is not finite; check the model's weights and the inputs")
    n = len(dataset)
    log_target = ref[torch.randint(0, n, (n,), generator=generator)]
    results, xs, start = [], [], 0
    for x, y in fdata.batches(dataset, batch_size, device=device):
        loss = kappa_matching_loss(model.head.weight, log_target[start:start + len(y)], lam, margin)
        results.append(attacks.pgd(model, x, y, loss=loss, warn=False, **budget))
        xs.append(x)
        start += len(y)
    res = attacks.cat_results(results)
    return res, clean_and_adversarial(model, torch.cat(xs), res.x_adv, batch_size), log_target
