"""The atlas (chapter 13): flatness, confidence and robustness of many models, measured on the same images.

Walter et al. (2026) ask *when* flatness guarantees adversarial robustness, but compare one standard
model with one adversarially trained one. The closed form costs one forward pass, so the book can
measure every model of a zoo (training methods, seeds, post-hoc temperature) side by side:

* :func:`probe` fixes the images: training images for the dataset Hessian ``H(w, S)`` (the paper's
  definition of flatness at the training minimum), test images for accuracy, calibration and κ per
  input, and held-out test images on which the temperature is fitted;
* :func:`measure` returns one model's entry: clean accuracy, mean confidence, expected calibration
  error before and after temperature scaling, κ in its three conventions over training and test
  images, robust accuracy under the reference AutoAttack (ℓ∞ and ℓ2), the basin width of chapter 9,
  the flip radius of chapter 3 (an upper bound on the distance to the decision boundary), the
  calibrated input-space curvature along random directions of chapter 11, and whether the end of a
  long attack is flatter than the clean input (chapter 5's valley, per model);
* :func:`calibrated` is the same model with its temperature divided out: κ and confidence change, the
  decisions do not, so its robust accuracy and flip radius are the original model's *by construction*
  (they are copied, and the entry says so);
* :func:`table` and :func:`columns` turn entries into the chapter's table and the columns its
  correlations use; :func:`findings` states what the correlations and the flatter / more robust sets decide, in
  words, with the run's numbers.

Every number carries an interval: fractions a Wilson interval, medians and means a bootstrap one.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from flatnb import attacks, models
from flatnb.config import budgets
from flatnb.measure import calibration, radius, robust_flatness, trajectory
from flatnb import curvature as cv
from flatnb import data as fdata
from flatnb.stats import EmptySelection, Fraction, bootstrap_ci, rank_test

Tensor = torch.Tensor

CONVENTIONS = {"kappa_sq": "κ = ‖w‖² Tr H", "kappa_unsq": "‖w‖ Tr H", "kappa_neuron": "κ neuron-wise"}
#: the AutoAttack budgets of the atlas: norm -> ε
AA_BUDGETS = {"linf": 8 / 255, "l2": 0.5}
#: fields a temperature-scaled copy inherits from its model: decisions do not change with temperature
BY_CONSTRUCTION = ("clean", "aa_linf", "aa_l2", "radius")


class Probe(NamedTuple):
    """The images every model of the atlas is measured on (the same ones for all)."""

    train: fdata.Dataset  # training images, no augmentation: the dataset Hessian H(w, S)
    test: fdata.Dataset  # test images: accuracy, confidence, ECE, κ per input; their first ones are attacked
    cal: fdata.Dataset  # held-out test images (disjoint from ``test``): the temperature


def probe(train: fdata.Dataset, test: fdata.Dataset, n_train: int, n_test: int, n_cal: int, seed: int = 0) -> Probe:
    """Seeded subsets: ``n_train`` training images; ``n_test`` and ``n_cal`` disjoint test images."""
    if n_test + n_cal > len(test):
        raise ValueError(f"n_test + n_cal = {n_test + n_cal} exceeds the {len(test)} test images")
    held, cal = fdata.split(test, (n_test, n_cal), seed=seed, tag="atlas")
    return Probe(fdata.subset(train, n=n_train, seed=seed), held, cal)


def _tensors(ds: fdata.Dataset, n: int, device) -> tuple[Tensor, Tensor]:
    n = min(n, len(ds))
    return ds.images[:n].to(device).float().div(255), ds.labels[:n].to(device)


def _flatness(model, ds: fdata.Dataset, batch: int, device, seed: int) -> tuple[dict, dict]:
    """(per-input terms as float64 CPU tensors, {convention: (mean, lo, hi)})."""
    out = cv.flatness_over(model, fdata.batches(ds, batch, device=device))
    t = {f: getattr(out.terms, f).detach().double().cpu() for f in ("kappa_sq", "kappa_unsq", "kappa_neuron",
                                                                     "gini", "phi_sq")}
    return t, {c: bootstrap_ci(t[c], statistic=np.mean, seed=seed) for c in CONVENTIONS}


def _confidence(z: Tensor, y: Tensor, temperature: float = 1.0) -> dict:
    """Correctness, top-class probability and ECE of logits ``z`` at ``temperature``."""
    p = (z / temperature).softmax(1)
    top, pred = p.max(1)
    return dict(correct=(pred == y).cpu(), p_top=top.double().cpu(),
                ece=calibration.expected_calibration_error(z / temperature, y))


def measure(model, pr: Probe, sizes, device, seed: int = 0, robust: dict | None = None) -> dict:
    """One model's entry of the atlas (see the module docstring); ``sizes`` needs ``batch``, ``n_aa``,
    ``aa_norms`` (a subset of :data:`AA_BUDGETS`), ``aa_iter`` and ``aa_queries`` (the reference's 100 and
    5000, but in a smoke run), ``n_basin``, ``n_radius``, ``radius_steps``, ``radius_iter``, ``n_curv``,
    ``n_random`` and ``temperature_at_bound`` (``"raise"``, but in a smoke run: see
    :func:`flatnb.measure.calibration.fit_temperature`).

    ``robust``: ``{norm: Fraction}`` of AutoAttack measured elsewhere (the full profile reads the zoo's cached
    measurement on ``n_aa`` seeded test images, :func:`flatnb.zoo.robust_accuracy`); ``None``: attacked here on
    the first ``n_aa`` probe images. With ``n_rflat`` > 0 in ``sizes`` (and ``rflat_samples``, ``rflat_pgd_steps``,
    ``rflat_worst_steps``), Stutz et al.'s average- and worst-case flatness of the robust loss
    (:mod:`flatnb.measure.robust_flatness`: ℓ∞ 8/255, layer-wise relative radii 0.5 and 0.003) on the first
    ``n_rflat`` test images.

    The model must follow the ``features``/``head`` contract (:func:`flatnb.models.wrap` makes any
    classifier with a final ``nn.Linear`` do so) and be in eval mode."""
    models.check_contract(model)
    model.eval()
    k = len(pr.test.classes)
    z_cal, y_cal = calibration.model_logits(model, pr.cal, device, sizes.batch)
    temp = calibration.fit_temperature(z_cal, y_cal, at_bound=sizes.temperature_at_bound)
    z_test, y_test = calibration.model_logits(model, pr.test, device, sizes.batch)  # one pass, two temperatures
    raw = _confidence(z_test, y_test)
    ece_cal = _confidence(z_test, y_test, temp)["ece"]
    per_test, kappa_test = _flatness(model, pr.test, sizes.batch, device, seed)
    _, kappa_train = _flatness(model, pr.train, sizes.batch, device, seed)
    e = dict(clean=Fraction.of(raw["correct"]), conf=float(raw["p_top"].mean()), ece=raw["ece"],
             temperature=temp, ece_cal=ece_cal, kappa_train=kappa_train, kappa_test=kappa_test,
             per_input=dict(per_test, p_top=raw["p_top"], correct=raw["correct"]), inherited=())

    # robust accuracy under the reference AutoAttack (standard version), on the first n_aa test images, for
    # the norms in sizes.aa_norms (a norm left out gets None: the quick profile attacks ℓ∞ only)
    x, y = _tensors(pr.test, sizes.n_aa, device)
    for norm, eps in AA_BUDGETS.items():
        e[f"aa_{norm}"] = None
        if robust is not None:
            e[f"aa_{norm}"] = robust.get(norm)
        elif norm in sizes.aa_norms:
            r = attacks.autoattack(model, x, y, eps=eps, norm=norm, version="standard", batch_size=sizes.batch,
                                   seed=seed, n_iter=sizes.aa_iter, n_queries=sizes.aa_queries)
            e[f"aa_{norm}"] = Fraction.of((r.clean_correct & ~r.success).cpu())

    # the attacked inputs: the first correctly classified test images, n_basin of them for chapter 9's basin
    # width (E2 attack, rise > 0.1 log k) and chapter 5's valley end, n_radius for the flip radius, n_curv for
    # the curvature (each a prefix of the same list, so every model is measured on its first correct images)
    keep = raw["correct"].nonzero().flatten()[: max(sizes.n_basin, sizes.n_radius, sizes.n_curv)]
    if len(keep) == 0:
        raise EmptySelection("the model classifies none of the probe's test images correctly: nothing to "
                             f"measure; check the model (its clean accuracy is {e['clean'].pct()})")
    xs = pr.test.images[keep].to(device).float().div(255)
    ys = pr.test.labels[keep].to(device)
    x, y = xs[: sizes.n_basin], ys[: sizes.n_basin]
    res = attacks.pgd(model, x, y, **dict(budgets.ATTACKS["pgd_l2_e2"], loss="ce", random_start=False,
                                          record=trajectory.Recorder))
    width = trajectory.basin_width(res.trajectory.loss, rise=0.1 * math.log(k)).clamp_max(res.steps_run + 1)
    e["basin"] = bootstrap_ci(width.double(), seed=seed)
    # censored: paths whose loss never rose within the attack (their width is only "at least steps + 1")
    e["basin_censored"] = Fraction.of((width >= res.steps_run + 1).cpu())
    long = attacks.pgd(model, x, y, **dict(budgets.ATTACKS["pgd_linf_long"], loss="ce", random_start=False))
    with torch.no_grad():
        k0 = cv.model_flatness(model, x)[0].kappa_sq
        terms, z_end = cv.model_flatness(model, long.x_last)
    flipped = (z_end.argmax(1) != y)
    e["valley_end_flatter"] = Fraction.of((terms.kappa_sq < k0)[flipped].cpu()) if bool(flipped.any()) else None

    # chapter 3's flip radius (plain ℓ2 ball, bisection; an upper bound on the distance to the boundary)
    xr, yr = xs[: sizes.n_radius], ys[: sizes.n_radius]
    gen = torch.Generator(device=device).manual_seed(seed)
    # attack steps in bf16 where sizes.radius_bf16 (every flip confirmed in float32: radius.max_loss_change)
    low = torch.bfloat16 if getattr(sizes, "radius_bf16", False) else None
    flip = radius.flip_radius(model, xr, yr, torch.zeros(len(yr), device=device, dtype=xr.dtype),
                              torch.full((len(yr),), 0.1, device=device, dtype=xr.dtype), n_iter=sizes.radius_iter,
                              max_radius=20.0, steps=sizes.radius_steps,
                              restarts=getattr(sizes, "radius_restarts", 1), generator=gen, autocast_dtype=low,
                              ce_attack=getattr(sizes, "radius_ce", True))
    hi = flip.hi.double().cpu()
    e["radius"] = bootstrap_ci(hi, seed=seed)
    e["per_radius"] = dict(radius=hi, censored=flip.censored.cpu(),
                           kappa_sq=per_test["kappa_sq"][keep[: sizes.n_radius]],
                           p_top=raw["p_top"][keep[: sizes.n_radius]])

    # chapter 11's calibrated input-space curvature vᵀ∇²ℓ_T v along random unit directions (median over them)
    xc, yc = xs[: sizes.n_curv], ys[: sizes.n_curv]
    g = torch.Generator(device=device).manual_seed(seed + 1)
    dirs = cv.unit_directions(torch.randn((sizes.n_random, *xc.shape), generator=g, device=device))
    curv = cv.directional_curvature(model, xc, yc, dirs, loss_fn=calibration.calibrated_ce(temp, "sum"))
    e["curv_in"] = bootstrap_ci(curv.double().cpu().reshape(sizes.n_random, -1).median(0).values, seed=seed)

    # Stutz et al.'s flatness of the robust loss (ℓ∞ 8/255) under relative weight perturbations
    e["rflat_avg"] = e["rflat_worst"] = e["robust_loss"] = None
    if getattr(sizes, "n_rflat", 0) > 0:
        xf, yf = _tensors(pr.test, sizes.n_rflat, device)
        eps = AA_BUDGETS["linf"]
        steps = sizes.rflat_pgd_steps
        rf = robust_flatness.robust_flatness(model, xf, yf, eps=eps, pgd_steps=steps, pgd_step_size=2.5 * eps / steps,
                                             n_samples=sizes.rflat_samples, worst_steps=sizes.rflat_worst_steps,
                                             seed=seed)
        e["rflat_avg"] = bootstrap_ci(rf["average_samples"], statistic=np.mean, seed=seed)
        e["rflat_worst"] = (rf["worst"],) * 3
        e["robust_loss"] = rf["robust_loss"]
    return e


def within(entry: dict, seed: int = 0) -> tuple[dict, dict, int]:
    """Within one model, across its inputs (the flip-radius images, censored ones left out): ``(raw, partial,
    n)`` with raw the Spearman ρ of κ(x) and the flip radius, partial the same given the input's confidence, each
    :func:`flatnb.stats.rank_test` (bootstrap interval and permutation p)."""
    r = entry["per_radius"]
    keep = ~r["censored"]
    k, rad, conf = r["kappa_sq"][keep], r["radius"][keep], r["p_top"][keep]
    return rank_test(k, rad, seed=seed), rank_test(k, rad, conf, seed=seed), int(keep.sum())


def calibrated(model, entry: dict, pr: Probe, sizes, device, seed: int = 0):
    """``(model with temperature 1, its entry)``: the head divided by the fitted temperature
    (:func:`flatnb.models.scale_head`); κ, confidence and ECE measured again; the decision-based fields
    (:data:`BY_CONSTRUCTION`) copied from ``entry`` and listed in the new entry's ``inherited``;
    the loss-based ones (basin width, valley end, input curvature) left out."""
    cal = models.scale_head(model, 1.0 / entry["temperature"])
    raw = _confidence(*calibration.model_logits(cal, pr.test, device, sizes.batch))
    per_test, kappa_test = _flatness(cal, pr.test, sizes.batch, device, seed)
    _, kappa_train = _flatness(cal, pr.train, sizes.batch, device, seed)
    if not torch.equal(raw["correct"], entry["per_input"]["correct"]):
        raise AssertionError("a temperature changed a decision: the copy is not the same classifier")
    new = dict(conf=float(raw["p_top"].mean()), ece=raw["ece"], temperature=1.0, ece_cal=raw["ece"],
               kappa_train=kappa_train, kappa_test=kappa_test,
               per_input=dict(per_test, p_top=raw["p_top"], correct=raw["correct"]),
               basin=None, basin_censored=None, valley_end_flatter=None, curv_in=None, rflat_avg=None,
               rflat_worst=None, robust_loss=None, inherited=BY_CONSTRUCTION)
    new.update({f: entry[f] for f in BY_CONSTRUCTION})
    return cal, new


# ----------------------------------------------------------------------------- reading the atlas

def _ci(t, fmt="{:.3g}") -> str:
    return "—" if t is None else f"{fmt.format(t[0])} [{fmt.format(t[1])}, {fmt.format(t[2])}]"


def _pct(f: Fraction | None) -> str:
    return "—" if f is None else f"{100 * f.value:.1f} [{100 * f.lo:.1f}, {100 * f.hi:.1f}]"


def _n_range(ns: list[int]) -> str:
    return f"{ns[0]:,}" if len(ns) == 1 else f"{ns[0]:,}-{ns[-1]:,}, per cell"


def _cell_n(f: Fraction | None, ns: list[int]) -> str:
    return "" if f is None or len(ns) == 1 else f" (n={f.n:,})"


def _basin(e) -> str:
    """The basin width's median and interval, "≥" where the median path never took off (censored at the attack's
    length), with the censored share."""
    if e.get("basin") is None:
        return "—"
    c = e.get("basin_censored")
    if c is None or c.k == 0:
        return _ci(e["basin"], "{:.0f}")
    est, lo, hi = e["basin"]
    return f"{'≥ ' if c.k * 2 >= c.n else ''}{est:.0f} [{lo:.0f}, {hi:.0f}] ({100 * c.value:.0f} % censored)"


def table(entries: dict[str, dict]) -> str:
    """The atlas as two compact markdown tables, one row per model (``entries``: label → entry): robustness
    (accuracies in %, the number of images in the header), then flatness and confidence. † marks values a
    temperature-scaled copy inherits by construction; an AutoAttack norm no model was attacked in is left out."""
    names = list(entries)
    first = entries[names[0]]
    norms = [(k, lab) for k, lab in (("aa_linf", "AA ℓ∞ 8/255"), ("aa_l2", "AA ℓ2 0.5"))
             if any(entries[n][k] is not None for n in names)]
    # the images each norm was attacked on: one n in the header when every model shares it, else the range there
    # and each cell's own n (the zoo's AutoAttack comes from the manifest, which may hold more than was asked)
    n_aa = {k: sorted({entries[n][k].n for n in names if entries[n][k] is not None}) for k, _ in norms}
    head = (f"| model | clean % (n={first['clean'].n}) | "
            + "".join(f"{lab} % (n={_n_range(n_aa[k])}) | " for k, lab in norms)
            + "flip radius ℓ2 | basin width |\n|" + "---|" * (4 + len(norms)))
    rob = []
    for name, e in entries.items():
        mark = " †" if e["inherited"] else ""
        rob.append(f"| {name} | {_pct(e['clean'])}{mark} | "
                   + "".join(f"{_pct(e[k])}{_cell_n(e[k], n_aa[k])}{mark} | " for k, _ in norms)
                   + f"{_ci(e['radius'], '{:.2f}')}{mark} | {_basin(e)} |")
    rflat = any(e.get("rflat_avg") is not None for e in entries.values())
    flat = ["| model | κ train | κ test | mean conf. | ECE | T | input curv. (cal.) |"
            + (" robust flatness avg. | worst |" if rflat else "") + "\n|" + "---|" * (9 if rflat else 7)]
    for name, e in entries.items():
        flat.append(f"| {name} | {_ci(e['kappa_train']['kappa_sq'])} | {_ci(e['kappa_test']['kappa_sq'])} | "
                    f"{e['conf']:.2f} | {e['ece']:.3f} | {e['temperature']:.2f} | {_ci(e['curv_in'])} |"
                    + (f" {_ci(e.get('rflat_avg'))} | {'—' if e.get('rflat_worst') is None else format(e['rflat_worst'][0], '.3g')} |"
                       if rflat else ""))
    left_out = [lab for k, lab in (("aa_linf", "AA ℓ∞ 8/255"), ("aa_l2", "AA ℓ2 0.5")) if (k, lab) not in norms]
    note = f"\n\n({', '.join(left_out)}: not run in this profile.)" if left_out else ""
    return head + "\n" + "\n".join(rob) + note + "\n\n" + "\n".join(flat)


def columns(entries: dict[str, dict]) -> dict[str, np.ndarray]:
    """Per-model columns for correlations: κ over training and test images (the three conventions),
    mean confidence, ECE, the AutoAttack robust accuracies (of the norms every model was attacked in) and the
    median flip radius."""
    names = list(entries)
    col = lambda f: np.array([f(entries[n]) for n in names], dtype=float)  # noqa: E731
    out = {f"{c}_train": col(lambda e, c=c: e["kappa_train"][c][0]) for c in CONVENTIONS}
    out |= {f"{c}_test": col(lambda e, c=c: e["kappa_test"][c][0]) for c in CONVENTIONS}
    out |= dict(conf=col(lambda e: e["conf"]), ece=col(lambda e: e["ece"]),
                clean=col(lambda e: e["clean"].value), radius=col(lambda e: e["radius"][0]))
    for k in ("rflat_avg", "rflat_worst"):  # Stutz et al.'s robust flatness, where every model has it
        if all(entries[n].get(k) is not None for n in names):
            out[k] = col(lambda e, k=k: e[k][0])
    for k in ("aa_linf", "aa_l2"):  # only the norms every model was attacked in
        if all(entries[n][k] is not None for n in names):
            out[k] = col(lambda e, k=k: e[k].value)
    for k, v in out.items():
        if not np.isfinite(v).all():
            raise ValueError(f"atlas column {k} has non-finite values for "
                             f"{[n for n, x in zip(names, v) if not math.isfinite(x)]}")
    return out


#: the correlations :func:`findings` reports: (flatness column, robustness column) -> words
_FINDINGS = ((("kappa_sq_train", "aa_linf"), "the paper's κ (training images) and AutoAttack ℓ∞ accuracy"),
             (("kappa_sq_train", "aa_l2"), "κ and AutoAttack ℓ2 accuracy"),
             (("kappa_sq_train", "radius"), "κ and the median flip radius"),
             (("rflat_avg", "aa_linf"), "Stutz et al.'s average-case robust flatness and AutoAttack ℓ∞ accuracy"),
             (("rflat_worst", "aa_linf"), "their worst-case robust flatness and AutoAttack ℓ∞ accuracy"))


def _says(t: dict) -> str:
    """What a :func:`~flatnb.stats.rank_test` result decides, by its interval and permutation p-value (5 %)."""
    est, lo, hi = t["rho"]
    if t["p"] < 0.05 and (lo > 0 or hi < 0):
        return "a rank relation (interval excludes 0, p < 0.05)"
    return "no rank relation shown (interval includes 0 or p ≥ 0.05)"


def findings(corr: dict, flatter: set, more_robust: set, n_models: int) -> str:
    """What the atlas shows beyond the paper, as a Markdown list with the run's numbers only: each reported rank
    correlation (``corr[(flatness, robustness)] = (raw, partial)`` of :func:`~flatnb.stats.rank_test`) with what
    its interval and p-value decide; κ against mean confidence (the confound); and the methods that made the
    minimum flatter than every standard seed (``flatter``) against those that made the model more robust."""
    from flatnb.stats import fmt_test

    if n_models < 1:
        raise ValueError(f"findings need at least one model, got n_models={n_models}")
    lines = [f"**What this run of the atlas shows** ({n_models} trained models; Spearman ρ across models with its "
             "95 % bootstrap interval and permutation p-value; a negative ρ between a flatness measure and a "
             "robustness measure means flatter, more robust):"]
    conf = corr.get(("kappa_sq_train", "conf"))
    if conf is not None:
        related = _says(conf[0]).startswith("a rank")
        lines.append(f"- κ and the mean confidence: ρ = {fmt_test(conf[0])}: {_says(conf[0])}"
                     + (": κ ranks these models much as their confidence does, so the partial correlations below "
                        "are the ones that speak about flatness." if related else "."))
    for key, words in _FINDINGS:
        if key not in corr:
            continue
        raw, part = corr[key]
        line = f"- {words}: ρ = {fmt_test(raw)}: {_says(raw)}"
        if part is not None:
            line += f"; with the mean confidence partialled out, ρ = {fmt_test(part)}: {_says(part)}"
        lines.append(line + ".")
    both, only_flat, only_robust = flatter & more_robust, flatter - more_robust, more_robust - flatter
    lines.append(f"- Flatter minimum than every standard seed: {len(flatter)} method(s) "
                 f"({', '.join(sorted(flatter)) or 'none'}); of these, more robust too: {len(both)} "
                 f"({', '.join(sorted(both)) or 'none'}); flatter but not more robust: {len(only_flat)} "
                 f"({', '.join(sorted(only_flat)) or 'none'}); more robust without being flatter: {len(only_robust)} "
                 f"({', '.join(sorted(only_robust)) or 'none'}).")
    return "\n".join(lines)
