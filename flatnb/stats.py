"""Uncertainty for the book's numbers: Wilson intervals for fractions, bootstrap intervals for the rest.

Every fraction the book reports carries a 95 % interval (:class:`Fraction`), and verdicts are
decided on the interval, not the point (:func:`flatnb.evidence.claims.grade`). The statistics are
``scipy.stats``'s (Wilson interval, ranks, Spearman, percentile bootstrap); this module keeps the book's
signatures and its refusals (an empty selection or a NaN is an error, never a NaN).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.stats
import torch

Z95 = 1.959963984540054


class EmptySelection(ValueError):
    """Nothing was counted: a fraction of 0 trials, an interval over no values, a selection that kept
    nothing. At the book's scales a sign of a broken selection (so an error, never a NaN); in the smoke
    profile, where a one-epoch model is right about almost nothing, expected (the dry run tolerates it)."""


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes in ``n`` trials (Wilson 1927).

    Unlike the normal approximation it stays inside [0, 1] and is sensible at k = 0 or k = n.
    """
    k, n = int(k), int(n)
    if n <= 0:
        raise EmptySelection(f"a fraction needs n >= 1 trials, got n={n}: nothing was counted "
                         "(check the selection that produced it, e.g. no example flipped)")
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, n], got k={k}, n={n}")
    p = k / n
    level = 0.95 if z == Z95 else float(2 * scipy.stats.norm.cdf(z) - 1)
    ci = scipy.stats.binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
    lo = 0.0 if k == 0 else max(0.0, float(ci.low))  # exact ends: rounding must not exclude p_hat
    hi = 1.0 if k == n else min(1.0, float(ci.high))
    return min(lo, p), max(hi, p)


@dataclass(frozen=True)
class Fraction:
    """``k`` of ``n`` with its 95 % Wilson interval; prints as ``0.82 [0.72, 0.89] (n=77)``."""

    k: int
    n: int

    @classmethod
    def of(cls, mask) -> "Fraction":
        """The fraction of true entries of a boolean tensor or array (NaN-free by construction)."""
        m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
        if m.dtype != bool:
            raise ValueError(f"Fraction.of needs a boolean mask, got dtype {m.dtype}")
        return cls(int(m.sum()), int(m.size))

    @property
    def value(self) -> float:
        if self.n == 0:
            raise EmptySelection("a fraction of 0 trials has no value (nothing was counted: check the selection)")
        return self.k / self.n

    @property
    def interval(self) -> tuple[float, float]:
        return wilson(self.k, self.n)

    @property
    def lo(self) -> float:
        return self.interval[0]

    @property
    def hi(self) -> float:
        return self.interval[1]

    def __str__(self) -> str:
        """``0.82 [0.72, 0.89] (n=77)``: :func:`fmt`, the book's one interval formatter."""
        if self.n == 0:
            return "— (n=0)"
        return fmt(self, n=True)

    def pct(self) -> str:
        """As a percentage: ``45.3 % [42.2, 48.4] (n=1,000)`` (:func:`fmt` with ``pct=True``)."""
        return fmt(self, pct=True, n=True)


