"""The uncanny-valley figures (experiment E6 of Walter et al. 2026), legible at the book's page width.

Every panel pair shows one recorded quantity (:data:`flatnb.measure.trajectory.FIELDS`) over the
examples that flip during the attack: median and quartile band by raw attack step, and aligned
at each example's flip step.  Pairs are laid out two to a row (at most four panels per row), in
a figure 7.5 inches wide whose fonts survive a PNG scaled to ~700 px; log axes carry a few
major ticks and no minor-tick labels.

* :func:`uncanny_valley_figure` — one model, several quantities (``axes=`` overlays models);
* :func:`valley_comparison_figure` — several models, one quantity;
* :func:`valley_axes` — the empty layout, for overlays.
"""
from __future__ import annotations

import numpy as np

from flatnb.stats import as_interval
from flatnb.measure.trajectory import FIELDS, align_at_flip, field_values, flipping_columns, step_summary

#: axis label of every recorded quantity (one per entry of :data:`flatnb.measure.trajectory.FIELDS`)
QUANTITIES = {
    "loss": "attack loss",
    "p_y": r"$p_y$ (true class)",
    "p_top": r"$\max_j p_j$ (confidence)",
    "pred": "predicted class",
    "margin": r"margin $z_y-\max_{j\neq y} z_j$",
    "delta_norm": r"$\|x_t-x\|$",
    "phi_sq": r"$\|\phi\|^2$",
    "gini": r"$1-\|p\|^2$",
    "trace_h": r"$\mathrm{Tr}H$",
    "kappa_sq": r"$\kappa=\|w\|_F^2\,\mathrm{Tr}H$ (squared)",
    "kappa_unsq": r"$\kappa=\|w\|_F\,\mathrm{Tr}H$ (unsq., [UV])",
    "kappa_neuron": r"$\kappa^\phi_{Tr}$ (neuron-wise)",
}
if set(QUANTITIES) != set(FIELDS):  # the field list in flatnb.measure.trajectory is the one source
    raise ImportError(f"figure labels {sorted(QUANTITIES)} do not match the recorded fields {sorted(FIELDS)}")

#: quantities drawn on a log axis
LOG_QUANTITIES = ("phi_sq", "gini", "trace_h", "kappa_sq", "kappa_unsq", "kappa_neuron")

WIDTH = 7.5  # inches: about 700 px at the book's page width, fonts below stay >= 8 px there
PAIRS_PER_ROW = 2  # two (raw, aligned) pairs: four panels per row
FONT = {"label": 9, "tick": 8, "title": 9.5, "legend": 8, "suptitle": 10.5}



def _layout(fig) -> None:
    """Tight layout unless the figure already has a layout engine (the chapters use constrained
    layout; calling tight_layout on such a figure warns)."""
    if fig.get_layout_engine() is None:
        fig.tight_layout()

def valley_axes(n: int, titles=None):
    """An empty figure for ``n`` (raw, aligned) panel pairs, two pairs per row.

    Returns ``(fig, axes)`` with ``axes`` a (2, n) object array: ``axes[0, j]`` the raw-step panel and
    ``axes[1, j]`` the aligned panel of pair ``j``.  ``titles`` (n strings) label the pairs."""
    import matplotlib.pyplot as plt

    if n < 1:
        raise ValueError(f"need at least one panel pair, got {n}")
    rows = -(-n // PAIRS_PER_ROW)
    cols = 2 * min(n, PAIRS_PER_ROW)
    fig, grid = plt.subplots(rows, cols, figsize=(WIDTH * cols / 4, 2.35 * rows + 0.6), squeeze=False)
    axes = np.empty((2, n), dtype=object)
    for j in range(n):
        r, c = divmod(j, PAIRS_PER_ROW)
        axes[0, j], axes[1, j] = grid[r, 2 * c], grid[r, 2 * c + 1]
        if titles is not None:
            axes[0, j].set_title(titles[j], fontsize=FONT["title"], loc="left")
    for extra in grid.flat[2 * n:]:
        extra.set_visible(False)
    fig.valley_axes = axes
    return fig, axes


def _style(ax, log: bool) -> None:
    from matplotlib.ticker import LogLocator, NullFormatter, NullLocator

    ax.tick_params(labelsize=FONT["tick"])
    if log:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, numticks=4))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_minor_formatter(NullFormatter())


