"""The verdict policy, written once: claim rows, how a verdict is decided, how the table reads.

Verdicts (:data:`VERDICTS`):

* **reproduced** — the measured fraction's 95 % interval lies entirely at or above the rule's
  "reproduced" threshold (or, for a non-fraction rule, the rule's stated condition holds);
* **partly** — the interval reaches the "partly" threshold but not entirely above "reproduced":
  the direction holds, the size or the certainty does not;
* **not reproduced** — the whole interval lies below the "partly" threshold, or the book's own
  evidence contradicts the claim;
* **not testable here** — no evidence of the needed quality exists in this run (a model too weak for
  the claim, e.g. any adversarial-training row from the quick profile; a dataset or model out of reach).

Every row also has a **kind** (:data:`KINDS`): ``"evidence"`` (counts), ``"theory"`` (a statement of
mathematics checked in float64; counts) or ``"by construction"`` (true by the way the experiment is
built, e.g. transfer to a temperature-scaled copy: shown, never counted as evidence).

Rows are saved with the run that measured them by :mod:`flatnb.evidence.run_records`.
"""
from __future__ import annotations

import math
from collections import Counter

from flatnb.stats import Fraction, as_interval, fmt

VERDICTS = ("reproduced", "partly", "not reproduced", "not testable here")
KINDS = ("evidence", "theory", "by construction")
_KEYS = ("id", "claim", "paper", "ours", "verdict", "reason", "kind")


def claim(id: str, claim: str, paper: str, ours: str, verdict: str, reason: str = "",
          kind: str = "evidence") -> dict:
    """One row of the verdict table: a claim of the paper, its figure, ours, the verdict and why.

    ``id`` is the paper's experiment label (``"E1"``, ``"E6-rise"``, ...); ``verdict`` one of
    :data:`VERDICTS`; ``kind`` one of :data:`KINDS`. Chapters decide the verdict with :func:`grade`
    (or a stated rule of their own) from their own numbers and say why in ``reason``.
    """
    if verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    row = dict(id=str(id), claim=str(claim), paper=str(paper), ours=str(ours), verdict=verdict,
               reason=str(reason), kind=kind)
    if not row["id"] or not row["claim"]:
        raise ValueError("a claim needs an id and a statement")
    return row


def grade(frac: Fraction, reproduced_at: float = 0.8, partly_at: float = 0.5) -> tuple[str, str]:
    """``(verdict, rule)`` for a fraction, decided on its 95 % Wilson interval.

    reproduced: lower bound >= ``reproduced_at``; not reproduced: upper bound < ``partly_at``;
    partly: otherwise. ``rule`` states the rule and the interval, for the row's ``reason``.
    """
    if not 0 <= partly_at <= reproduced_at <= 1:
        raise ValueError(f"need 0 <= partly_at <= reproduced_at <= 1, got {partly_at}, {reproduced_at}")
    lo, hi = frac.interval
    if lo >= reproduced_at:
        verdict = "reproduced"
    elif hi < partly_at:
        verdict = "not reproduced"
    else:
        verdict = "partly"
    rule = (f"95 % interval {frac}: reproduced if it lies at or above {reproduced_at:g}, "
            f"not reproduced if below {partly_at:g}, else partly")
    return verdict, rule


def across_models(graded: tuple[str, str], per_model: dict, reproduced_at: float = 0.8,
                  partly_at: float = 0.5) -> tuple[str, str]:
    """A verdict decided on fractions pooled over several models, checked against each model alone.

    ``graded`` is the pooled ``(verdict, rule)`` (e.g. :func:`grade` of the pooled fraction); ``per_model``
    ``{model: its own Fraction}``. Pooling hides a model that behaves differently, so the pooled verdict stands
    only when no model *contradicts* it on its own interval: "reproduced" becomes "partly" when some model's
    interval lies wholly below ``reproduced_at``; "not reproduced" becomes "partly" when some model's interval
    lies wholly at or above ``partly_at``. A model whose interval merely straddles a threshold (a smaller sample)
    contradicts nothing. With one model the pooled fraction is that model's, and nothing changes."""
    verdict, rule = graded
    per = {n: f for n, f in per_model.items() if f.n}
    if verdict == "reproduced":
        odd = {n: f for n, f in per.items() if f.interval[1] < reproduced_at}
    elif verdict == "not reproduced":
        odd = {n: f for n, f in per.items() if f.interval[0] >= partly_at}
    else:
        odd = {}
    rule = (f"{rule}; pooled over {len(per)} model(s), and no model alone may contradict the pooled verdict "
            f"on its own interval")
    if not odd:
        return verdict, rule
    return "partly", rule + ": " + ", ".join(f"{n} {f}" for n, f in odd.items()) + f" does not (pooled: {verdict})"


