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

from collections import Counter

from flatnb.stats import Fraction

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


def weak_model(verdict_if_strong: str, reason: str, strong_enough: bool, why_weak: str) -> tuple[str, str]:
    """``(verdict, reason)``: the verdict when the model is adequate for the claim, else
    ``"not testable here"`` with ``why_weak`` (e.g. "the quick AT model has 41 % clean accuracy")."""
    if strong_enough:
        return verdict_if_strong, reason
    return "not testable here", f"{why_weak}; the rule would have said '{verdict_if_strong}' ({reason})"


def counts(rows: list[dict], kind: str | None = None) -> Counter:
    """Verdict counts over the rows that count (``kind != "by construction"``), or over the rows of
    one ``kind`` (``"evidence"`` or ``"theory"``; by-construction rows are never counted)."""
    if kind is not None and kind not in KINDS[:2]:
        raise ValueError(f"counts are kept for kind 'evidence' or 'theory' only, got {kind!r}")
    return Counter(r["verdict"] for r in rows if r.get("kind", "evidence") != "by construction"
                   and (kind is None or r.get("kind", "evidence") == kind))



def _cell(s) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def claims_markdown(rows: list[dict], source: bool = False) -> str:
    """The rows as two Markdown tables: a compact one (id, claim, paper, this book, verdict[, source])
    and a second one with each row's reason ("why"), so the first fits the text column."""
    if not rows:
        raise ValueError("no claim rows to show")
    cols = ["id", "claim", "paper", "ours", "verdict"] + (["source"] if source else [])
    names = ["#", "claim", "paper", "this book", "verdict"] + (["run"] if source else [])

    def verdict(r):
        v = f"**{r['verdict']}**"
        return v + " (by construction, not counted)" if r.get("kind") == "by construction" else v

    def value(r, c):
        return verdict(r) if c == "verdict" else r.get(c, "")

    head = "| " + " | ".join(names) + " |\n|" + "---|" * len(names) + "\n"
    table = head + "\n".join("| " + " | ".join(_cell(value(r, c)) for c in cols) + " |" for r in rows)
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
