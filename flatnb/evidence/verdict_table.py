"""The verdict table of chapter 12, built from run records (:mod:`flatnb.evidence.run_records`), never from a cache.

Each experiment chapter saves its verdict rows with the run that measured them
(``runs/<device>/<chapter>.<profile>.json``). :func:`collect` picks one record per chapter
(:func:`flatnb.evidence.run_records.choose`: the newest current full-profile record, else the newest quick one;
a stale record is shown only when nothing current exists, and then labelled), checks that every
claim of ``walter2026flatness`` listed in :data:`REQUIRED` has its row, adds the claims no
chapter can test (:data:`UNTESTABLE`) and gives every row its source run and, by id, where its claim comes from
(:mod:`flatnb.evidence.provenance`: the paper, a secondary source, or the book's own derivation). The rest of this module
renders what chapter 12 shows: the sources, the rows by group with counts over the rows that count
(:func:`flatnb.evidence.claims.counts`: by-construction rows are shown, never counted), the verdicts before and
after the policy of :mod:`flatnb.evidence.claims`, and the stored legacy notebooks (``runs/h100/``: full runs
of an older version of the chapters, without records) as evidence that is shown but not counted.
"""
from __future__ import annotations

import html
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from flatnb.evidence import claims as fclaims
from flatnb.evidence import provenance as fprov
from flatnb.evidence import run_records as records

# The rows each chapter must save (ids agreed for the book): the theory of walter2026flatness (the lemma,
# average versus worst case after petzka2021relative, the local bound, local versus global), its
# experiments E1-E6 and its explanation of global robustness by steep walls off the data manifold.
REQUIRED = {
    "02_inputs_are_weights": ("T-lemma", "T-avg-worst"),
    "03_local_bound": ("T-bound-explicit", "T-bound-reported", "T-radius"),
    "04_local_not_global": ("T-local-global",),
    "05_uncanny_valley": ("E6-rise", "E6-peak", "E6-fall", "E6-loss"),
    "06_scale_sweep": ("E1-kappa", "E1-loss", "E1-early", "E1b"),
    "07_gradient_masking": ("E3", "E4", "E3-masking"),
    "08_flatness_detector": ("E5",),
    "09_adversarial_training": ("E2-basin", "E2-trace", "E6-AT"),
    "10_architectures": ("E6-arch-wrn28_4", "E6-arch-vgg11_bn", "E6-arch-densenet121", "E6-arch-vit",
                         "E6-tinyimagenet-resnet18", "E6-tinyimagenet-vit", "E6-cifar100"),
    "11_off_manifold": ("R-walls",),
    "13_atlas": ("A-E2", "A-E6AT", "A-suff", "A-rank", "A-temperature"),
}

# Rows that state mathematics (kind "theory"); T-radius and T-local-global may be measured instead.
THEORY = {"T-lemma", "T-avg-worst", "T-bound-explicit", "T-bound-reported"}

# Claims of the paper no chapter of this book can test, with the reason.
UNTESTABLE = [
    fclaims.claim(
        "E6-LLM", "LLM prompt attacks (GCG on Vicuna-7B, AdvBench) rarely reach truly flat regions",
        "yes (after the Uncanny Valley paper)", "—", "not testable here",
        "needs a 7B language model, GCG and AdvBench: out of scope for a CIFAR book and not runnable "
        "offline"),
]

# Groups of the table: (title, ids or id prefixes); a row joins the first group that matches.
GROUPS = (
    ("Theory: inputs are weights, the local bound, local versus global (chapters 2-4)", ("T-",)),
    ("The uncanny valley on the main model, CIFAR-10 (E6, chapter 5)",
     ("E6-rise", "E6-peak", "E6-fall", "E6-loss")),
    ("The valley on other architectures and datasets (E6, chapter 10)",
     ("E6-arch", "E6-tinyimagenet", "E6-cifar100")),
    ("Temperature scaling and gradient masking (E1, E3, E4; chapters 6-7)", ("E1", "E3", "E4")),
    ("Adversarial training (E2, E6-AT; chapter 9)", ("E2", "E6-AT")),
    ("Flatness as a detector (E5, chapter 8)", ("E5",)),
    ("Steep loss off the data manifold (R-walls, chapter 11)", ("R-walls",)),
    ("The atlas: flatness and robustness across training methods (chapter 13)", ("A-",)),
    ("Claims no chapter of this book can test", ("E6-LLM",)),
)