def weak_model(verdict_if_strong: str, reason: str, strong_enough: bool, why_weak: str) -> tuple[str, str]:
    """``(verdict, reason)``: the verdict when the model is adequate for the claim, else
    ``"not testable here"`` with ``why_weak`` (e.g. "the quick AT model has 41 % clean accuracy")."""
    if strong_enough:
        return verdict_if_strong, reason
    return "not testable here", f"{why_weak}; the rule would have said '{verdict_if_strong}' ({reason})"


def grade_interval(v, reproduced_above: float, not_below: float, higher_is_yes: bool = True) -> tuple[str, str]:
    """``(verdict, rule)`` for any interval (a :class:`Fraction`, an ``(estimate, lo, hi)`` bootstrap
    interval): reproduced when the whole interval lies at or beyond ``reproduced_above``, not reproduced
    when the whole interval lies short of ``not_below``, partly otherwise. ``higher_is_yes=False`` turns the
    direction round (the claim says the quantity is small)."""
    est, lo, hi = as_interval(v)
    if higher_is_yes:
        verdict = "reproduced" if lo >= reproduced_above else "not reproduced" if hi < not_below else "partly"
        rule = (f"interval {fmt(v)}: reproduced if it lies at or above {reproduced_above:g}, not reproduced if "
                f"below {not_below:g}, else partly")
    else:
        verdict = "reproduced" if hi <= reproduced_above else "not reproduced" if lo > not_below else "partly"
        rule = (f"interval {fmt(v)}: reproduced if it lies at or below {reproduced_above:g}, not reproduced if "
                f"above {not_below:g}, else partly")
    return verdict, rule


def side(v, ref: float) -> str:
    """Where an interval (a :class:`Fraction`, an ``(estimate, lo, hi)`` tuple or a number) lies against a
    reference value: ``"above"`` if the whole interval lies at or above ``ref``, ``"below"`` if it lies wholly
    below, ``"overlaps"`` otherwise. A chapter turns it into words, so that prose about a result is chosen by
    the run (e.g. "at or above the paper's 0.92"), not typed while looking at one run's outputs."""
    est, lo, hi = as_interval(v)
    if not all(math.isfinite(t) for t in (est, lo, hi, ref)):
        raise ValueError(f"side() needs finite numbers, got interval {(est, lo, hi)} and reference {ref}: "
                         "fix the measurement that gave the NaN")
    return "above" if lo >= ref else "below" if hi < ref else "overlaps"


def grade_ratio(v, paper: float, band: float = 2.5) -> tuple[str, str]:
    """``(verdict, rule)`` for a measured ratio against the paper's: reproduced when the whole interval lies
    within a factor ``band`` of ``paper``, not reproduced when it lies wholly outside, partly otherwise."""
    est, lo, hi = as_interval(v)
    if not (paper > 0 and band > 1 and lo > 0):
        raise ValueError(f"a ratio needs positive numbers and band > 1, got interval {v}, paper {paper}, band {band}")
    inside = paper / band <= lo and hi <= paper * band
    outside = hi < paper / band or lo > paper * band
    verdict = "reproduced" if inside else "not reproduced" if outside else "partly"
    return verdict, (f"ratio {fmt(v, suffix='×')} against the paper's {paper:g}×: reproduced if the interval lies "
                     f"within a factor {band:g} of it, not reproduced if wholly outside, else partly")


