"""One claim, several models: per-model numbers and their pooled value (issue 25).

A claim about "a trained standard model" (E1, E3, E6) is checked on each model of
:data:`flatnb.config.budgets.MAIN_MODELS` and on all of them pooled: a fraction pooled over models counts every
model's images (:func:`pool`, the models weighted by how many images each contributes), a median pooled over
models is the median of all their values with a percentile-bootstrap interval over those values
(:func:`pooled_median`). :func:`table` lays the per-model rows and the pooled row out as one Markdown table.

Pooling treats the images of all models as one sample. That is the reading of "a trained model" the book tests:
the share of (model, image) pairs for which the claim holds. The per-model rows show whether one model carries
the pooled number.
"""
from __future__ import annotations

import torch

from flatnb.stats import EmptySelection, Fraction, bootstrap_ci

POOLED = "pooled"


def _items(per_model) -> list:
    vals = list(per_model.values()) if isinstance(per_model, dict) else list(per_model)
    if not vals:
        raise EmptySelection("nothing to pool: no model gave a value (check the model list of this profile)")
    return vals


def pool(fracs) -> Fraction:
    """The pooled :class:`~flatnb.stats.Fraction` of several (``{label: Fraction}`` or a list): the sum of the
    counts over the sum of the trials. Fractions of 0 trials add nothing; if every one is empty the pooled
    fraction is empty too (``Fraction(0, 0)``, printed "— (n=0)")."""
    got = _items(fracs)
    if not all(isinstance(f, Fraction) for f in got):
        raise TypeError(f"pool needs Fractions, got {sorted({type(f).__name__ for f in got})}")
    return Fraction(sum(f.k for f in got), sum(f.n for f in got))


def cat(values) -> torch.Tensor:
    """All models' values (``{label: 1-D tensor}`` or a list) as one float64 CPU tensor, in model order."""
    got = _items(values)
    return torch.cat([torch.as_tensor(v).detach().reshape(-1).double().cpu() for v in got])


def pooled_median(values, **bootstrap_kw) -> tuple[float, float, float]:
    """``(median, lo, hi)`` of all models' values together (``{label: tensor}`` or a list), with the percentile
    bootstrap interval of :func:`flatnb.stats.bootstrap_ci` over the pooled values."""
    return bootstrap_ci(cat(values), **bootstrap_kw)


def table(header, per_model: dict, pooled=None) -> str:
    """A Markdown table with one row per model (``{label: [cells]}``) and, if given, a last row ``pooled``
    (its cells), under ``header`` (the first column, the model, is added). Cells are ``str()``-ed."""
    header = ["model", *header]
    rows = [[label, *cells] for label, cells in per_model.items()]
    if pooled is not None:
        rows.append([f"**{POOLED}**", *pooled])
    if not rows:
        raise EmptySelection("a per-model table needs at least one model")
    if any(len(r) != len(header) for r in rows):
        raise ValueError(f"every row needs {len(header) - 1} cells after the model, got "
                         f"{[len(r) - 1 for r in rows]}")
    esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731 - a local shorthand
    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