# The previous table (commit 2962b17, 2026-11-25: rows read from a model cache, all quick CPU runs,
# rules before the interval policy), for the before/after comparison.
BEFORE = {
    "E6-rise": "reproduced", "E6-peak": "partly", "E6-fall": "reproduced", "E6-loss": "reproduced",
    "E1-kappa": "partly", "E1-loss": "partly", "E1-early": "reproduced", "E1b": "partly",
    "E3": "partly", "E4": "reproduced", "E3-masking": "reproduced", "E5": "partly",
    "E2-basin": "partly", "E2-trace": "partly", "E6-AT": "partly",
    "E6-arch-wrn28_4": "partly", "E6-arch-vgg11_bn": "partly", "E6-arch-vit": "partly",
    "E6-tinyimagenet-resnet18": "partly", "E6-tinyimagenet-vit": "partly",
    "E6-cifar100": "not testable here", "E6-arch-densenet121": "not testable here",
    "E6-LLM": "not testable here", "Setup-models": "not testable here",
    "R-walls": "partly", "R-walls-std": "reproduced", "R-walls-at": "reproduced",
}
# rows of the previous table that no longer exist, and why
REMOVED = {
    "Setup-models": "DenseNet-121 is built now (growth rate 12 on two CPU cores): chapter 10 tests it, row "
                    "E6-arch-densenet121",
}


class MissingRecords(ValueError):
    """Raised by :func:`collect` when a required chapter has no record or its record lacks rows."""


@dataclass
class Table:
    """The collected verdict table: rows with their sources, the chosen record of each chapter."""

    rows: list[dict]
    chosen: dict[str, dict]
    others: dict[str, list[dict]] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)


def _num(stem: str) -> str:
    return stem.split("_", 1)[0]


def source_label(rec: dict) -> str:
    """``05: quick, cpu, 2026-11-30, 1a2b3c4`` (+ ``, STALE``): a row's run, short enough for a cell."""
    m = rec["meta"]
    s = f"{_num(m['chapter'])}: {m['profile']}, {m['slug']}, {m['date'][:10]}, {(m.get('commit') or '?')[:7]}"
    return s + (", **STALE**" if rec.get("stale") else "")


def _how_to_run(stem: str) -> str:
    return (f"execute it (`python -m flatnb.book --only {_num(stem)} --no-build`, or run book/{stem}.ipynb "
            f"top to bottom), which writes runs/<device>/{stem}.<profile>.json")