def equivalent(diff, margin: float) -> tuple[bool, str]:
    """Whether an interval of a difference (e.g. AutoAttack accuracy of a flatter model minus a standard one)
    excludes every difference that matters (|d| >= ``margin``): the test behind "not more robust". A wide
    interval is not evidence of no difference, so it says False."""
    est, lo, hi = as_interval(diff)
    ok = -margin < lo and hi < margin
    return ok, (f"difference {fmt(diff, signed=True)}: {'within' if ok else 'not within'} the equivalence margin "
                f"±{margin:g}")


#: the bar an adversarially trained model must clear before its rows are evidence (chapters 9, 11, 13)
AT_BAR = {"clean": 0.60, "autoattack_lo": 0.15}


def adequate_at(clean: float, autoattack) -> tuple[bool, str]:
    """``(strong_enough, why_weak)`` for an adversarially trained model: clean accuracy >= 60 % and the lower
    end of its AutoAttack interval >= 15 % (:data:`AT_BAR`). Pass the result to :func:`weak_model`."""
    est, lo, hi = as_interval(autoattack)
    ok = clean >= AT_BAR["clean"] and lo >= AT_BAR["autoattack_lo"]
    return ok, (f"the AT model is not robust enough for this claim ({100 * clean:.1f} % clean, AutoAttack "
                f"{fmt(autoattack, pct=True)}; the bar is {100 * AT_BAR['clean']:.0f} % clean and an AutoAttack "
                f"interval above {100 * AT_BAR['autoattack_lo']:.0f} %)")


#: the clean accuracy a network of the paper's architecture family, trained on this machine, needs before its rows
#: are evidence (chapters 8 and 10): issue 24's targets for two CPU cores, keyed by (dataset, family): a CNN on
#: CIFAR-10 88 %, a ViT on CIFAR-10 70 %, a network on Tiny ImageNet 40 % top-1 (200 classes); CIFAR-100 has no
#: target there (it is not on this machine), so it keeps the book's former bar for any trained model, 60 %
ARCH_BAR = {("cifar10", "cnn"): 0.88, ("cifar10", "vit"): 0.70, ("tinyimagenet", "cnn"): 0.40,
            ("tinyimagenet", "vit"): 0.40, ("cifar100", "cnn"): 0.60}


def adequate_arch(arch: str, dataset: str, clean: float, ours: str, paper: str) -> tuple[bool, str]:
    """``(strong_enough, why_weak)`` for a claim about the paper's architecture ``arch`` on ``dataset``: the model
    run here (``ours``, e.g. ``"WRN-16-4"``, a CPU recipe of the same family as the paper's ``paper``, e.g.
    ``"WRN-28-4"``) must reach :data:`ARCH_BAR`'s clean accuracy. A narrower or shallower network of the
    family that clears the bar is evidence; the row names both. Pass the result to :func:`weak_model`."""
    family = "vit" if arch.startswith("vit") else "cnn"
    if (dataset, family) not in ARCH_BAR:
        raise ValueError(f"no accuracy bar for a {family} on {dataset!r}: add one to claims.ARCH_BAR "
                         f"(it has {sorted(ARCH_BAR)})")
    if not 0.0 <= clean <= 1.0:
        raise ValueError(f"clean accuracy must be a fraction in [0, 1], got {clean!r}")
    bar = ARCH_BAR[dataset, family]
    same = "" if ours == paper else f", the paper's {paper} in a smaller CPU recipe"
    return clean >= bar, (f"{ours}{same} reaches {100 * clean:.1f} % clean, below the bar of {100 * bar:.0f} % "
                          f"for a {family.upper()} on {dataset}")


def markdown_table(header, rows) -> str:
    """A Markdown table from a header and rows of cells (each cell str()-ed, pipes escaped): the one way a
    chapter builds a table (``display(Markdown(markdown_table(...)))``)."""
    header = list(header)
    rows = [list(r) for r in rows]
    if not header or any(len(r) != len(header) for r in rows):
        raise ValueError(f"every row needs {len(header)} cells (the header's), got {[len(r) for r in rows]}")
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# ---- rules of chapters 2-8
# Each rule takes a chapter's numbers and returns ``(verdict, rule)``: the rule is written here once, stated in
# words for the row's ``reason``, and tested in tests/test_rules_ch2_8.py.