def _valley_panels(ax_raw, ax_aligned, traj, quantity: str, before: int, after: int, color="C0",
                   label: str | None = None) -> int:
    """Median and quartile band of ``quantity`` over the flipping examples: by raw step on ``ax_raw``,
    aligned at the flip on ``ax_aligned`` (both describe the same examples).  ``label`` names the
    median line of one model among several (then the band gets no legend entry).  Returns how many
    examples flip (0: nothing drawn)."""
    cols = flipping_columns(traj)
    ax_raw.set_ylabel(QUANTITIES[quantity], fontsize=FONT["label"])
    ax_raw.set_xlabel("attack step", fontsize=FONT["label"])
    ax_aligned.set_xlabel("steps after the flip", fontsize=FONT["label"])
    ax_aligned.axvline(0, color="k", ls=":", lw=1)
    if cols.numel() == 0:
        for ax in (ax_raw, ax_aligned):
            _style(ax, False)
            ax.text(0.5, 0.5, "no example flips", ha="center", va="center", transform=ax.transAxes,
                    fontsize=FONT["label"])
        return 0
    log = quantity in LOG_QUANTITIES
    for ax in (ax_raw, ax_aligned):
        _style(ax, log)
    vals = field_values(traj, quantity)
    raw = step_summary(vals[:, cols.to(vals.device)])
    offsets, aligned = align_at_flip(vals, traj.flip_step, before, after)
    al = step_summary(aligned)
    for ax, x, s in ((ax_raw, np.arange(vals.shape[0]), raw), (ax_aligned, offsets, al)):
        ax.plot(x, s[0.5], color=color, lw=1.8, label=label or "median")
        ax.fill_between(x, s[0.25], s[0.75], color=color, alpha=0.25, label="quartiles" if label is None else None)
    return int(cols.numel())


def uncanny_valley_figure(traj, title: str = "", before: int = 5, after: int = 10,
                          quantities=("kappa_sq", "kappa_unsq", "kappa_neuron", "trace_h", "phi_sq", "loss", "p_top"),
                          axes=None, label: str | None = None, color: str = "C0"):
    """One model's valley: per quantity, median and quartile band by raw attack step (left panel)
    and aligned at each example's flip step (right panel), two quantities per row.

    Every panel's y label names its κ convention; κ-type quantities use a log axis.  To overlay
    several models, create the layout once with ``valley_axes(len(quantities))`` and pass its
    (2, len(quantities)) ``axes`` with a ``label`` and ``color`` per model: the curves are drawn
    into those axes and the caller sets the title (``title`` is then ignored).
    Returns the matplotlib ``Figure``.
    """
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
        fig, axes = valley_axes(nq)
    else:
        axes = np.asarray(axes, dtype=object).reshape(2, -1) if np.size(axes) == 2 * nq else None
        if axes is None:
            raise ValueError(f"axes must hold 2 x {nq} matplotlib axes (from valley_axes({nq}))")
        fig = axes[0, 0].figure
    name = None if label is None else f"{label} (n={int(keep.sum())})"
    for j, q in enumerate(quantities):
        _valley_panels(axes[0, j], axes[1, j], traj, q, before, after, color=color, label=name)
    axes[0, 0].legend(fontsize=FONT["legend"])
    if own:
        fig.suptitle(f"{title} (n={int(keep.sum())} examples that flip; no random start)".strip(),
                     fontsize=FONT["suptitle"])
        _layout(fig)
    return fig