def collect(recs: list[dict] | None = None, required: dict | None = None, untestable=None,
            require_all: bool = True, root=None) -> Table:
    """One record per required chapter (:func:`flatnb.evidence.run_records.choose`), its rows with their source,
    then the :data:`UNTESTABLE` rows.

    ``recs`` defaults to :func:`flatnb.evidence.run_records.load_all` of ``root`` (``FLATNB_RUNS`` or ``runs/``).
    With ``require_all``, a chapter without a record, or whose record lacks a required id, raises
    :class:`MissingRecords` naming the chapter and how to produce its record; otherwise it is listed
    in ``Table.missing`` and the table is partial.
    """
    recs = records.load_all(root) if recs is None else recs
    required = REQUIRED if required is None else required
    untestable = UNTESTABLE if untestable is None else untestable
    rows, chosen, others, missing = [], {}, {}, {}
    for stem, ids in required.items():
        rec = records.choose(recs, stem)
        if rec is None:
            missing[stem] = f"no run record of chapter {stem}: {_how_to_run(stem)}"
            continue
        chosen[stem] = rec
        others[stem] = [r for r in recs if r["meta"]["chapter"] == stem and r is not rec]
        have = [r["id"] for r in rec["rows"]]
        lacking = [i for i in ids if i not in have]
        if lacking:
            missing[stem] = (f"the record {_rel(rec['path'])} of chapter {stem} lacks {', '.join(lacking)} "
                             f"(it was written by an older version of the chapter): {_how_to_run(stem)}")
        label = source_label(rec)
        rows += [{**r, "chapter": stem, "source": label, "stale": rec.get("stale")} for r in rec["rows"]]
    rows += [{**r, "chapter": "—", "source": "no run (not testable here)", "stale": False}
             for r in fclaims.check_rows(untestable)]
    rows = [{**r, **_provenance(r["id"])} for r in rows]
    seen = Counter(r["id"] for r in rows)
    twice = sorted(i for i, n in seen.items() if n > 1)
    if twice:
        where = {i: sorted({r["chapter"] for r in rows if r["id"] == i}) for i in twice}
        raise ValueError(f"verdict row ids occur more than once: {where}; each claim must have one row "
                         "(rename or drop the duplicate in the chapter that saves it)")
    ignored = sorted({r["meta"]["chapter"] for r in recs} - set(required))
    if missing and require_all:
        raise MissingRecords("the verdict table is incomplete:\n- " + "\n- ".join(missing.values()) +
                             "\n(in a clone of the repository the committed records under runs/ are read)")
    return Table(rows, chosen, others, missing, ignored)


def _provenance(row_id: str) -> dict:
    """The row's provenance fields from :mod:`flatnb.evidence.provenance` (by id, never from the record);
    ``None`` for an id without an entry, which :func:`policy_problems` reports."""
    try:
        kind, note = fprov.of(row_id)
    except fprov.MissingProvenance:
        return {"provenance": None, "provenance_note": None}
    return {"provenance": kind, "provenance_note": note}


def _rel(path) -> str:
    """A record's path from the runs folder's parent (``runs/cpu/...``): no machine paths in pages."""
    p = Path(path)
    return "/".join(p.parts[-3:])


def policy_problems(table: Table) -> list[str]:
    """Rows that break the verdict policy of :mod:`flatnb.evidence.claims` (empty when all is well).

    Checked: every row states its rule or evidence (a non-empty reason); the theory rows of
    chapters 2-3 are marked ``kind="theory"``; every row says where its claim comes from (an entry of
    :data:`flatnb.evidence.provenance.PROVENANCE`); each row's source record says its profile, device,
    date and commit.
    """
    out = []
    for r in table.rows:
        if not r.get("reason", "").strip():
            out.append(f"{r['id']}: no reason (the rule and the evidence behind the verdict)")
        if r["id"] in THEORY and r.get("kind") != "theory":
            out.append(f"{r['id']}: a statement of mathematics must have kind='theory', has {r.get('kind')!r}")
        if r.get("provenance") not in fprov.KINDS:
            out.append(f"{r['id']}: no provenance (paper, secondary or derived): add it to "
                       "flatnb.evidence.provenance.PROVENANCE")
    out += fprov.check()
    for stem, rec in table.chosen.items():
        m = rec["meta"]
        lacking = [k for k in ("profile", "device", "date", "commit") if not m.get(k)]
        if lacking:
            out.append(f"record {_rel(rec['path'])} of {stem} lacks {', '.join(lacking)}")
    return out


# ----------------------------------------------------------------------------- rendering


def _status(rec: dict) -> str:
    if rec.get("stale"):
        return "**STALE**: " + (rec.get("stale_why") or "the code changed after this run")
    if rec.get("stale") is None:
        return "age unknown (no fingerprint, no git history)"
    return "current"


def _short(rec: dict) -> str:
    m = rec["meta"]
    return f"{m['profile']}, {m['slug']}, {m['date'][:10]}" + (" (stale)" if rec.get("stale") else "")