def grade_checks(checks: dict[str, bool]) -> tuple[str, str]:
    """``(verdict, rule)`` for a theory row decided by exact checks (``{statement: held}``): reproduced when
    every check holds, not reproduced when any fails (no "partly": mathematics holds or it does not)."""
    if not checks:
        raise ValueError("grade_checks needs at least one named check")
    failed = [name for name, ok in checks.items() if not bool(ok)]
    verdict = "not reproduced" if failed else "reproduced"
    rule = "reproduced if every check holds: " + "; ".join(checks)
    return verdict, rule + (f" (failed: {'; '.join(failed)})" if failed else "")


def grade_weakest(fracs, reproduced_at: float = 0.8, partly_at: float = 0.5) -> tuple[str, str]:
    """``(verdict, rule)`` for a claim that needs every fraction in ``fracs`` at once: each is graded with
    :func:`grade` and the weakest verdict wins (not reproduced < partly < reproduced)."""
    graded = [grade(f, reproduced_at, partly_at) for f in fracs]
    if not graded:
        raise ValueError("grade_weakest needs at least one fraction")
    order = ("not reproduced", "partly", "reproduced")
    verdict = min((v for v, _ in graded), key=order.index)
    return verdict, (f"the weakest of {', '.join(fmt(f) for f in fracs)} decides: reproduced if every interval lies "
                     f"at or above {reproduced_at:g}, not reproduced if one lies below {partly_at:g}, else partly")


def grade_above_null(frac: Fraction, null: float, reproduced_at: float = 0.8,
                     partly_at: float = 0.5) -> tuple[str, str]:
    """``(verdict, rule)``: :func:`grade` of ``frac``, but not reproduced when its interval does not lie wholly
    above ``null`` (the share a shuffled control gives: the effect must beat chance before its size counts)."""
    if frac.lo <= null:
        return "not reproduced", f"interval {fmt(frac)} does not lie above the shuffle null {null:.2f}"
    verdict, rule = grade(frac, reproduced_at, partly_at)
    return verdict, f"{rule}; it lies above the shuffle null {null:.2f}"


def grade_if_broken(share: Fraction, baseline: Fraction, broken_below: float = 0.05, reproduced_at: float = 0.9,
                    partly_at: float = 0.2) -> tuple[str, str]:
    """``(verdict, rule)`` for "robust at scale s, but only because the attack fails": :func:`grade` of ``share``
    (inputs not broken at s among the clean-correct) when the unscaled model is broken (its robust accuracy
    ``baseline`` has an interval wholly below ``broken_below``); not reproduced otherwise."""
    if baseline.hi >= broken_below:
        return "not reproduced", f"f_1 is not broken: robust accuracy {fmt(baseline)} reaches {broken_below:g}"
    return grade(share, reproduced_at, partly_at)


def grade_all_intervals(intervals: dict, reproduced_above: float, not_below: float,
                        higher_is_yes: bool = True) -> tuple[str, str]:
    """``(verdict, rule)`` for several intervals (``{name: interval}``) under one :func:`grade_interval` rule:
    reproduced when every one is, not reproduced when every one is not, partly otherwise."""
    if not intervals:
        raise ValueError("grade_all_intervals needs at least one interval")
    graded = {n: grade_interval(v, reproduced_above, not_below, higher_is_yes)[0] for n, v in intervals.items()}
    verdicts = set(graded.values())
    verdict = verdicts.pop() if len(verdicts) == 1 else "partly"
    side = "at or above" if higher_is_yes else "at or below"
    other = "below" if higher_is_yes else "above"
    return verdict, (f"each interval ({'; '.join(f'{n} {fmt(v)}: {graded[n]}' for n, v in intervals.items())}) is "
                     f"reproduced if it lies {side} {reproduced_above:.3g}, not reproduced if it lies {other} "
                     f"{not_below:.3g}; reproduced if all are, not reproduced if none is, else partly")