def bootstrap_ci(values, statistic=np.median, n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """``(estimate, lo, hi)``: the statistic and its percentile-bootstrap interval over ``values`` (1-D).

    Non-finite values raise: an interval computed from a NaN is a NaN in disguise.
    """
    v = values.detach().cpu().double().numpy() if isinstance(values, torch.Tensor) else np.asarray(values, float)
    v = v.reshape(-1)
    if v.size == 0:
        raise EmptySelection("bootstrap_ci needs at least one value (the selection is empty)")
    if not np.isfinite(v).all():
        raise ValueError(f"bootstrap_ci got {int((~np.isfinite(v)).sum())} non-finite values; drop or fix them first")
    if v.size == 1 or np.all(v == v[0]):  # every resample is the same: scipy would warn of a degenerate interval
        est = float(statistic(v))
        return est, est, est
    res = scipy.stats.bootstrap((v,), statistic, n_resamples=n_boot, confidence_level=level, method="percentile",
                                vectorized=False, rng=np.random.default_rng(seed))
    return float(statistic(v)), float(res.confidence_interval.low), float(res.confidence_interval.high)


# ----------------------------------------------------------------------------- rank correlations

def _columns(*cols) -> list[np.ndarray]:
    out = [c.detach().cpu().double().numpy() if isinstance(c, torch.Tensor) else np.asarray(c, float) for c in cols]
    out = [c.reshape(-1) for c in out]
    if len({c.size for c in out}) != 1:
        raise ValueError(f"the columns must have the same length, got {[c.size for c in out]}")
    if out[0].size < 3:
        raise ValueError(f"a rank correlation needs at least 3 rows, got {out[0].size}")
    for i, c in enumerate(out):
        if not np.isfinite(c).all():
            raise ValueError(f"column {i} has {int((~np.isfinite(c)).sum())} non-finite values; drop or fix them first")
    return out


def _ranks(v: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions), 0-based (``scipy.stats.rankdata`` - 1)."""
    return scipy.stats.rankdata(v, method="average") - 1.0


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else float("nan")


def spearman(x, y) -> float:
    """Spearman's rank correlation of two columns (average ranks for ties).

    A constant column has no ranking: ``ValueError`` (a correlation of NaN is not a number to report)."""
    x, y = _columns(x, y)
    if np.all(x == x[0]) or np.all(y == y[0]):
        raise ValueError("a column is constant: its rank correlation is undefined")
    return float(scipy.stats.spearmanr(x, y).statistic)


def partial_spearman(x, y, z) -> float:
    """Spearman correlation of ``x`` and ``y`` with ``z`` partialled out: the Pearson correlation of the
    residuals of rank(x) and rank(y) after a least-squares line on rank(z) each."""
    x, y, z = _columns(x, y, z)
    rz = _ranks(z)
    design = np.stack([np.ones_like(rz), rz], 1)

    def resid(v):
        r = _ranks(v)
        return r - design @ np.linalg.lstsq(design, r, rcond=None)[0]

    r = _pearson(resid(x), resid(y))
    if not math.isfinite(r):
        raise ValueError("after partialling out z a column is constant: the correlation is undefined")
    return r


def correlation_ci(fn, *cols, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """``(estimate, lo, hi)`` for ``fn(*cols)`` (e.g. :func:`spearman`) with a percentile-bootstrap interval
    over the rows (resampled jointly). Resamples in which a column has no ranking are drawn again, so
    every interval comes from ``n_boot`` defined values; with few rows the interval is wide, and says so."""
    cols = _columns(*cols)
    est = fn(*cols)
    rng = np.random.default_rng(seed)
    n, boots, tries = cols[0].size, [], 0
    while len(boots) < n_boot:
        tries += 1
        if tries > 20 * n_boot:
            raise ValueError("almost every bootstrap resample had a constant column: too few distinct rows")
        idx = rng.integers(0, n, size=n)
        try:
            boots.append(fn(*(c[idx] for c in cols)))
        except ValueError:
            continue
    a = (1 - level) / 2
    return float(est), float(np.quantile(boots, a)), float(np.quantile(boots, 1 - a))


def as_interval(v) -> tuple[float, float, float]:
    """``(estimate, lo, hi)`` of a :class:`Fraction` (its Wilson interval), an ``(estimate, lo, hi)`` tuple
    (e.g. from :func:`bootstrap_ci`) or a plain number (an interval of width 0)."""
    if isinstance(v, Fraction):
        return (v.value, *v.interval)
    if isinstance(v, (int, float)):
        return (float(v),) * 3
    out = tuple(float(t) for t in v)
    if len(out) != 3:
        raise ValueError(f"an interval is (estimate, lo, hi), got {v!r}")
    return out


def fmt(v, spec: str = ".2f", pct: bool = False, signed: bool = False, suffix: str = "", n: bool = False) -> str:
    """One interval formatter for the whole book: ``0.82 [0.71, 0.89]`` from a :class:`Fraction`, an
    ``(estimate, lo, hi)`` tuple or a number. ``pct`` prints percentages (``45.3 % [42.2, 48.4]``), ``signed``
    a leading ``+`` on non-negative numbers, ``suffix`` a unit after each number (e.g. ``"×"``), ``n`` the
    sample size of a :class:`Fraction` (``(n=1000)``)."""
    est, lo, hi = as_interval(v)
    if not all(np.isfinite([est, lo, hi])):
        raise ValueError(f"cannot format a non-finite interval {est, lo, hi}: fix the measurement that gave it")
    sign = "+" if signed else ""
    scale, unit = (100.0, " %") if pct else (1.0, suffix)
    if pct and spec == ".2f":
        spec = ".1f"
    num = lambda t: format(scale * t, sign + spec)  # noqa: E731 - a local shorthand, not a chapter's
    out = f"{num(est)}{unit}" if lo == hi == est else f"{num(est)}{unit} [{num(lo)}, {num(hi)}]"
    if n and isinstance(v, Fraction):
        out += f" (n={v.n:,})"
    return out


def ratio_ci(num, den) -> tuple[float, float, float]:
    """``(estimate, lo, hi)`` of ``num / den`` for two positive intervals (see :func:`as_interval`): the
    ratio of the estimates, with the widest ends (``num``'s low over ``den``'s high, and the reverse). A
    conservative interval for a ratio of two independently estimated quantities."""
    a, b = as_interval(num), as_interval(den)
    if min(b) <= 0 or min(a) < 0:
        raise ValueError(f"a ratio interval needs a non-negative numerator and a positive denominator, got {a}, {b}")
    return a[0] / b[0], a[1] / b[2], a[2] / b[1]


def diff_ci(a, b) -> tuple[float, float, float]:
    """``(estimate, lo, hi)`` of ``a - b`` for two intervals: the difference of the estimates, with the
    widest ends (``a``'s low minus ``b``'s high, and the reverse). Conservative: it never claims a
    difference, or an equivalence, that the two intervals do not support."""
    x, y = as_interval(a), as_interval(b)
    return x[0] - y[0], x[1] - y[2], x[2] - y[1]


def fmt_capped(v, cap: float, spec: str = ".3g") -> str:
    """:func:`fmt` for a censored measurement: each number above ``cap`` prints as ``> cap`` (e.g. a basin
    width of a path that never took off within ``cap`` steps)."""
    one = lambda t: f"> {cap:g}" if t > cap else format(t, spec)  # noqa: E731 - a local shorthand
    est, lo, hi = as_interval(v)
    return one(est) if lo == hi == est else f"{one(est)} [{one(lo)}, {one(hi)}]"


def envelope(intervals) -> tuple[float, float, float]:
    """``(mean estimate, lowest lo, highest hi)`` over several intervals of one quantity (e.g. the seeds of a
    recipe): the range any of them allows, for comparing another model against the whole group."""
    got = [as_interval(v) for v in intervals]
    if not got:
        raise EmptySelection("envelope needs at least one interval")
    return float(np.mean([g[0] for g in got])), min(g[1] for g in got), max(g[2] for g in got)


def max_relative_error(a, ref) -> float:
    """``max |a - ref| / |ref|`` over all entries (both moved to the CPU, compared in ``ref``'s dtype): how far a
    computation is from a reference, e.g. a float64 closed form from 50-digit arithmetic (chapter 1)."""
    a = a.detach().cpu() if isinstance(a, torch.Tensor) else torch.as_tensor(a)
    ref = ref.detach().cpu() if isinstance(ref, torch.Tensor) else torch.as_tensor(ref)
    if not bool(torch.isfinite(a).all()) or not bool(torch.isfinite(ref).all()) or bool((ref == 0).any()):
        raise ValueError("max_relative_error needs finite values and a reference without zeros")
    return ((a.to(ref.dtype) - ref) / ref).abs().max().item()


# ----------------------------------------------------------------------------- permutation tests

def _rank_residuals(v: np.ndarray, z: np.ndarray) -> np.ndarray:
    rz = _ranks(z)
    design = np.stack([np.ones_like(rz), rz], 1)
    r = _ranks(v)
    return r - design @ np.linalg.lstsq(design, r, rcond=None)[0]


def rank_permutation_p(x, y, z=None, n_resamples: int = 9999, seed: int = 0) -> float:
    """Two-sided permutation p-value of Spearman's ρ(x, y) (``z=None``: y's order permuted against x's), or of the
    partial ρ given ``z`` (Kennedy 1995: the rank residuals of y on z permuted against those of x; the statistic is
    :func:`partial_spearman`'s). Exact (every permutation) when n! <= ``n_resamples``, else ``n_resamples`` seeded random
    ones with the observed ordering counted among them, so p >= 1 / (n_resamples + 1)."""
    if z is None:
        x, y = _columns(x, y)
        if np.all(x == x[0]) or np.all(y == y[0]):
            raise ValueError("a column is constant: its rank correlation is undefined")
        a, b = _ranks(x), _ranks(y)
    else:
        x, y, z = _columns(x, y, z)
        a, b = _rank_residuals(x, z), _rank_residuals(y, z)
        if not (np.ptp(a) > 0 and np.ptp(b) > 0):
            raise ValueError("after partialling out z a column is constant: the correlation is undefined")
    n = a.size
    a = (a - a.mean()) / np.linalg.norm(a - a.mean())
    b = (b - b.mean()) / np.linalg.norm(b - b.mean())
    obs = abs(float(a @ b)) * (1 - 1e-12)  # ties with the observed value count as extreme
    if math.factorial(n) <= n_resamples:  # every permutation: the exact p-value
        import itertools

        hits = sum(abs(float(a @ b[list(p)])) >= obs for p in itertools.permutations(range(n)))
        return hits / math.factorial(n)
    rng = np.random.default_rng(seed)
    perms = np.argsort(rng.random((n_resamples, n)), axis=1)
    hits = int((np.abs(b[perms] @ a) >= obs).sum())
    return (hits + 1) / (n_resamples + 1)  # the observed ordering counts as one of them (Phipson and Smyth 2010)


def rank_test(x, y, z=None, n_boot: int = 2000, n_resamples: int = 9999, seed: int = 0) -> dict:
    """Spearman's ρ(x, y), or the partial ρ given ``z``, with its percentile-bootstrap interval
    (:func:`correlation_ci`) and its two-sided permutation p-value (:func:`rank_permutation_p`):
    ``{"rho": (estimate, lo, hi), "p": p, "n": rows}``."""
    cols = (x, y) if z is None else (x, y, z)
    fn = spearman if z is None else partial_spearman
    rho = correlation_ci(fn, *cols, n_boot=n_boot, seed=seed)
    return {"rho": rho, "p": rank_permutation_p(x, y, z, n_resamples=n_resamples, seed=seed),
            "n": _columns(*cols)[0].size}


def fmt_test(t: dict) -> str:
    """``-0.42 [-0.71, -0.02], p = 0.031`` from :func:`rank_test`."""
    p = t["p"]
    return f"{fmt(t['rho'], signed=True)}, p = {p:.2g}" if p >= 0.001 else f"{fmt(t['rho'], signed=True)}, p < 0.001"