def sources_markdown(table: Table) -> str:
    """One line per chapter: the record shown, its device, seed and wall time, its status (current,
    stale with the files that changed, or unknown) and the records of the chapter not shown."""
    head = "| ch. | record shown | device | seed | wall | status | other records (not shown) |\n|" + "---|" * 7 + "\n"
    lines = []
    for stem, rec in table.chosen.items():
        m = rec["meta"]
        other = "; ".join(_short(r) for r in table.others.get(stem, [])) or "—"
        lines.append(f"| {_num(stem)} | {fclaims._cell(source_label(rec).split(': ', 1)[1])} | "
                     f"{fclaims._cell(m['device'])} | {m.get('seed', '?')} | {m.get('wall_s', '?')} s | "
                     f"{fclaims._cell(_status(rec))} | "
                     f"{fclaims._cell(other)} |")
    for stem, why in table.missing.items():
        if stem not in table.chosen:
            lines.append(f"| {_num(stem)} | **missing** | — | — | — | {fclaims._cell(why)} | — |")
    note = (f"\n\nRecords of chapters with no required rows (not shown): {', '.join(table.ignored)}."
            if table.ignored else "")
    return head + "\n".join(lines) + note


def source_line(table: Table) -> str:
    """How many rows come from which profile and device, and how many from stale records."""
    by = Counter((table.chosen[r["chapter"]]["meta"]["profile"], table.chosen[r["chapter"]]["meta"]["device"])
                 for r in table.rows if r["chapter"] in table.chosen)
    stale = sum(1 for r in table.rows if r.get("stale"))
    none = sum(1 for r in table.rows if r["chapter"] not in table.chosen)
    parts = [f"{n} rows {p} on {d}" for (p, d), n in sorted(by.items(), key=lambda kv: -kv[1])]
    s = "Rows by run: " + "; ".join(parts)
    s += f"; {none} row{'' if none == 1 else 's'} without a run (not testable here)." if none else "."
    return s + (f" **{stale} rows come from stale records** (labelled in the table)." if stale else
                " No row comes from a stale record.")


def group_of(row_id: str) -> str:
    for title, keys in reversed(GROUPS):  # the exact ids of the last group win over prefixes
        if row_id in keys:
            return title
    for title, keys in GROUPS:
        if row_id.startswith(keys):
            return title
    return "Other rows"