def peak_key(intervals: dict):
    """The key (e.g. a scale ``s``) whose interval has the largest estimate."""
    if not intervals:
        raise ValueError("peak_key needs at least one interval")
    est = {key: as_interval(v)[0] for key, v in intervals.items()}
    return max(est, key=est.__getitem__)


def falls(intervals: dict, keys=None) -> bool:
    """Whether a quantity falls along ``keys`` (default: the sorted keys of ``intervals``): the estimates never
    rise from one key to the next, and the last interval lies wholly below the first."""
    keys = sorted(intervals) if keys is None else list(keys)
    if len(keys) < 2:
        raise ValueError(f"a fall needs at least two keys, got {keys}")
    est = [as_interval(intervals[k]) for k in keys]
    return all(b[0] <= a[0] for a, b in zip(est, est[1:])) and est[-1][2] < est[0][1]


def grade_falls(intervals: dict, partly: bool, partly_rule: str) -> tuple[str, str]:
    """``(verdict, rule)`` for "larger key, lower value": reproduced when the quantity :func:`falls` over all keys,
    partly when the chapter's weaker condition ``partly`` holds (stated in ``partly_rule``), else not reproduced."""
    verdict = "reproduced" if falls(intervals) else "partly" if partly else "not reproduced"
    return verdict, ("reproduced if the estimates never rise with the key and the last interval lies below the "
                     f"first; partly if {partly_rule}; else not reproduced")


def counts(rows: list[dict], kind: str | None = None) -> Counter:
    """Verdict counts over the rows that count (``kind != "by construction"``), or over the rows of
    one ``kind`` (``"evidence"`` or ``"theory"``; by-construction rows are never counted)."""
    if kind is not None and kind not in KINDS[:2]:
        raise ValueError(f"counts are kept for kind 'evidence' or 'theory' only, got {kind!r}")
    return Counter(r["verdict"] for r in rows if r.get("kind", "evidence") != "by construction"
                   and (kind is None or r.get("kind", "evidence") == kind))



def _cell(s) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def claims_markdown(rows: list[dict], source: bool = False, provenance: bool = False) -> str:
    """The rows as two Markdown tables: a compact one (id, claim, [from,] paper, this book, verdict[, source])
    and a second one with each row's reason ("why") [and where the claim comes from], so the first fits the
    text column. ``provenance`` shows each row's ``provenance`` (``paper``, ``secondary``, ``derived``: see
    :mod:`flatnb.evidence.provenance`) and its ``provenance_note``."""
    if not rows:
        raise ValueError("no claim rows to show")
    cols = ["id", "claim"] + (["provenance"] if provenance else []) + ["paper", "ours", "verdict"] + \
        (["source"] if source else [])
    names = ["#", "claim"] + (["from"] if provenance else []) + ["paper", "this book", "verdict"] + \
        (["run"] if source else [])

    def verdict(r):
        v = f"**{r['verdict']}**"
        return v + " (by construction, not counted)" if r.get("kind") == "by construction" else v

    def value(r, c):
        if c == "provenance":
            return r.get("provenance") or "**none**"
        return verdict(r) if c == "verdict" else r.get(c, "")

    head = "| " + " | ".join(names) + " |\n|" + "---|" * len(names) + "\n"
    table = head + "\n".join("| " + " | ".join(_cell(value(r, c)) for c in cols) + " |" for r in rows)
    if provenance:
        why = "| # | where the claim comes from | why (the rule and the evidence) |\n|---|---|---|\n" + "\n".join(
            f"| {_cell(r['id'])} | {_cell(r.get('provenance_note') or '—')} | {_cell(r.get('reason', ''))} |"
            for r in rows)
    else:
        why = "| # | why (the rule and the evidence) |\n|---|---|\n" + "\n".join(
            f"| {_cell(r['id'])} | {_cell(r.get('reason', ''))} |" for r in rows)
    return table + "\n\n" + why


def paper_markdown(rows) -> str:
    """The "paper versus this book" table: rows of (experiment, quantity, paper's number, ours)."""
    rows = list(rows)
    if not rows:
        raise ValueError("no rows for the paper table")
    head = "| # | quantity | paper | this book |\n|---|---|---|---|\n"
    return head + "\n".join("| " + " | ".join(_cell(v) for v in r) + " |" for r in rows)


