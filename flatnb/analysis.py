"""Analysis helpers shared by the experiment chapters.

* :func:`scaled_head` — the temperature-scaled copy ``f_s`` (weight *and* bias times ``s``).
* :func:`align_at_flip`, :func:`step_summary` — per-step curves of attack trajectories,
  by raw step or aligned at each example's flip step.
* :func:`valley_stats` — the per-example numbers behind the "uncanny valley" shape.
* :func:`uncanny_valley_figure` — the shared figure (later chapters call it for other models;
  ``axes=``/``label=`` overlay several models).
* :func:`basin_width` — attack iterations before the loss takes off (PAPER §5, E2).
* :func:`fit_stump`, :func:`cross_validate_stump` — a one-feature decision stump and its
  k-fold cross-validation (plain torch/numpy).
* :func:`claim`, :func:`save_claims`, :func:`load_claims` — each chapter's verdicts on the paper's
  claims, collected by the verdict chapter.

Trajectories are :class:`flatnb.attacks.Trajectory` objects: (T+1, N) tensors, row 0
the starting point.  ``flip_step`` is the first iterate whose prediction is wrong
(0: misclassified when clean, -1: never).
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn as nn

Tensor = torch.Tensor

# the quantities that uncanny_valley_figure can draw, with their axis labels
QUANTITIES = {
    "kappa_sq": r"$\kappa=\|w\|_F^2\,\mathrm{Tr}H$ (squared)",
    "kappa_unsq": r"$\kappa=\|w\|_F\,\mathrm{Tr}H$ (unsquared, [UV])",
    "kappa_neuron": r"$\kappa^\phi_{Tr}$ (neuron-wise)",
    "trace_h": r"$\mathrm{Tr}H$",
    "phi_sq": r"$\|\phi\|^2$",
    "loss": "CE loss",
    "p_y": r"$p_y$ (true class)",
    "p_top": r"$\max_j p_j$ (confidence)",
    "gini": r"$1-\|p\|^2$",
}


# ----------------------------------------------------------------------------- temperature


def scaled_head(model: nn.Module, s: float) -> nn.Module:
    """Deprecated name of :func:`flatnb.models.scale_head`."""
    from flatnb.models import scale_head

    return scale_head(model, s)


# ----------------------------------------------------------------------------- trajectories


def cat_results(results: list):
    """Deprecated name of :func:`flatnb.attacks.cat_results`."""
    from flatnb.attacks import cat_results as _cat

    return _cat(results)


def _values(traj, name: str) -> Tensor:
    if name == "trace_h":
        return traj.gini * traj.phi_sq
    if not hasattr(traj, name):
        raise ValueError(f"unknown trajectory quantity {name!r}; choose one of {sorted(QUANTITIES)}")
    return getattr(traj, name)


def align_at_flip(values: Tensor, flip_step: Tensor, before: int, after: int) -> tuple[np.ndarray, Tensor]:
    """Re-index (T+1, N) per-step values at each example's flip step.

    Returns ``offsets`` (``-before .. after``) and a (before+after+1, N') float
    tensor whose row ``j`` holds the value at step ``flip_step + offsets[j]``
    (NaN where that step lies outside ``0 .. T``).  Only examples that start
    correctly classified and flip during the attack (``flip_step >= 1``) are
    kept: the others have no flip to align at.
    """
    if values.dim() != 2 or flip_step.dim() != 1 or values.shape[1] != flip_step.shape[0]:
        raise ValueError(f"values must be (T+1, N) and flip_step (N,), got {tuple(values.shape)}, {tuple(flip_step.shape)}")
    if before < 0 or after < 0:
        raise ValueError(f"before and after must be >= 0, got {before}, {after}")
    keep = flip_step >= 1
    v = values[:, keep].to(torch.float64)
    f = flip_step[keep].to(values.device)
    offsets = np.arange(-before, after + 1)
    idx = f[None, :] + torch.as_tensor(offsets, device=values.device)[:, None]
    valid = (idx >= 0) & (idx < values.shape[0])
    got = v.gather(0, idx.clamp(0, values.shape[0] - 1))
    return offsets, torch.where(valid, got, torch.full_like(got, float("nan")))


def step_summary(values: Tensor, quantiles=(0.25, 0.5, 0.75)) -> dict[float, np.ndarray]:
    """Per-row quantiles of a (L, N) tensor, ignoring NaNs (rows with no value give NaN)."""
    v = values.detach().to(torch.float64).cpu()
    q = torch.tensor(list(quantiles), dtype=torch.float64)
    out = torch.full((len(quantiles), v.shape[0]), float("nan"), dtype=torch.float64)
    for i in range(v.shape[0]):
        row = v[i][~torch.isnan(v[i])]
        if row.numel():
            out[:, i] = torch.quantile(row, q)
    return {float(qq): out[j].numpy() for j, qq in enumerate(quantiles)}


def valley_stats(traj, kappa: str = "kappa_sq", window: int = 1, num_classes: int = 10,
                 min_confidence: float = 0.0) -> dict[str, float]:
    """Fractions, over examples that flip during the attack, that describe the valley shape.

    ``peak_near_flip``: the step of maximal κ lies within ``window`` steps of the flip;
    ``flip_gt_start`` / ``flip_gt_last``: κ at the flip step exceeds κ at step 0 / at the last step;
    ``conf_rises``: the top-class confidence at the last step exceeds the one at the flip;
    ``loss_high``: the loss at the last step exceeds ``log k`` (a loss-change adversarial example
    with ε = log k, ``k = num_classes``);  ``n_flipped``: how many examples these fractions are over.
    ``min_confidence`` keeps only examples whose clean top-class probability is at least that
    (the rise towards the boundary needs a confident start; PAPER §6.6).
    """
    k_all = _values(traj, kappa).to(torch.float64)
    f = traj.flip_step
    keep = (f >= 1) & (traj.p_top[0] >= min_confidence)
    n = int(keep.sum())
    if n == 0:
        return {"n_flipped": 0}
    kv, fv = k_all[:, keep], f[keep]
    cols = torch.arange(n, device=kv.device)
    at_flip = kv[fv, cols]
    peak = kv.argmax(dim=0)
    p_top, loss = traj.p_top[:, keep], traj.loss[:, keep]
    out = {
        "n_flipped": n,
        "peak_near_flip": float(((peak - fv).abs() <= window).double().mean()),
        "flip_gt_start": float((at_flip > kv[0]).double().mean()),
        "flip_gt_last": float((at_flip > kv[-1]).double().mean()),
        "conf_rises": float((p_top[-1] > p_top[fv, cols]).double().mean()),
        "loss_high": float((loss[-1] > math.log(num_classes)).double().mean()),
    }
    return out


def uncanny_valley_figure(traj, title: str = "", before: int = 5, after: int = 10,
                          quantities=("kappa_sq", "kappa_unsq", "kappa_neuron", "trace_h", "phi_sq", "loss", "p_top"),
                          axes=None, label: str | None = None, color: str = "C0"):
    """The shared figure: median and quartile band per step of each quantity,
    by raw attack step (top row) and aligned at each example's flip step (bottom row).

    Every panel's y label names its κ convention.  κ-type quantities use a log axis.
    To overlay several models, create the figure once and pass its (2, len(quantities))
    ``axes`` with a ``label`` and ``color`` per model: the curves are drawn into those axes
    and the caller sets the title (``title`` is then ignored).
    Returns the matplotlib ``Figure``.
    """
    import matplotlib.pyplot as plt

    for q in quantities:
        if q not in QUANTITIES:
            raise ValueError(f"unknown quantity {q!r}; choose from {sorted(QUANTITIES)}")
    nq = len(quantities)
    keep = traj.flip_step >= 1
    if not bool(keep.any()):
        raise ValueError("no example flips during the attack, so there is nothing to align; "
                         "use a stronger attack or more examples")
    own = axes is None
    if own:
        fig, axes = plt.subplots(2, nq, figsize=(2.9 * nq, 5.6), squeeze=False)
    else:
        axes = np.asarray(axes, dtype=object).reshape(2, -1) if np.size(axes) == 2 * nq else None
        if axes is None:
            raise ValueError(f"axes must hold 2 x {nq} matplotlib axes (one column per quantity)")
        fig = axes[0, 0].figure
    name = None if label is None else f"{label} (n={int(keep.sum())})"
    for j, q in enumerate(quantities):
        _valley_panels(axes[0, j], axes[1, j], traj, q, before, after, color=color, label=name)
    axes[0, 0].legend(fontsize=7)
    if own:
        fig.suptitle(f"{title} (n={int(keep.sum())} examples that flip; no random start)", fontsize=10)
        fig.tight_layout()
    return fig


def basin_width(loss: Tensor, rise: float | None = None, fraction: float | None = None) -> Tensor:
    """Attack iterations before the loss "takes off", per example, from (T+1, N) losses (row 0 clean).

    Exactly one criterion:

    * ``rise``: the first iterate ``t >= 1`` with ``loss[t] - loss[0] > rise`` (an absolute
      threshold, e.g. ``0.1 * log k``; with ``rise = ε`` this is the first loss-change
      adversarial example of the paper's Definition 4 along the path);
    * ``fraction``: the first iterate with ``loss[t] - loss[0] >= fraction * R``, where
      ``R = max_t (loss[t] - loss[0]) > 0`` is the largest rise along the path (scale-free:
      the step by which the loss has covered that fraction of its rise).

    Returns float64 (N,) iterate indices; ``inf`` where the criterion is never met within
    the T steps (for ``fraction``: where the loss never rises above its clean value), so a
    median of ``inf`` reads "wider than the attack is long".  With a fixed step size the
    width times the step is the distance travelled before take-off.
    """
    if not isinstance(loss, Tensor) or loss.dim() != 2 or loss.shape[0] < 2:
        raise ValueError(f"loss must be a (T+1, N) tensor with T >= 1 attack steps, got "
                         f"{tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__}")
    if (rise is None) == (fraction is None):
        raise ValueError("give exactly one of rise= (absolute loss increase) or fraction= (share of the largest rise)")
    v = loss.detach().to(torch.float64)
    if not bool(torch.isfinite(v).all()):
        raise ValueError("loss has NaN or inf entries; basin width is undefined there")
    up = v[1:] - v[:1]  # rise over the clean loss at iterates 1..T
    if rise is not None:
        if not math.isfinite(rise) or rise < 0:
            raise ValueError(f"rise must be a finite number >= 0, got {rise!r}")
        hit = up > rise
    else:
        if not (0 < fraction <= 1):
            raise ValueError(f"fraction must lie in (0, 1], got {fraction!r}")
        top = up.max(dim=0).values
        hit = (up >= fraction * top) & (top > 0)
    steps = torch.arange(1, v.shape[0], dtype=torch.float64, device=v.device)[:, None].expand_as(up)
    first = torch.where(hit, steps, torch.full_like(steps, math.inf)).min(dim=0).values
    return first


# ----------------------------------------------------------------------------- decision stump


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


# ----------------------------------------------------------------------------- comparison across models


def _flipping_columns(traj) -> Tensor:
    """Indices of the examples that start correct and flip during the attack (``flip_step >= 1``)."""
    return torch.nonzero(traj.flip_step >= 1)[:, 0]


def valley_medians(traj, quantity: str = "kappa_sq") -> dict[str, float]:
    """Median of ``quantity`` at the start, at the flip step and at the last step, over the examples
    that flip during the attack (NaN each when none flips); ``n_flipped`` says how many."""
    vals = _values(traj, quantity).to(torch.float64)
    cols = _flipping_columns(traj).to(vals.device)
    if cols.numel() == 0:
        return {"n_flipped": 0, "start": float("nan"), "flip": float("nan"), "end": float("nan")}
    flip = traj.flip_step.to(vals.device)[cols]
    # quantile(0.5), not Tensor.median: the latter returns the lower middle value for an even count
    return {"n_flipped": int(cols.numel()),
            "start": float(vals[0, cols].quantile(0.5)),
            "flip": float(vals[flip, cols].quantile(0.5)),
            "end": float(vals[-1, cols].quantile(0.5))}


def _valley_panels(ax_raw, ax_aligned, traj, quantity: str, before: int, after: int, color="C0",
                   label: str | None = None) -> int:
    """Median and quartile band of ``quantity`` over the flipping examples: by raw step on ``ax_raw``,
    aligned at the flip on ``ax_aligned`` (both rows describe the same examples).  ``label`` names the
    median line of one model among several (then the band gets no legend entry).  Returns how many
    examples flip (0: nothing drawn)."""
    cols = _flipping_columns(traj)
    for ax in (ax_raw, ax_aligned):
        ax.set_ylabel(QUANTITIES[quantity], fontsize=8)
        if quantity.startswith("kappa") or quantity in ("trace_h", "gini"):
            ax.set_yscale("log")
    ax_raw.set_xlabel("attack step")
    ax_aligned.set_xlabel("steps after the flip")
    ax_aligned.axvline(0, color="k", ls=":", lw=1)
    if cols.numel() == 0:
        for ax in (ax_raw, ax_aligned):
            ax.set_yscale("linear")
            ax.text(0.5, 0.5, "no example flips", ha="center", va="center", transform=ax.transAxes)
        return 0
    vals = _values(traj, quantity)
    raw = step_summary(vals[:, cols.to(vals.device)])
    offsets, aligned = align_at_flip(vals, traj.flip_step, before, after)
    al = step_summary(aligned)
    for ax, x, s in ((ax_raw, np.arange(vals.shape[0]), raw), (ax_aligned, offsets, al)):
        ax.plot(x, s[0.5], color=color, lw=1.8, label=label or "median")
        ax.fill_between(x, s[0.25], s[0.75], color=color, alpha=0.25, label="quartiles" if label is None else None)
    return int(cols.numel())


def valley_comparison_figure(trajs: dict, quantity: str = "kappa_sq", before: int = 5, after: int = 10,
                             title: str = "", sharey: bool = False):
    """The same valley figure for several models side by side: one column per entry of ``trajs``
    (name → :class:`flatnb.attacks.Trajectory`), top row by raw attack step, bottom row aligned at
    each example's flip step; median and quartile band over the examples that flip.

    A model none of whose examples flip gets an annotated empty column instead of an error, so a
    comparison still draws.  ``sharey`` puts every column on one y scale per row (κ magnitudes differ
    between architectures, so the default keeps each column's own).  Returns the ``Figure``.
    """
    import matplotlib.pyplot as plt

    if not trajs:
        raise ValueError("valley_comparison_figure needs at least one trajectory (name -> Trajectory)")
    if quantity not in QUANTITIES:
        raise ValueError(f"unknown quantity {quantity!r}; choose from {sorted(QUANTITIES)}")
    if before < 0 or after < 0:
        raise ValueError(f"before and after must be >= 0, got {before}, {after}")
    n = len(trajs)
    fig, axes = plt.subplots(2, n, figsize=(3.1 * n, 5.6), squeeze=False, sharey="row" if sharey else False)
    for j, (name, traj) in enumerate(trajs.items()):
        k = _valley_panels(axes[0, j], axes[1, j], traj, quantity, before, after, color=f"C{j % 10}")
        axes[0, j].set_title(f"{name}\n(n={k} flip)", fontsize=9)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(title or f"{QUANTITIES[quantity]} along PGD paths (no random start)", fontsize=10)
    fig.tight_layout()
    return fig