def grouped(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """``[(group title, rows)]`` in the order of :data:`GROUPS`; unmatched rows last ("Other rows")."""
    order = [t for t, _ in GROUPS] + ["Other rows"]
    out = {t: [] for t in order}
    for r in rows:
        out[group_of(r["id"])].append(r)
    return [(t, out[t]) for t in order if out[t]]


def _tally(rows: list[dict]) -> str:
    parts = []
    for kind, name in (("evidence", "experiments"), ("theory", "theory")):
        members = [r for r in rows if r.get("kind", "evidence") == kind]
        if members:
            c = fclaims.counts(members, kind)
            parts.append(f"{name}: " + ", ".join(f"{c[v]} {v}" for v in fclaims.VERDICTS if c[v]))
    shown = [r["id"] for r in rows if r.get("kind") == "by construction"]
    if shown:
        parts.append("by construction, shown and not counted: " + ", ".join(shown))
    return "; ".join(parts)


def groups_markdown(table: Table) -> str:
    """Each group: a bold title with its counts, the compact table (with each row's run), its "why"."""
    out = []
    for title, rows in grouped(table.rows):
        out.append(f"**{title}** ({_tally(rows)})\n\n" + fclaims.claims_markdown(rows, source=True, provenance=True))
    return "\n\n".join(out)


def _count_line(rows: list[dict], kind: str) -> str:
    c = fclaims.counts(rows, kind)
    return ", ".join(f"{c[v]} {v}" for v in fclaims.VERDICTS)


def counts_markdown(table: Table) -> str:
    """The overall counts: the paper's claims (its own text or a secondary summary, the latter counted
    again on their own) apart from the book's derived statements and hypotheses; experiments and theory
    apart; by-construction rows named but not counted; a row without provenance counted nowhere, named."""
    counted = [r for r in table.rows if r.get("kind", "evidence") != "by construction"]
    paper = [r for r in counted if r.get("provenance") in ("paper", "secondary")]
    secondary = [r for r in paper if r.get("provenance") == "secondary"]
    derived = [r for r in counted if r.get("provenance") == "derived"]
    lines = []
    for kind, name in (("evidence", "experiments"), ("theory", "theory")):
        rows = [r for r in paper if r.get("kind", "evidence") == kind]
        sec = [r for r in rows if r.get("provenance") == "secondary"]
        lines.append(f"- **Claims of the paper, {name}** ({len(rows)} rows, {len(sec)} of them known only from a "
                     f"secondary source): " + _count_line(rows, kind) + ".")
    if secondary:
        lines.append(f"  - of these, the {len(secondary)} rows from a secondary source only: "
                     + _count_line(secondary, None) + ".")
    lines.append(f"- **The book's derived statements and hypotheses** ({len(derived)} rows, not evidence for or "
                 f"against the paper: {', '.join(r['id'] for r in derived) or 'none'}): "
                 + _count_line(derived, None) + ".")
    shown = [r["id"] for r in table.rows if r.get("kind") == "by construction"]
    lines.append("- **By construction** (shown, not counted): " + (", ".join(shown) if shown else "none") + ".")
    unsourced = [r["id"] for r in counted if r.get("provenance") not in fprov.KINDS]
    if unsourced:
        lines.append(f"- **No provenance** (counted nowhere): {', '.join(unsourced)}.")
    if table.missing:
        lines.append(f"- **Missing** (partial table): {', '.join(table.missing)}.")
    return "\n".join(lines) + "\n\n" + source_line(table)


def before_after_markdown(table: Table, before: dict | None = None) -> str:
    """Every id of the previous table and of this one: the verdict before, the verdict now, its run."""
    before = BEFORE if before is None else before
    now = {r["id"]: r for r in table.rows}
    ids = list(now) + [i for i in before if i not in now]
    lines = ["| # | before | now | run of the row now |", "|---|---|---|---|"]
    changed = 0
    for i in ids:
        r = now.get(i)
        if r is None:
            verdict, run = "(row removed)", REMOVED.get(i, "not in this table")
        else:
            verdict = r["verdict"] + (" (by construction)" if r.get("kind") == "by construction" else "")
            run = r["source"]
        old = before.get(i, "— (new row)")
        mark = "" if r is not None and old == r["verdict"] and r.get("kind") != "by construction" else " ←"
        changed += bool(mark)
        lines.append(f"| {fclaims._cell(i)} | {old} | **{fclaims._cell(verdict)}**{mark} | {fclaims._cell(run)} |")
    return "\n".join(lines) + f"\n\n{changed} of {len(ids)} rows differ from the previous table (marked ←)."


# ----------------------------------------------------------------------------- legacy notebooks


def legacy(root=None) -> list[dict]:
    """Executed notebooks under ``runs/*/`` without the ``.json`` record beside them (stored runs of an
    older version of the chapters): path, chapter, profile, device, date, their comparison tables and
    the lines they printed about clean accuracy (the model the numbers rest on)."""
    out = []
    base = records.runs_dir(root)
    for nb_path in sorted(base.glob("*/[0-9][0-9]_*.ipynb")):
        if nb_path.with_suffix(".json").is_file():
            continue  # a run record: read by collect()
        nb = json.loads(nb_path.read_text())
        stem, _, profile = nb_path.stem.partition(".")
        device, tables, printed = None, [], []
        for cell in nb.get("cells", []):
            for o in cell.get("outputs", []):
                text = "".join(o.get("text", "")) if o.get("output_type") == "stream" else \
                    "".join(o.get("data", {}).get("text/markdown", ""))
                for line in text.splitlines():
                    if line.startswith("device:"):
                        device = line.split(":", 1)[1].strip()
                    elif o.get("output_type") == "stream" and "clean accuracy" in line.lower():
                        printed.append(line.strip())
                if text.startswith("| #"):
                    tables.append(_drop_columns(text, ("device", "profile")))
        date = nb.get("metadata", {}).get("papermill", {}).get("end_time") or "?"
        out.append(dict(path=f"runs/{nb_path.parent.name}/{nb_path.name}", chapter=stem,
                        profile=profile or "?", device=device or nb_path.parent.name, date=date[:10],
                        tables=tables, printed=printed))
    return out


def _split(line: str) -> list[str]:
    cells, cur, esc = [], "", False
    for ch in line.strip().strip("|"):
        if ch == "|" and not esc:
            cells.append(cur.strip())
            cur = ""
        else:
            cur += ch
        esc = ch == "\\"
    return cells + [cur.strip()]


def _drop_columns(table: str, names) -> str:
    """A Markdown table without the named columns (constant in a legacy run; said in its header)."""
    lines = [ln for ln in table.strip().splitlines() if ln.strip().startswith("|")]
    if len(lines) < 2:
        return table
    head = _split(lines[0])
    keep = [i for i, h in enumerate(head) if h not in names]
    rows = [_split(ln) for ln in lines]
    fmt = ["| " + " | ".join(r[i] if i < len(r) else "" for i in keep) + " |" for r in rows]
    fmt[1] = "|" + "---|" * len(keep)
    return "\n".join(fmt)


def legacy_markdown(items: list[dict]) -> str:
    """The legacy notebooks, each with its run and its comparison tables; never counted."""
    if not items:
        return "No stored legacy notebooks under runs/."
    out = []
    for it in items:
        head = (f"**{it['path']}**: chapter {_num(it['chapter'])}, {it['profile']} profile, {it['device']}, "
                f"{it['date']}. **Stale legacy evidence**: executed by an older version of the chapter, "
                "no run record; not in the verdict table, not counted.")
        model = "".join(f"\n- printed: `{line}`" for line in it.get("printed", []))
        body = "\n\n".join(it["tables"]) if it["tables"] else \
            "(No comparison table in this notebook; its printed outputs are in the file.)"
        out.append(head + model + "\n\n" + body)
    return "\n\n".join(out)


# ----------------------------------------------------------------------------- banner


def banner_html(table: Table) -> str:
    """The page's banner: which records it reads, how many of each profile, how many stale."""
    recs = list(table.chosen.values())
    prof = Counter(r["meta"]["profile"] for r in recs)
    stale = sum(1 for r in recs if r.get("stale"))
    dates = sorted(r["meta"]["date"][:10] for r in recs)
    span = f"{dates[0]} to {dates[-1]}" if dates else "none"
    lines = [
        "<b>This page computes nothing</b>: it reads the run records the chapters wrote "
        "(<code>runs/&lt;device&gt;/&lt;chapter&gt;.&lt;profile&gt;.json</code>).",
        f"Records shown: {len(recs)} of {len(REQUIRED)} chapters "
        f"({prof.get('full', 0)} full profile, {prof.get('quick', 0)} quick), run {html.escape(span)}; "
        f"{stale} stale." + (" Missing: " + html.escape(", ".join(table.missing)) + "." if table.missing else ""),
        "Paper-scale runs: " + (f"{prof['full']} chapter(s) with a full-profile record." if prof.get("full")
                                 else "pending: no full-profile record yet (on any device: "
                                      "<code>python -m flatnb.book --profile full --jobs 2</code>, about 3 hours on "
                                      "2 CPU cores)."),
    ]
    return ('<div class="flatnb-banner" style="border-left:4px solid #4a7ab5;padding:0.4em 0.8em;'
            'margin:0.5em 0;background:rgba(74,122,181,0.08)">' + "<br>".join(lines) + "</div>")