def check_rows(rows: list[dict]) -> list[dict]:
    """Validate rows read back from a record (all keys present, verdict and kind known)."""
    out = []
    for r in rows:
        missing = [k for k in _KEYS if k not in r and k != "kind"]
        if missing:
            raise ValueError(f"claim row {r!r} lacks {missing}; build rows with flatnb.evidence.claims.claim(...)")
        if r["verdict"] not in VERDICTS or r.get("kind", "evidence") not in KINDS:
            raise ValueError(f"claim row {r.get('id')!r} has an unknown verdict or kind")
        out.append({**r, "kind": r.get("kind", "evidence")})
    return out


# ---- rules of chapters 9-13


def grade_basin(ratio, all_wider: bool, delayed: bool, paper: float = 20.0) -> tuple[str, str]:
    """``(verdict, rule)`` for E2's wider basin (chapter 9): reproduced when the AT / standard basin-width
    ratio's interval lies at or above half the paper's factor and the basin is wider under every absolute
    take-off threshold (``all_wider``) and delayed relative to each path's own rise (``delayed``); partly when
    only the lower end exceeds 1; not reproduced otherwise."""
    est, lo, hi = as_interval(ratio)
    verdict = ("reproduced" if lo >= paper / 2 and all_wider and delayed else
               "partly" if lo > 1 else "not reproduced")
    return verdict, (f"ratio interval {fmt(ratio, spec='.1f', suffix='×')}: reproduced if its lower end is at least "
                     f"{paper / 2:g}× (half the paper's {paper:g}×) and wider under every threshold "
                     f"({'yes' if all_wider else 'no'}) and delayed relative to its own rise "
                     f"({'yes' if delayed else 'no'}); partly if the lower end exceeds 1")


def enough_paths(parts: dict, min_n: int = 5) -> tuple[bool, str]:
    """``(enough, why_not)`` for the valley's parts of one model (chapters 9 and 10; ``{name: Fraction}``,
    e.g. :meth:`flatnb.measure.crossing.ValleyParts.fractions`): every part is counted over at least ``min_n``
    paths. Fewer (a model on which almost nothing flips, or the rise on a model that is confident about almost
    no clean input) leave nothing to grade; ``why_not`` names the short parts. Pass it to :func:`weak_model`."""
    if not parts:
        raise ValueError("enough_paths needs at least one part")
    if not isinstance(min_n, int) or min_n < 1:
        raise ValueError(f"min_n must be a positive integer, got {min_n!r}")
    short = {name: f.n for name, f in parts.items() if f.n < min_n}
    return not short, ("too few paths to grade: " + ", ".join(f"{name} over {n}" for name, n in short.items())
                       + f" (fewer than {min_n})")


#: the clean accuracy every trained model of a zoo needs before claims about its minima are evidence
ZOO_BAR = {"clean": 0.75}


def adequate_zoo(clean: dict, at: dict | None = None) -> tuple[bool, str]:
    """``(strong_enough, why_weak)`` for claims across a zoo of trained models (chapter 13): every model's
    clean accuracy (``{name: accuracy}``) at or above :data:`ZOO_BAR` (a network far from it, e.g. 2 epochs
    at 60 %, is not at a minimum). An adversarially trained model gives up clean accuracy by design: those in
    ``at`` (``{name: its AutoAttack ℓ∞ 8/255 interval}``) may instead clear the AT bar (:func:`adequate_at`,
    the evidence bar of chapter 9). Pass the result to :func:`weak_model`."""
    if not clean:
        raise ValueError("adequate_zoo needs the clean accuracy of at least one model")
    at = at or {}
    unknown = sorted(set(at) - set(clean))
    if unknown:
        raise ValueError(f"adequate_zoo: AT models {unknown} have no clean accuracy in the zoo")
    weak = {n: a for n, a in clean.items() if a < ZOO_BAR["clean"] and not (n in at and adequate_at(a, at[n])[0])}
    lowest = min(weak.items(), key=lambda kv: kv[1]) if weak else min(clean.items(), key=lambda kv: kv[1])
    also = (f", nor, for the adversarially trained ones, {100 * AT_BAR['clean']:.0f} % clean with an AutoAttack "
            f"interval above {100 * AT_BAR['autoattack_lo']:.0f} %" if at else "")
    return not weak, (f"{len(weak)} of the zoo's {len(clean)} models reach neither the bar of "
                      f"{100 * ZOO_BAR['clean']:.0f} % clean accuracy{also} (lowest: {lowest[0]}, "
                      f"{lowest[1]:.1%}): networks so far from convergence are not at a minimum")


