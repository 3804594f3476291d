"""Is the loss steeper off the data manifold than on it? Directions and measurements for chapter 11.

Walter et al. (2026, §4.5) argue that global robustness needs the loss to "curve sharply away from
the data manifold". :func:`directions` builds unit input directions of two kinds at each input:

* *on the manifold*: towards the nearest same-class image of a pool, and the tangents of small
  augmentations (sub-pixel shifts, brightness, contrast; :func:`flatnb.curvature.augmentation_directions`);
* *off the manifold*: random Gaussian directions, the input gradient and the attack direction (the
  normalised step of PGD-ℓ2). The last two are chosen to raise the loss, so that they are steep is
  true by construction.

:func:`measure` evaluates, per direction type and correctly classified input, four quantities:
the curvature ``vᵀ∇²ℓ v`` at ``x`` of the raw cross-entropy (``curv``) and of the
temperature-calibrated one ``ℓ(z/T)`` (``curv_cal``; :mod:`flatnb.measure.calibration`), and per step
length ``t`` the calibrated loss rise ``max_± ℓ_T(x ± t v) − ℓ_T(x)`` (``rise_cal``) and the share
of the clean logit margin lost ``max_± (m(x) − m(x ± t v)) / m(x)`` (``margin``), which needs no
softmax and no temperature. Random directions are summarised per input by their median. Comparing
calibrated curvature and margin shares across models removes the confidence confound of the raw
curvature (its softmax-Hessian factor shrinks as a model grows confident).
"""
from __future__ import annotations

import torch

from flatnb import attacks
from flatnb import curvature as cv
from flatnb import data as fdata
from flatnb.measure import calibration
from flatnb.stats import EmptySelection

Tensor = torch.Tensor

ON = ("neighbour", "shift_x", "shift_y", "brightness", "contrast")
OFF = ("random", "gradient", "attack")
QUANTITIES = ("curv", "curv_cal", "rise_cal", "margin")
#: the attack whose step gives the "attack" direction: PGD-ℓ2, ε = 0.5, 20 steps of 0.05, no random start
ATTACK = dict(eps=0.5, steps=20, step_size=0.05, norm="l2", random_start=False, warn=False)
#: at most this many images go through the directions and Hessian-vector products at once, whatever the batch
#: size, so that memory does not grow with it
CHUNK = 64


def directions(model, x: Tensor, y: Tensor, pool_x: Tensor, pool_y: Tensor, n_random: int,
               generator: torch.Generator, attack: dict | None = None) -> dict[str, Tensor]:
    """Unit directions per type, each ``(P, *x.shape)`` (P = ``n_random`` for "random", else 1)."""
    if n_random < 1:
        raise ValueError(f"n_random must be >= 1, got {n_random}")
    aug = cv.augmentation_directions(x, ON[1:])
    rnd = torch.randn((n_random, *x.shape), generator=generator, device=x.device, dtype=x.dtype)
    step = attacks.pgd(model, x, y, **(ATTACK if attack is None else attack)).x_last - x
    return {"neighbour": cv.neighbour_directions(x, y, pool_x, pool_y)[None],
            **{kind: aug[i:i + 1] for i, kind in enumerate(ON[1:])},
            "random": cv.unit_directions(rnd),
            "gradient": cv.unit_directions(cv.input_gradient(model, x, y))[None],
            "attack": cv.unit_directions(step)[None]}


def measure_batch(model, x: Tensor, y: Tensor, dirs: dict[str, Tensor], temperature: float,
                  ts) -> dict[str, dict[str, Tensor]]:
    """The four quantities per direction type for one batch of correctly classified inputs:
    ``curv``/``curv_cal`` (N,), ``rise_cal``/``margin`` (len(ts), N); float64 on the CPU, random
    directions reduced to their median."""
    ts = tuple(float(t) for t in ts)
    if not ts or min(ts) <= 0:
        raise ValueError(f"ts must be positive step lengths, got {ts}")
    with torch.no_grad():
        m0 = -calibration.negative_margin(model(x), y)
    if not bool((m0 > 0).all()):
        raise ValueError("measure_batch needs correctly classified inputs (positive margin); "
                         "select them first (measure() does)")
    both, k = ts + tuple(-t for t in ts), len(ts)
    ce_t = calibration.calibrated_ce(temperature)
    ce_sum = calibration.calibrated_ce(temperature, "sum")
    out = {}
    for kind, d in dirs.items():
        def along(fn):
            return torch.stack([cv.loss_along(model, x, y, v, both, loss_fn=fn) for v in d])
        up, lost = along(ce_t), along(calibration.negative_margin)
        # outside autograd: the forward-over-reverse HVP of a model whose weights require gradients otherwise
        # keeps a graph to the weights per direction (about 250 MB per direction for 64 images of a FastNet-32;
        # chapter 11's full run ran out of 24 GB with 12 random directions), and the values are the same
        with torch.no_grad():
            curv = cv.directional_curvature(model, x, y, d)
            curv_cal = cv.directional_curvature(model, x, y, d, loss_fn=ce_sum)
        vals = {"curv": curv, "curv_cal": curv_cal,
                "rise_cal": torch.maximum(up[:, :k], up[:, k:]),
                "margin": torch.maximum(lost[:, :k], lost[:, k:]) / m0}
        out[kind] = {q: v.detach().double().cpu().median(0).values for q, v in vals.items()}
    return out


def measure(model, dataset, temperature: float, pool_x: Tensor, pool_y: Tensor, ts, n_random: int,
            batch_size: int, device, seed: int = 0) -> dict[str, dict[str, Tensor]]:
    """:func:`measure_batch` over the correctly classified images of a :class:`flatnb.data.Dataset`,
    joined: ``out[kind][quantity]`` with the images along the last axis."""
    gen = torch.Generator(device=device).manual_seed(seed)
    parts = []
    for x, y in fdata.batches(dataset, batch_size, device=device):
        with torch.no_grad():
            ok = model(x).argmax(1) == y
        if not bool(ok.any()):
            continue
        for xc, yc in zip(x[ok].split(CHUNK), y[ok].split(CHUNK)):
            parts.append(measure_batch(model, xc, yc, directions(model, xc, yc, pool_x, pool_y, n_random, gen),
                                       temperature, ts))
    if not parts:
        raise EmptySelection("no image of the dataset is classified correctly: nothing to measure")
    out = {kind: {q: torch.cat([p[kind][q] for p in parts], dim=-1) for q in QUANTITIES} for kind in parts[0]}
    for kind, o in out.items():
        for q, v in o.items():
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"non-finite {q} along {kind} directions: check the model and inputs")
    return out