def valley_comparison_figure(trajs: dict, quantity: str = "kappa_sq", before: int = 5, after: int = 10,
                             title: str = "", sharey: bool = False):
    """The same valley panels for several models: one (raw, aligned) pair per entry of ``trajs``
    (name → :class:`flatnb.measure.trajectory.Trajectory`), two models per row; median and quartile band
    over the examples that flip.  ``fig.valley_axes`` is the (2, n) array of panels.

    A model none of whose examples flip gets an annotated empty pair instead of an error, so a
    comparison still draws.  ``sharey`` puts every panel of a kind (raw / aligned) on one y range
    (κ magnitudes differ between architectures, so the default keeps each model's own).
    """
    if not trajs:
        raise ValueError("valley_comparison_figure needs at least one trajectory (name -> Trajectory)")
    if quantity not in QUANTITIES:
        raise ValueError(f"unknown quantity {quantity!r}; choose from {sorted(QUANTITIES)}")
    if before < 0 or after < 0:
        raise ValueError(f"before and after must be >= 0, got {before}, {after}")
    n = len(trajs)
    fig, axes = valley_axes(n)
    for j, (name, traj) in enumerate(trajs.items()):
        k = _valley_panels(axes[0, j], axes[1, j], traj, quantity, before, after, color=f"C{j % 10}")
        axes[0, j].set_title(f"{name} (n={k} flip)", fontsize=FONT["title"], loc="left")
    if sharey:
        for r, row in enumerate(axes):
            # the aligned row always holds the flip marker: a drawn panel has more than that
            drawn = [ax for ax in row if len(ax.lines) > (1 if r == 1 else 0)]
            if drawn:
                lo = min(ax.get_ylim()[0] for ax in drawn)
                hi = max(ax.get_ylim()[1] for ax in drawn)
                for ax in drawn:
                    ax.set_ylim(lo, hi)
    axes[0, 0].legend(fontsize=FONT["legend"])
    fig.suptitle(title or f"{QUANTITIES[quantity]} along PGD paths (no random start)", fontsize=FONT["suptitle"])
    _layout(fig)
    return fig


__all__ = ["QUANTITIES", "LOG_QUANTITIES", "valley_axes", "uncanny_valley_figure", "valley_comparison_figure"]


# ----------------------------------------------------------------------------- the atlas (chapter 13)

#: the atlas's panels: (entry field, axis label); fractions and (estimate, lo, hi) tuples both work
ATLAS_PANELS = (("aa_linf", "AutoAttack ℓ∞ 8/255\nrobust accuracy"),
                ("aa_l2", "AutoAttack ℓ2 0.5\nrobust accuracy"),
                ("radius", "median flip radius (ℓ2, log)"), ("conf", "mean confidence"))
_MARKERS = "os^vDP*Xph<>"


def atlas_figure(entries: dict, groups: dict, pairs: dict | None = None, kappa: str = "kappa_sq",
                 panels=ATLAS_PANELS, title: str = ""):
    """κ at the training minimum (x, log axis, bootstrap interval) against each robustness measure and the
    mean confidence (y, with intervals; a panel whose field no entry has is left out), one marker per model,
    one colour and marker shape per method group; ``pairs``
    (calibrated label -> original label) draws the temperature-scaled copies hollow, with an arrow from
    their original. Two panels per row. Returns the figure."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter

    pairs = pairs or {}
    panels = [(f, lab) for f, lab in panels if any(e[f] is not None for e in entries.values())]
    colours = {g: f"C{i}" for i, g in enumerate(dict.fromkeys(groups[n] for n in entries))}
    shapes = {g: _MARKERS[i % len(_MARKERS)] for i, g in enumerate(colours)}  # marker and colour: the method
    rows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(WIDTH, 3.0 * rows + 0.9), layout="constrained", squeeze=False)
    for ax, (field, label) in zip(axes.flat, panels):
        for i, (name, e) in enumerate(entries.items()):
            if e[field] is None:
                continue
            x, y = as_interval(e["kappa_train"][kappa]), as_interval(e[field])
            hollow = name in pairs
            c = colours[groups[name]]
            ax.errorbar(x[0], y[0], xerr=[[x[0] - x[1]], [x[2] - x[0]]], yerr=[[y[0] - y[1]], [y[2] - y[0]]],
                        fmt=shapes[groups[name]], color=c, mfc="none" if hollow else c, ms=6, lw=0.8,
                        capsize=1.5, label=name)
            if hollow and pairs[name] in entries:
                orig = entries[pairs[name]]
                x0, y0 = as_interval(orig["kappa_train"][kappa]), as_interval(orig[field])
                ax.annotate("", (x[0], y[0]), (x0[0], y0[0]),
                            arrowprops=dict(arrowstyle="->", color=c, lw=0.7, alpha=0.7))
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, numticks=5))
        ax.xaxis.set_minor_formatter(NullFormatter())  # no "3×10¹ 4×10¹ ..." clutter
        if field == "radius":  # the robust models' radii are an order of magnitude larger
            ax.set_yscale("log")
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(r"$\kappa$ over training images (log)", fontsize=FONT["label"])
        ax.set_ylabel(label, fontsize=FONT["label"])
        ax.tick_params(labelsize=FONT["tick"])
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=FONT["legend"], frameon=False)
    if title:
        fig.suptitle(title, fontsize=FONT["suptitle"])
    return fig