def grade_sufficiency(flatter: dict, diffs: dict, margin: float = 0.05,
                      more_robust: dict | None = None) -> tuple[str, str]:
    """``(verdict, reason)`` for "a flatter minimum is not sufficient for robustness" (chapter 13).

    ``flatter``: ``{model: whether its κ interval lies below every standard seed's}`` (models comparable with
    the standard seeds only: same architecture); ``diffs``: ``{model: interval of its AutoAttack accuracy minus
    the standard models'}`` (:func:`flatnb.stats.diff_ci`); ``more_robust``: ``{model: whether any other measure
    of robustness (the other norm, the flip radius) shows it more robust than every standard seed}``.
    Reproduced when some flatter model is *shown* no more robust: its AutoAttack difference within ``±margin``
    (:func:`equivalent`) and no other measure showing it more robust (AutoAttack at a floor of 0 % cannot see a
    gain that the flip radius sees). Not reproduced when every flatter model is more robust (the difference's
    lower end above 0, or another measure). Not testable here when no model is flatter, or when the intervals
    are too wide to tell (failing to detect a difference is not evidence of none)."""
    more_robust = more_robust or {}
    flat = sorted(n for n, f in flatter.items() if f)
    if not flat:
        return "not testable here", "no training method gave a minimum flatter than every standard seed"
    same = [n for n in flat if equivalent(diffs[n], margin)[0] and not more_robust.get(n, False)]
    more = [n for n in flat if as_interval(diffs[n])[1] > 0 or more_robust.get(n, False)]
    detail = "; ".join(f"{n}: {equivalent(diffs[n], margin)[1]}"
                       + (", more robust by another measure" if more_robust.get(n, False) else "") for n in flat)
    if same:
        return "reproduced", f"flatter and shown no more robust (AutoAttack): {', '.join(same)} ({detail})"
    if len(more) == len(flat):
        return "not reproduced", f"every flatter model is more robust: {detail}"
    return "not testable here", (f"inconclusive: the flatter models are neither shown more robust nor within "
                                 f"±{margin:g} of the standard models' AutoAttack accuracy ({detail})")


def grade_rank(partial, collinearity=None, max_collinearity: float = 0.9) -> tuple[str, str]:
    """``(verdict, rule)`` for "κ does not rank models by robustness once confidence is partialled out"
    (chapter 13), from the partial rank correlation's interval (``None``: undefined). Reproduced when its
    lower end is above -0.3, not reproduced when its upper end is below 0, partly otherwise; not testable
    here when ``collinearity`` (the rank correlation of κ with confidence) exceeds ``max_collinearity`` in
    size, since partialling out a variable κ nearly equals leaves nothing to rank."""
    if partial is None:
        return "not testable here", "the flip radii have no ranking across the zoo"
    if collinearity is not None and abs(as_interval(collinearity)[0]) > max_collinearity:
        return "not testable here", (f"κ and confidence rank the models almost alike (ρ {fmt(collinearity, signed=True)}"
                                     f", above {max_collinearity:g} in size): partialling out confidence is "
                                     f"ill-conditioned (partial ρ {fmt(partial, signed=True)})")
    est, lo, hi = as_interval(partial)
    verdict = "reproduced" if lo > -0.3 else "not reproduced" if hi < 0 else "partly"
    return verdict, (f"partial ρ {fmt(partial, signed=True)} (95 % bootstrap interval over models): reproduced if "
                     f"its lower end > -0.3, not reproduced if its upper end < 0, else partly")
