"""flatnb.book.figures: what each panel draws, layout legible at page width."""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from flatnb.book import figures as an
from flatnb.attacks import pgd
from flatnb.measure.trajectory import Recorder
from conftest import Tiny, _Traj


def test_valley_comparison_figure_draws_each_model_and_survives_no_flips():
    import matplotlib.pyplot as plt

    torch.manual_seed(0)
    model = Tiny(k=3, m=5, n_in=4).eval()
    x = torch.rand(32, 4)
    y = model(x).argmax(1)
    tr = pgd(model, x, y, eps=3.0, steps=12, step_size=0.5, record=Recorder, clip=None, warn=False).trajectory
    none = _Traj(torch.rand(13, 4, dtype=torch.float64), torch.full((4,), -1))
    fig = an.valley_comparison_figure({"a": tr, "b": tr, "nothing flips": none}, "kappa_sq", before=3, after=4)
    axes = fig.valley_axes
    assert axes.shape == (2, 3)
    # bottom row, first column: the median line at offset 0 is the median κ at each example's own flip step
    kept = [i for i in range(32) if tr.flip_step[i] >= 1]
    assert len(kept) >= 5
    at_flip = np.median([float(tr.kappa_sq[int(tr.flip_step[i]), i]) for i in kept])
    line = next(l for l in axes[1, 0].lines if len(l.get_xdata()) == 8)  # the median, not the flip marker
    xs, ys = line.get_data()
    assert list(xs) == list(range(-3, 5))
    assert ys[3] == pytest.approx(at_flip, rel=1e-6)
    # top row: by raw step, over the same (flipping) examples
    raw = next(l for l in axes[0, 1].lines if len(l.get_xdata()) == 13)
    assert raw.get_ydata()[0] == pytest.approx(np.median([float(tr.kappa_sq[0, i]) for i in kept]), rel=1e-6)
    assert "n=0" in axes[0, 2].get_title(loc="left") and any("no example flips" in t.get_text() for t in axes[0, 2].texts)
    assert f"n={len(kept)}" in axes[0, 0].get_title(loc="left")
    plt.close(fig)
    with pytest.raises(ValueError, match="at least one"):
        an.valley_comparison_figure({})
    with pytest.raises(ValueError, match="unknown quantity"):
        an.valley_comparison_figure({"a": tr}, "sharpness")


def test_uncanny_valley_figure_overlays_models_in_given_axes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    torch.manual_seed(0)
    model = Tiny(k=3, m=5, n_in=4).eval()
    x = torch.rand(32, 4)
    y = model(x).argmax(1)
    trs = [pgd(model, x, y, eps=3.0, steps=12, step_size=s, record=Recorder, clip=None, warn=False).trajectory
           for s in (0.5, 0.25)]
    qs = ("kappa_sq", "loss")
    fig, axes = plt.subplots(2, len(qs), squeeze=False)
    for tr, name, c in zip(trs, ("a", "b"), ("C0", "C3")):
        out = an.uncanny_valley_figure(tr, before=2, after=2, quantities=qs, axes=axes, label=name, color=c)
        assert out is fig
    for ax in axes.flat:
        # one median line per model, in its colour, labelled with its name and n
        lines = [ln for ln in ax.get_lines() if ln.get_label().startswith(("a (", "b ("))]
        assert [ln.get_label().split(" ")[0] for ln in lines] == ["a", "b"]
        assert [ln.get_color() for ln in lines] == ["C0", "C3"]
        # the first median is the raw/aligned median of model a's flipping examples
    top = [ln for ln in axes[0, 1].get_lines() if ln.get_label().startswith("a (")][0]
    keep = trs[0].flip_step >= 1
    np.testing.assert_allclose(top.get_ydata(), np.nanmedian(trs[0].loss[:, keep].double().numpy(), axis=1))
    with pytest.raises(ValueError, match="axes"):
        an.uncanny_valley_figure(trs[0], quantities=qs, axes=axes[:1])
    plt.close(fig)


def _panels_per_row(fig):
    rows = {}
    for ax in fig.axes:
        if ax.get_visible():
            rows.setdefault(round(ax.get_position().y0, 3), []).append(ax)
    return [len(v) for v in rows.values()]


def test_figures_are_legible_at_page_width():
    """At most four panels per row, ~700 px wide, no minor-tick labels on log axes, fonts >= 8 pt."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    torch.manual_seed(0)
    model = Tiny(k=3, m=5, n_in=4).eval()
    x = torch.rand(32, 4)
    y = model(x).argmax(1)
    tr = pgd(model, x, y, eps=3.0, steps=12, step_size=0.5, record=Recorder, clip=None, warn=False).trajectory
    figs = [an.uncanny_valley_figure(tr, "seven quantities"),
            an.valley_comparison_figure({f"model {i}": tr for i in range(12)}, "kappa_sq")]
    for fig in figs:
        assert fig.get_figwidth() <= 7.5 + 1e-9
        assert max(_panels_per_row(fig)) <= 4
        for ax in fig.axes:
            if not ax.get_visible():
                continue
            assert ax.yaxis.label.get_fontsize() >= 8
            assert all(t.get_fontsize() >= 8 for t in ax.get_yticklabels() + ax.get_xticklabels())
            if ax.get_yscale() == "log":
                assert isinstance(ax.yaxis.get_minor_formatter(), NullFormatter)
                assert len(ax.yaxis.get_minorticklocs()) == 0
        plt.close(fig)


def test_every_recorded_field_has_a_label():
    from flatnb.measure.trajectory import FIELDS

    assert list(an.QUANTITIES) == list(an.QUANTITIES) and set(an.QUANTITIES) == set(FIELDS)
    assert set(an.LOG_QUANTITIES) <= set(FIELDS)


def test_sharey_puts_each_row_on_one_range():
    import matplotlib.pyplot as plt

    torch.manual_seed(0)
    model = Tiny(k=3, m=5, n_in=4).eval()
    x = torch.rand(32, 4)
    y = model(x).argmax(1)
    tr = pgd(model, x, y, eps=3.0, steps=12, step_size=0.5, record=Recorder, clip=None, warn=False).trajectory
    tr2 = pgd(model, x, y, eps=3.0, steps=12, step_size=0.2, record=Recorder, clip=None, warn=False).trajectory
    fig = an.valley_comparison_figure({"a": tr, "b": tr2}, "loss", sharey=True)
    for row in fig.valley_axes:
        assert row[0].get_ylim() == row[1].get_ylim()
    plt.close(fig)
