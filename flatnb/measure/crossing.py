"""The uncanny valley measured finely: boundary crossings, the shape around them, and a null.

Walter et al. (2026, §5, E6) describe κ along an attack path: it rises towards the decision
boundary, peaks near the label flip and falls where the model is confidently wrong.  Recorded
iterates are coarse (one PGD step apart), so "near the flip" needs care: when the flip comes at step
1, any window around it contains the clean point, and a κ that only *falls* from the clean point
would count as "peaking near the flip".  This module

* locates each path's boundary crossing by bisection on the logit margin
  ``z_y - max_{j != y} z_j`` along the straight segment between the last correct and the first
  wrong iterate (:func:`boundary_crossing`, :func:`path_crossings`), and evaluates the closed-form
  flatness terms there and on a grid inside that segment;
* reads the shape per path against that refined path (:func:`valley_shape`): rise, peak inside the
  flip segment, fall, confident wrongness, loss above ``log k``, each a
  :class:`flatnb.stats.Fraction`;
* compares the peak position with two nulls: κ values shuffled along the path (the peak lands on a
  uniformly random point of the refined path) and a κ that only falls from the clean point (the
  peak sits at step 0), both fields of :class:`ValleyShape`;
* gathers the parts chapters 9 and 10 report per model (:func:`valley_parts`), so that E6 is measured
  one way in chapters 5, 9 and 10.

Paths are :class:`flatnb.measure.trajectory.Trajectory` objects recorded with ``record_inputs=True``
(``traj.x`` holds the iterates, (T+1, N, ...)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flatnb.curvature.last_layer import closed_form
from flatnb.models import check_contract
from flatnb.stats import EmptySelection, Fraction

Tensor = torch.Tensor
KAPPAS = ("kappa_sq", "kappa_unsq", "kappa_neuron")


def _margin(logits: Tensor, y: Tensor) -> Tensor:
    z_y = logits.gather(1, y[:, None])[:, 0]
    other = logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    return z_y - other


@torch.no_grad()
def _terms(model, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    phi = model.features(x)
    if phi.dtype in (torch.float16, torch.bfloat16):  # curvature is never taken in half precision
        phi = phi.float()
    w, b = model.head.weight.to(phi.dtype), model.head.bias
    logits = torch.nn.functional.linear(phi, w, None if b is None else b.to(phi.dtype))
    t = closed_form(phi, logits, w)
    out = {k: getattr(t, k) for k in KAPPAS}
    out["margin"] = _margin(logits, y)
    out["p_top"] = logits.softmax(dim=1).amax(dim=1)
    return out


@torch.no_grad()
def boundary_crossing(model, x_prev: Tensor, x_next: Tensor, y: Tensor, iters: int = 30,
                      grid: int = 8) -> dict[str, Tensor]:
    """Where the straight segment ``x_prev -> x_next`` crosses the decision boundary of label ``y``.

    ``x_prev`` must be classified as ``y`` (margin > 0) and ``x_next`` not (margin <= 0).
    Bisection on the margin ``m(a)`` of ``x_prev + a (x_next - x_prev)`` keeps ``m(lo) > 0 >= m(hi)``
    for ``iters`` halvings, then returns the point at ``a = hi`` (the first wrong point, within
    ``2**-iters`` of the crossing).  Returns per example (N,): ``alpha``, the flatness terms
    ``kappa_sq``/``kappa_unsq``/``kappa_neuron``, ``margin`` and ``p_top`` at the crossing, and
    ``grid_<kappa>`` (N, grid) at ``a = 1/(grid+1), ..., grid/(grid+1)`` inside the segment.
    """
    check_contract(model)
    if x_prev.shape != x_next.shape or x_prev.shape[0] != y.shape[0]:
        raise ValueError(f"x_prev, x_next must have one shape and y one label per row, got "
                         f"{tuple(x_prev.shape)}, {tuple(x_next.shape)}, {tuple(y.shape)}")
    if x_prev.shape[0] == 0:
        raise ValueError("boundary_crossing got no paths (no example flips?)")
    if not (bool(torch.isfinite(x_prev).all()) and bool(torch.isfinite(x_next).all())):
        raise ValueError("boundary_crossing got non-finite inputs; check the recorded iterates")
    if not isinstance(iters, int) or iters < 1 or not isinstance(grid, int) or grid < 0:
        raise ValueError(f"need iters >= 1 and grid >= 0 (integers), got {iters!r}, {grid!r}")
    was_training = model.training
    model.eval()
    try:
        m0 = _terms(model, x_prev, y)["margin"]
        m1 = _terms(model, x_next, y)["margin"]
        bad = (m0 <= 0) | (m1 > 0)
        if bool(bad.any()):
            raise ValueError(f"{int(bad.sum())} segments do not cross the boundary (rows "
                             f"{torch.nonzero(bad)[:5, 0].tolist()}...): x_prev must be correct and "
                             "x_next wrong; pass the iterates flip_step - 1 and flip_step")
        shape = (-1,) + (1,) * (x_prev.dim() - 1)
        d = x_next - x_prev
        lo = torch.zeros(len(y), device=x_prev.device, dtype=torch.float64)
        hi = torch.ones_like(lo)
        for _ in range(iters):
            mid = (lo + hi) / 2
            wrong = _terms(model, x_prev + mid.to(d.dtype).view(shape) * d, y)["margin"] <= 0
            hi = torch.where(wrong, mid, hi)
            lo = torch.where(wrong, lo, mid)
        out = _terms(model, x_prev + hi.to(d.dtype).view(shape) * d, y)
        out["alpha"] = hi
        grids = {k: [] for k in KAPPAS}
        for j in range(1, grid + 1):
            t = _terms(model, x_prev + (j / (grid + 1)) * d, y)
            for k in KAPPAS:
                grids[k].append(t[k])
        for k in KAPPAS:
            out["grid_" + k] = (torch.stack(grids[k], dim=1) if grid else
                                torch.empty(len(y), 0, device=x_prev.device))
        return out
    finally:
        model.train(was_training)


def path_crossings(model, traj, y: Tensor, iters: int = 30, grid: int = 8,
                   batch_size: int = 256) -> dict[str, Tensor]:
    """:func:`boundary_crossing` for every path of ``traj`` that starts correct and flips
    (``flip_step >= 1``), between iterates ``flip_step - 1`` and ``flip_step``.

    ``traj`` needs the iterates (``pgd(..., record=Recorder, record_inputs=True)``).  Returns the
    crossing's fields for those paths, plus ``cols`` (their columns in ``traj``), ``flip_step``
    and ``t_cross = flip_step - 1 + alpha`` (the crossing in units of attack steps).
    """
    if getattr(traj, "x", None) is None:
        raise ValueError("the trajectory has no iterates: attack with record=Recorder, record_inputs=True")
    if y.shape[0] != traj.flip_step.shape[0]:
        raise ValueError(f"y has {y.shape[0]} labels for {traj.flip_step.shape[0]} paths")
    cols = torch.nonzero(traj.flip_step >= 1)[:, 0]
    if cols.numel() == 0:
        raise EmptySelection("no path flips during the attack: nothing to locate (a model right about nothing, or an "
                             "attack too weak for it)")
    y = y.to(traj.x.device)
    parts = []
    for i in range(0, cols.numel(), batch_size):
        c = cols[i:i + batch_size].to(traj.x.device)
        f = traj.flip_step[c].to(traj.x.device)
        parts.append(boundary_crossing(model, traj.x[f - 1, c], traj.x[f, c], y[c], iters, grid))
    out = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    out["cols"] = cols
    out["flip_step"] = traj.flip_step[cols]
    out["t_cross"] = out["flip_step"].double() - 1 + out["alpha"].double().to(cols.device)
    return out


@dataclass
class ValleyShape:
    """Per-path shape of κ along refined paths (see :func:`valley_shape`)."""

    n: int
    rise: Fraction
    peak_in_segment: Fraction
    peak_in_segment_late: Fraction
    fall: Fraction
    conf_rises: Fraction
    loss_high: Fraction
    null_shuffle: float
    null_shuffle_late: float | None
    null_start: float
    z_shuffle_late: float | None
    peak_offset: Tensor
    flip_step: Tensor


def valley_shape(traj, cross: dict, kappa: str = "kappa_sq", num_classes: int = 10,
                 keep: Tensor | None = None) -> ValleyShape:
    """The valley's shape per path, on the path refined by its boundary crossing.

    The refined path of a flipping example is its recorded iterates ``x_0..x_T`` plus the grid
    points and the crossing inside the flip segment ``[flip_step - 1, flip_step]``.  Fractions over
    the paths (``keep``: a boolean mask over ``cross``'s paths, e.g. confident clean inputs):

    * ``rise``: κ at the crossing exceeds κ at the clean input;
    * ``peak_in_segment``: the largest κ of the refined path lies in the flip segment
      (``peak_in_segment_late``: the same over paths with ``flip_step >= 2``, where the segment does
      not contain the clean point, so a κ that only falls from the start cannot score);
    * ``fall``: κ at the last iterate is below κ at the crossing;
    * ``conf_rises``: the top-class probability at the last iterate exceeds the one at the crossing;
    * ``loss_high``: the loss at the last iterate exceeds ``log k`` (the paper's Definition 4 with
      ε = log k).

    Nulls for the peak (expected fraction): ``null_shuffle`` if κ were shuffled along each refined
    path (the peak uniformly on its points), ``null_start`` if κ only fell from the clean point
    (share of paths with ``flip_step == 1``).  ``z_shuffle_late`` is the normal-approximation
    z-score of the late count against the shuffle null (Poisson binomial mean and variance);
    the late fields are ``None`` (``Fraction(0, 0)``) when no path flips at step 2 or later.
    ``peak_offset``: the peak's position minus ``t_cross`` in attack steps, per kept path.
    """
    if kappa not in KAPPAS:
        raise ValueError(f"kappa must be one of {KAPPAS}, got {kappa!r}")
    cols = cross["cols"]
    n_all = cols.numel()
    keep = torch.ones(n_all, dtype=torch.bool) if keep is None else keep.cpu().bool()
    if keep.shape != (n_all,):
        raise ValueError(f"keep must be a mask over the {n_all} crossing paths, got {tuple(keep.shape)}")
    if not bool(keep.any()):
        raise EmptySelection("valley_shape: no path left after `keep` (no flipping path passes the selection, "
                             "e.g. no confident clean input: a weak model or too few test images)")
    sel = torch.nonzero(keep)[:, 0]
    c = cols.cpu()[sel]
    f = cross["flip_step"].cpu()[sel].long()
    path = getattr(traj, kappa)[:, c.to(getattr(traj, kappa).device)].double().cpu()  # (T+1, n)
    k_cross = cross[kappa].double().cpu()[sel]
    k_grid = cross["grid_" + kappa].double().cpu()[sel]  # (n, G)
    for name, v in (("path", path), ("crossing", k_cross), ("grid", k_grid)):
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"non-finite κ on the {name}; the model or the attack produced NaN/inf")
    T1, n, G = path.shape[0], sel.numel(), k_grid.shape[1]
    alpha = cross["alpha"].double().cpu()[sel]
    # positions (in attack steps) and values of the refined path's points
    steps = torch.arange(T1, dtype=torch.float64)[:, None].expand(T1, n)
    fr = torch.arange(1, G + 1, dtype=torch.float64) / (G + 1)
    pos = torch.cat([steps.T, (f[:, None] - 1) + fr[None, :], (f - 1 + alpha)[:, None]], dim=1)
    val = torch.cat([path.T, k_grid, k_cross[:, None]], dim=1)
    top = val.argmax(dim=1)
    t_peak = pos[torch.arange(n), top]
    in_seg = (t_peak >= f - 1) & (t_peak <= f)
    late = f >= 2
    # shuffle null: share of the refined path's points inside the flip segment
    p_null = (2 + G + 1) / (T1 + G + 1) * torch.ones(n, dtype=torch.float64)
    k_late = int(in_seg[late].sum())
    mu, var = float(p_null[late].sum()), float((p_null * (1 - p_null))[late].sum())
    t_cross = f - 1 + alpha
    p_top, loss = traj.p_top[:, c.to(traj.p_top.device)].cpu(), traj.loss[:, c.to(traj.loss.device)].cpu()
    return ValleyShape(
        n=n,
        rise=Fraction.of(k_cross > path[0]),
        peak_in_segment=Fraction.of(in_seg),
        peak_in_segment_late=Fraction.of(in_seg[late]) if bool(late.any()) else Fraction(0, 0),
        fall=Fraction.of(path[-1] < k_cross),
        conf_rises=Fraction.of(p_top[-1] > cross["p_top"].cpu()[sel]),
        loss_high=Fraction.of(loss[-1] > math.log(num_classes)),
        null_shuffle=float(p_null.mean()),
        null_shuffle_late=float(p_null[late].mean()) if bool(late.any()) else None,
        null_start=float((f == 1).double().mean()),
        z_shuffle_late=(k_late - mu) / math.sqrt(var) if var > 0 else None,
        peak_offset=t_peak - t_cross,
        flip_step=f,
    )


def flip_step_counts(flip_step: Tensor, steps: int) -> list[int]:
    """How many paths flip at each step ``1..steps`` (paths that never flip or start wrong excluded)."""
    f = flip_step.cpu().long()
    f = f[f >= 1]
    if bool((f > steps).any()):
        raise ValueError(f"flip steps above steps={steps}: pass the attack's number of steps")
    return torch.bincount(f, minlength=steps + 1)[1:].tolist()


def pool_shapes(shapes) -> ValleyShape:
    """Several models' :class:`ValleyShape` (``{label: shape}`` or a list, one kappa and selection) as one: each
    fraction pooled over the models' paths (counts added, :func:`flatnb.measure.pooled.pool`), the shuffle
    nulls averaged over the paths they refer to (all paths, late paths), the start null over all paths, the
    z-score recomputed from the pooled late count (the per-path null probabilities of every model), and
    ``peak_offset``/``flip_step`` concatenated in model order."""
    from flatnb.measure.pooled import pool

    got = list(shapes.values()) if isinstance(shapes, dict) else list(shapes)
    if not got:
        raise EmptySelection("pool_shapes got no shapes (no model in the list?)")
    n = sum(s.n for s in got)
    if n == 0:
        return _empty_shape()
    late = [(s.peak_in_segment_late.n, s.null_shuffle_late) for s in got if s.peak_in_segment_late.n]
    n_late = sum(k for k, _ in late)
    null_late = sum(k * p for k, p in late) / n_late if n_late else None
    var = sum(k * p * (1 - p) for k, p in late)
    k_late = sum(s.peak_in_segment_late.k for s in got)
    return ValleyShape(
        n=n,
        rise=pool([s.rise for s in got]),
        peak_in_segment=pool([s.peak_in_segment for s in got]),
        peak_in_segment_late=pool([s.peak_in_segment_late for s in got]),
        fall=pool([s.fall for s in got]),
        conf_rises=pool([s.conf_rises for s in got]),
        loss_high=pool([s.loss_high for s in got]),
        null_shuffle=sum(s.n * s.null_shuffle for s in got) / n,
        null_shuffle_late=null_late,
        null_start=sum(s.n * s.null_start for s in got) / n,
        z_shuffle_late=(k_late - n_late * null_late) / math.sqrt(var) if n_late and var > 0 else None,
        peak_offset=torch.cat([s.peak_offset for s in got]),
        flip_step=torch.cat([s.flip_step for s in got]),
    )


@dataclass
class ValleyRun:
    """One model's uncanny-valley measurement (chapter 5): the two attacks (``short``: PGD-ℓ∞ 8/255 × 10,
    ``long``: ε = 0.1 × 30, iterates dropped after the crossings are found), the crossings of the long attack's
    flipping paths (:func:`path_crossings`), ``confident`` (a mask over those paths: clean top-class
    probability at least the threshold) and ``shapes[(kappa, who)]`` (:func:`valley_shape` for each kappa of
    :data:`KAPPAS` and ``who`` in ``("all", "confident")``)."""

    short: object
    long: object
    cross: dict
    confident: Tensor
    shapes: dict


def valley_run(model, dataset, batch_size: int, device, confident: float, bisect: int, grid: int,
               short_attack: dict, long_attack: dict) -> ValleyRun:
    """Chapter 5's measurement on one model: ``short_attack`` and ``long_attack`` (keyword arguments of
    :func:`flatnb.attacks.pgd`, e.g. ``budgets.ATTACKS["pgd_linf_long"]``) over ``dataset`` with the recorder,
    the long attack's boundary crossings (``bisect`` halvings, ``grid`` points in the flip segment) and the
    valley's shape for every kappa, over all flipping paths and over those with a clean top-class probability
    of at least ``confident``. The long attack's iterates are released once the crossings are found (they
    take (T+1) × N images of memory)."""
    from flatnb import attacks
    from flatnb.measure.trajectory import Recorder

    if not 0.0 <= confident < 1.0:
        raise ValueError(f"confident is a top-class probability threshold in [0, 1), got {confident!r}")
    run = dict(batch_size=batch_size, device=device, record=Recorder)
    short = attacks.attack_dataset(attacks.pgd, model, dataset, **run, **short_attack)
    long = attacks.attack_dataset(attacks.pgd, model, dataset, **run, record_inputs=True, **long_attack)
    cross = path_crossings(model, long.trajectory, dataset.labels, iters=bisect, grid=grid)
    long.trajectory.x = None
    conf = long.trajectory.p_top[0, cross["cols"].to(long.trajectory.p_top.device)].cpu() >= confident
    shapes = {}
    for k in KAPPAS:
        shapes[k, "all"] = valley_shape(long.trajectory, cross, k)
        try:
            shapes[k, "confident"] = valley_shape(long.trajectory, cross, k, keep=conf)
        except EmptySelection:  # no confident flipping path on this model: an empty shape, pooled as n=0
            shapes[k, "confident"] = _empty_shape()
    return ValleyRun(short, long, cross, conf, shapes)


def _empty_shape() -> ValleyShape:
    empty = Fraction(0, 0)
    return ValleyShape(n=0, rise=empty, peak_in_segment=empty, peak_in_segment_late=empty, fall=empty,
                       conf_rises=empty, loss_high=empty, null_shuffle=0.0, null_shuffle_late=None,
                       null_start=0.0, z_shuffle_late=None, peak_offset=torch.empty(0, dtype=torch.float64),
                       flip_step=torch.empty(0, dtype=torch.long))


@dataclass
class ValleyParts:
    """Chapter 5's E6 quantities for one model's long attack, as chapters 9 and 10 report them
    (see :func:`valley_parts`)."""

    n_flipped: int
    n_confident: int
    rise: Fraction
    fall: Fraction
    conf_rises: Fraction
    loss_high: Fraction
    kappa_clean: Tensor
    kappa_cross: Tensor
    kappa_end: Tensor

    def fractions(self) -> dict[str, Fraction]:
        """``{"rise", "fall", "conf_rises", "loss_high"}``: the four fractions, in that order."""
        return {"rise": self.rise, "fall": self.fall, "conf_rises": self.conf_rises, "loss_high": self.loss_high}


def valley_parts(model, traj, y: Tensor, num_classes: int, confident: float, kappa: str = "kappa_sq",
                 iters: int = 30, grid: int = 8, batch_size: int = 256) -> ValleyParts:
    """The uncanny valley's parts for one model, measured exactly as chapter 5 measures them: the boundary
    crossing by bisection on the flip segment (:func:`path_crossings`), then :func:`valley_shape`.

    * ``rise``: κ at the crossing exceeds κ at the clean input, over the flipping paths whose clean top-class
      probability is at least ``confident`` (a rise needs a confident start; chapter 5's E6-rise row);
    * ``fall``: κ at the last iterate is below κ at the crossing; ``conf_rises``: the top-class probability
      at the last iterate exceeds the one at the crossing; ``loss_high``: the final loss exceeds ``log k``
      (``k = num_classes``); each over all flipping paths (chapter 5's E6-fall and E6-loss rows).

    ``kappa_clean``, ``kappa_cross``, ``kappa_end`` (float64, CPU): κ per flipping path at the clean input,
    at the crossing and at the last iterate.  A model on which no path flips (or no flipping path starts
    confident) gets ``Fraction(0, 0)`` for the fractions it cannot count, never an error or a NaN.
    ``traj`` needs the iterates (``record_inputs=True``); ``y`` are the true labels of its columns.
    """
    if not 0.0 <= confident <= 1.0:
        raise ValueError(f"confident is a top-class probability in [0, 1], got {confident!r}")
    if kappa not in KAPPAS:
        raise ValueError(f"kappa must be one of {KAPPAS}, got {kappa!r}")
    if not bool((traj.flip_step >= 1).any()):
        none, empty = Fraction(0, 0), torch.empty(0, dtype=torch.float64)
        return ValleyParts(0, 0, none, none, none, none, empty, empty.clone(), empty.clone())
    cross = path_crossings(model, traj, y, iters=iters, grid=grid, batch_size=batch_size)
    cols = cross["cols"]
    conf = traj.p_top[0, cols.to(traj.p_top.device)].cpu() >= confident
    every = valley_shape(traj, cross, kappa, num_classes)
    rise = (valley_shape(traj, cross, kappa, num_classes, keep=conf).rise if bool(conf.any())
            else Fraction(0, 0))
    path = getattr(traj, kappa)[:, cols.to(getattr(traj, kappa).device)].double().cpu()
    return ValleyParts(n_flipped=every.n, n_confident=int(conf.sum()), rise=rise, fall=every.fall,
                       conf_rises=every.conf_rises, loss_high=every.loss_high, kappa_clean=path[0],
                       kappa_cross=cross[kappa].double().cpu(), kappa_end=path[-1])
