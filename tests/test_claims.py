"""The verdict policy (claims), its intervals (stats) and the run records that carry the rows."""
import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from flatnb import stats
from flatnb.stats import Fraction
from flatnb.evidence import claims, run_records as records


def test_wilson_matches_an_independent_formula_and_known_values():
    # Wilson (1927) written out from its definition: the p solving |p_hat - p| = z sqrt(p(1-p)/n)
    def roots(k, n, z=stats.Z95):
        ph = k / n
        a, b, c = 1 + z * z / n, -(2 * ph + z * z / n), ph * ph
        d = math.sqrt(b * b - 4 * a * c)
        return (-b - d) / (2 * a), (-b + d) / (2 * a)

    for k, n in ((0, 10), (3, 10), (10, 10), (77, 100), (1, 1000)):
        lo, hi = stats.wilson(k, n)
        rl, rh = roots(k, n)
        assert math.isclose(lo, max(0.0, rl), abs_tol=1e-12) and math.isclose(hi, min(1.0, rh), abs_tol=1e-12)
    # a textbook value: 81 of 263 -> [0.2553, 0.3662] (Newcombe 1998, table I)
    lo, hi = stats.wilson(81, 263)
    assert abs(lo - 0.2553) < 5e-4 and abs(hi - 0.3662) < 5e-4


@given(st.integers(1, 500).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_contains_the_point_and_stays_in_unit_interval(kn):
    k, n = kn
    lo, hi = stats.wilson(k, n)
    assert 0 <= lo <= k / n <= hi <= 1


def test_fraction_refuses_empty_and_non_boolean_input():
    with pytest.raises(stats.EmptySelection, match="n >= 1"):
        stats.wilson(0, 0)
    for empty in (lambda: stats.Fraction(0, 0).value, lambda: stats.Fraction(0, 0).lo,
                  lambda: stats.bootstrap_ci([])):
        with pytest.raises(stats.EmptySelection):  # nothing counted: its own type, still a ValueError
            empty()
    assert issubclass(stats.EmptySelection, ValueError) and str(stats.Fraction(0, 0)) == "— (n=0)"
    with pytest.raises(ValueError, match="boolean"):
        stats.Fraction.of(np.array([0.5, 1.0]))
    f = stats.Fraction.of(np.array([True, False, True, True]))
    assert (f.k, f.n) == (3, 4) and str(f).startswith("0.75 [")


def test_bootstrap_refuses_nan_and_brackets_the_median():
    with pytest.raises(ValueError, match="non-finite"):
        stats.bootstrap_ci([1.0, float("nan")])
    est, lo, hi = stats.bootstrap_ci(np.arange(101.0))
    assert lo <= est == 50.0 <= hi


def test_grade_decides_on_the_interval_not_the_point():
    assert claims.grade(stats.Fraction(95, 100))[0] == "reproduced"  # interval [0.89, 0.98] >= 0.8
    assert claims.grade(stats.Fraction(9, 10))[0] == "partly"  # point 0.9, but the interval reaches 0.6
    assert claims.grade(stats.Fraction(10, 100))[0] == "not reproduced"  # [0.06, 0.17] < 0.5
    assert claims.grade(stats.Fraction(45, 100))[0] == "partly"
    verdict, rule = claims.grade(stats.Fraction(95, 100))
    assert "95 % interval" in rule and "0.8" in rule


def test_claim_rows_and_by_construction_rows_are_not_counted():
    rows = [claims.claim("E3", "a | b", "93 %", "88.9 %", "reproduced"),
            claims.claim("E4", "transfer", "100 %", "100 %", "reproduced", kind="by construction"),
            claims.claim("T-bound", "the L^6 form", "stated", "violated", "not reproduced", kind="theory")]
    assert claims.counts(rows) == {"reproduced": 1, "not reproduced": 1}
    md = claims.claims_markdown(rows)
    assert "a \\| b" in md and "by construction, not counted" in md and "| # | why" in md
    with pytest.raises(ValueError, match="verdict must be one of"):
        claims.claim("E3", "x", "y", "z", "maybe")
    with pytest.raises(ValueError, match="kind must be one of"):
        claims.claim("E3", "x", "y", "z", "partly", kind="vibes")
    assert claims.weak_model("reproduced", "r", False, "quick AT model at 40 %")[0] == "not testable here"


def test_records_round_trip_choose_and_reject_corrupt_files(tmp_path, monkeypatch):
    monkeypatch.setenv("FLATNB_RUNS", str(tmp_path))
    rows = [claims.claim("E6-rise", "k rises", "yes", "0.9", "reproduced")]
    quick = records.meta("05_uncanny_valley", "quick", "cpu", 0, 12.3)
    p = records.save(rows, quick)
    assert p == tmp_path / "cpu" / "05_uncanny_valley.quick.json"
    full = dict(quick, profile="full", slug="nvidia-h200", device="cuda (NVIDIA H200)", date="2099-01-01T00:00:00Z")
    records.save(rows, full)
    smoke = dict(quick, profile="smoke", date="2099-02-01T00:00:00Z")
    assert records.save(rows, smoke).name == "05_uncanny_valley.smoke.json"
    recs = records.load_all()
    assert len(recs) == 2, "a smoke run's record is no evidence: never loaded"
    for r in recs:
        r["stale"] = False
    assert records.choose(recs, "05_uncanny_valley")["meta"]["profile"] == "full"
    recs[1 if recs[1]["meta"]["profile"] == "full" else 0]["stale"] = True
    assert records.choose(recs, "05_uncanny_valley")["meta"]["profile"] == "quick"  # stale full loses
    assert records.choose(recs, "06_scale_sweep") is None
    (tmp_path / "cpu" / "07_gradient_masking.quick.json").write_text("{not json")
    with pytest.raises(ValueError, match="delete it and re-run"):
        records.load_all()
    with pytest.raises(ValueError, match="saves no rows"):
        records.save([], quick)
    json.loads(p.read_text())  # the saved file is plain JSON


def test_a_smoke_chapter_writes_no_record_unless_the_dry_run_names_a_folder(tmp_path, monkeypatch):
    from flatnb.book import chapter

    monkeypatch.setenv("FLATNB_RUNS", str(tmp_path / "runs"))
    monkeypatch.delenv("FLATNB_RUN_DIR", raising=False)
    rows = [claims.claim("E6-rise", "k rises", "yes", "0.9", "reproduced")]
    ch = chapter.setup("05_uncanny_valley", "smoke", "cpu", banner=False)
    assert ch.sizes.n_test == 24 and "Smoke profile" in ch.banner_html()
    ch.verdicts(rows)
    assert ch.record is None and not (tmp_path / "runs").exists()
    monkeypatch.setenv("FLATNB_RUN_DIR", str(tmp_path / "dry"))
    ch.verdicts(rows)
    assert ch.record == tmp_path / "dry" / "05_uncanny_valley.smoke.json"


# ----------------------------------------------------------------------------- fingerprints and chapter 12

def _notebook(path, code, outputs=()):
    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

    cells = [new_markdown_cell("# title")] + [new_code_cell(c) for c in code]
    cells[1].outputs = [new_output("stream", name="stdout", text=t) for t in outputs]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(new_notebook(cells=cells), path)


def test_fingerprint_sees_code_changes_but_not_comments_docstrings_or_outputs(tmp_path):
    mod = tmp_path / "flatnb" / "x.py"
    mod.parent.mkdir()
    mod.write_text('"""doc"""\ndef f(a):\n    return a + 1\n')
    _notebook(tmp_path / "book" / "05_x.ipynb", ["f(1)"])
    rec = {"meta": {"fingerprint": records.fingerprint("05_x", repo=tmp_path, modules=[mod])}}
    assert set(rec["meta"]["fingerprint"]["files"]) == {"flatnb/x.py", "book/05_x.ipynb"}
    assert records.changed_files(rec, tmp_path) == [] and records.is_stale(rec, tmp_path) is False
    mod.write_text('"""another doc"""\n# a comment\ndef f(a):\n    """and a docstring"""\n    return (a + 1)\n')
    _notebook(tmp_path / "book" / "05_x.ipynb", ["f(1)"], outputs=["2\n"])  # executed: outputs only
    assert records.changed_files(rec, tmp_path) == []
    mod.write_text('def f(a):\n    return a + 2\n')
    assert records.changed_files(rec, tmp_path) == ["flatnb/x.py"] and records.is_stale(rec, tmp_path)
    mod.unlink()
    _notebook(tmp_path / "book" / "05_x.ipynb", ["f(2)"])
    assert records.changed_files(rec, tmp_path) == ["book/05_x.ipynb", "flatnb/x.py (gone)"]
    assert records.changed_files({"meta": {}}, tmp_path) is None  # no fingerprint: git decides


def _fake_rows(stem):
    from flatnb.evidence import verdict_table as verdict

    kinds = {"E4": "by construction", **{i: "theory" for i in verdict.THEORY}}
    return [claims.claim(i, f"claim {i}", "paper", "ours", "partly" if i != "E3" else "reproduced",
                         reason=f"rule for {i}", kind=kinds.get(i, "evidence")) for i in verdict.REQUIRED[stem]]


def _fake_records(root, profile="quick", slug="cpu", date="2026-11-30T01:00:00Z", stems=None):
    from flatnb.evidence import verdict_table as verdict

    for stem in stems or verdict.REQUIRED:
        m = dict(records.meta(stem, profile, "cpu", 0, 1.0), slug=slug, date=date, commit="c" * 40)
        records.save(_fake_rows(stem), m, root)


def test_a_record_depends_on_its_own_sizes_not_on_other_chapters_or_time_estimates(tmp_path):
    """Resizing one chapter, or correcting a CPU-time estimate, must not make every other chapter's record stale;
    a change to a shared table (an attack budget) must."""
    budgets = tmp_path / "flatnb" / "config" / "budgets.py"
    budgets.parent.mkdir(parents=True)
    base = ('"""doc"""\nATTACKS = {"pgd": dict(eps=8 / 255, steps=10)}\n'
            'SIZES = {\n    "03_a": {"full": dict(n=500)},\n    "05_b": {"full": dict(n=1000)},\n}\n'
            'CPU_MINUTES = {"full": {"03_a": 10, "05_b": 25}}\n\ndef sizes(stem):\n    return SIZES[stem]\n')
    budgets.write_text(base)
    recs = {c: {"meta": {"chapter": c, "fingerprint": records.fingerprint(c, repo=tmp_path, modules=[budgets])}}
            for c in ("03_a", "05_b")}
    assert recs["03_a"]["meta"]["fingerprint"] != recs["05_b"]["meta"]["fingerprint"]
    stale = lambda: {c: records.changed_files(r, tmp_path) for c, r in recs.items()}  # noqa: E731
    assert stale() == {"03_a": [], "05_b": []}
    budgets.write_text(base.replace('"03_a": 10', '"03_a": 95'))  # a time estimate
    assert stale() == {"03_a": [], "05_b": []}
    budgets.write_text(base.replace("n=500", "n=200"))  # chapter 3's sizes
    assert stale() == {"03_a": ["flatnb/config/budgets.py"], "05_b": []}
    budgets.write_text(base.replace("steps=10", "steps=20"))  # a shared attack budget
    assert stale() == {"03_a": ["flatnb/config/budgets.py"], "05_b": ["flatnb/config/budgets.py"]}
    budgets.write_text(base.replace("return SIZES[stem]", "return dict(SIZES[stem])"))  # a function of the module
    assert stale() == {"03_a": ["flatnb/config/budgets.py"], "05_b": ["flatnb/config/budgets.py"]}
    # the package's own budgets module: each chapter hashes differently (its own entry), the same for each run
    real = records.REPO / records.BUDGETS
    h = {c: records.budgets_hash(real, c) for c in ("03_local_bound", "05_uncanny_valley", "12_verdict")}
    assert len(set(h.values())) == 3 and records.budgets_hash(real, "03_local_bound") == h["03_local_bound"]


def _make_stale(root, slug, stem, profile):
    path = records.record_path(stem, profile, slug, root)
    rec = json.loads(path.read_text())
    rec["meta"]["fingerprint"]["files"]["flatnb/claims.py"] = "0" * 16  # as if claims.py changed since
    path.write_text(json.dumps(rec))


def test_verdict_table_prefers_current_full_records_and_labels_stale_ones(tmp_path, monkeypatch):
    from flatnb.evidence import verdict_table as verdict

    monkeypatch.setenv("FLATNB_RUNS", str(tmp_path))
    _fake_records(tmp_path)  # every chapter, quick, current
    _fake_records(tmp_path, "full", "nvidia-h200", "2026-11-29T00:00:00Z", stems=["05_uncanny_valley"])
    table = verdict.collect()
    assert table.chosen["05_uncanny_valley"]["meta"]["profile"] == "full"  # current full beats newer quick
    assert table.chosen["06_scale_sweep"]["meta"]["profile"] == "quick"
    e6 = next(r for r in table.rows if r["id"] == "E6-rise")
    assert e6["source"] == "05: full, nvidia-h200, 2026-11-29, ccccccc" and e6["chapter"] == "05_uncanny_valley"
    assert "quick, cpu, 2026-11-30" in verdict.sources_markdown(table)  # the record not shown is named
    assert not verdict.policy_problems(table)

    _make_stale(tmp_path, "nvidia-h200", "05_uncanny_valley", "full")
    table = verdict.collect()
    assert table.chosen["05_uncanny_valley"]["meta"]["profile"] == "quick"  # a stale full record loses
    src = verdict.sources_markdown(table)
    assert "full, nvidia-h200, 2026-11-29 (stale)" in src and "STALE" not in verdict.source_line(table)

    _make_stale(tmp_path, "cpu", "05_uncanny_valley", "quick")  # nothing current left: shown, labelled
    table = verdict.collect()
    e6 = next(r for r in table.rows if r["id"] == "E6-rise")
    assert e6["stale"] and e6["source"].endswith("**STALE**")
    assert "changed since: flatnb/claims.py" in verdict.sources_markdown(table)
    assert "4 rows come from stale records" in verdict.source_line(table)
    assert "STALE" in verdict.groups_markdown(table)


def test_verdict_table_counts_names_missing_chapters_and_shows_legacy_runs(tmp_path, monkeypatch):
    from flatnb.evidence import verdict_table as verdict

    monkeypatch.setenv("FLATNB_RUNS", str(tmp_path))
    _fake_records(tmp_path, stems=[s for s in verdict.REQUIRED if s != "08_flatness_detector"])
    with pytest.raises(verdict.MissingRecords, match=r"08_flatness_detector: execute it .*--only 08"):
        verdict.collect()
    table = verdict.collect(require_all=False)
    assert list(table.missing) == ["08_flatness_detector"] and "Missing" in verdict.counts_markdown(table)

    _fake_records(tmp_path, stems=["08_flatness_detector"])
    table = verdict.collect()
    ids = [r["id"] for r in table.rows]
    assert "E6-LLM" in ids and "E6-arch-densenet121" in ids and len(ids) == len(set(ids))
    assert "Setup-models" not in ids  # removed: chapter 10 builds DenseNet-121 and tests it
    n_req = sum(len(v) for v in verdict.REQUIRED.values())
    assert len(ids) == n_req + len(verdict.UNTESTABLE)
    counted = claims.counts(table.rows)
    assert sum(counted.values()) == len(ids) - 1  # E4 (by construction) is shown, not counted
    assert counted["reproduced"] == 1 and counted["not testable here"] == 1  # E6-LLM, the one untestable row
    md = verdict.counts_markdown(table)
    assert "By construction** (shown, not counted): E4" in md
    from flatnb.evidence import provenance
    paper_theory = [i for i in verdict.THEORY if provenance.of(i)[0] != "derived"]
    assert (f"- **Claims of the paper, theory** ({len(paper_theory)} rows, {len(paper_theory)} of them known only "
            f"from a secondary source): 0 reproduced, {len(paper_theory)} partly") in md
    assert "- **The book's derived statements and hypotheses**" in md and "T-radius" in md
    assert f"{n_req} rows quick on" in md and "1 row without a run" in md
    groups = dict(verdict.grouped(table.rows))
    assert [r["id"] for r in groups["Claims no chapter of this book can test"]] == ["E6-LLM"]
    assert "Other rows" not in groups and verdict.group_of("E6-AT").startswith("Adversarial")
    ba = verdict.before_after_markdown(table)
    assert "| E4 | reproduced | **partly (by construction)** ← |" in ba
    assert "| R-walls-std | reproduced | **(row removed)** ← |" in ba and "| T-lemma | — (new row) |" in ba
    assert "| Setup-models | not testable here | **(row removed)** ← | DenseNet-121 is built now" in ba

    # a legacy notebook (no .json beside it) is shown, never collected
    _notebook(tmp_path / "h100" / "05_uncanny_valley.full.ipynb", ["print(1)"],
              outputs=["device:    cuda (NVIDIA H100)\n"])
    nb = json.loads((tmp_path / "h100" / "05_uncanny_valley.full.ipynb").read_text())
    nb["cells"][1]["outputs"].append({"output_type": "display_data", "metadata": {}, "data": {
        "text/markdown": "| # | quantity | paper | this book | device | profile |\n|---|---|---|---|---|---|\n"
                         "| E6 | a \\| b | yes | 0.85 | cuda | full |"}})
    nb["metadata"]["papermill"] = {"end_time": "2026-11-25T16:58:08+00:00"}
    (tmp_path / "h100" / "05_uncanny_valley.full.ipynb").write_text(json.dumps(nb))
    items = verdict.legacy()
    assert [i["path"] for i in items] == ["runs/h100/05_uncanny_valley.full.ipynb"]
    assert items[0]["device"] == "cuda (NVIDIA H100)" and items[0]["date"] == "2026-11-25"
    assert items[0]["tables"] == ["| # | quantity | paper | this book |\n|---|---|---|---|\n| E6 | a \\| b | yes | 0.85 |"]
    assert "not counted" in verdict.legacy_markdown(items)
    assert all(not r["path"].endswith(".ipynb") for r in records.load_all())


def test_the_stored_h100_notebooks_read_as_legacy_evidence():
    from flatnb.evidence import verdict_table as verdict

    items = {i["chapter"]: i for i in verdict.legacy(records.REPO / "runs")}
    assert items, "runs/h100/ holds the stored legacy notebooks of chapters 4, 5 and 7 in this repository"
    assert "05_uncanny_valley" in items and items["05_uncanny_valley"]["tables"]
    assert all("| device |" not in t for i in items.values() for t in i["tables"])
    assert all(i["device"].startswith("cuda") for i in items.values())


def test_duplicate_row_ids_are_refused(tmp_path):
    from flatnb.evidence import verdict_table as verdict

    _fake_records(tmp_path)
    recs = records.load_all(tmp_path)
    dup = [claims.claim("E3", "again", "p", "o", "partly", "r")]
    with pytest.raises(ValueError, match="more than once"):
        verdict.collect(recs, untestable=dup)


def test_chapter_12_reads_run_records_only():
    """Chapter 12 must run from committed records alone (Colab runs each notebook in its own VM)."""
    nb = json.loads((records.REPO / "book" / "12_verdict.ipynb").read_text())
    code = [("".join(c["source"]), c["metadata"].get("tags", [])) for c in nb["cells"] if c["cell_type"] == "code"]
    params = [src for src, tags in code if "parameters" in tags]
    assert params == ['profile = "auto"\ndevice = "auto"\nseed = 0']
    text = "\n".join(src for src, tags in code if "injected-parameters" not in tags)
    assert "verdict.collect(require_all=True)" in text and "load_claims" not in text and "FLATNB_CACHE" not in text
    colab = 'if "google.colab" in sys.modules:'  # the Colab cell is fixed for every chapter
    assert "def " not in text and all(len(line) <= 88 for line in text.splitlines() if colab not in line)



def test_dirty_ignores_outputs_but_not_code(tmp_path, monkeypatch):
    """The provenance line says "uncommitted changes" when the code differs from the commit, not when the
    runner has written a chapter's new outputs in place."""
    import subprocess

    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook, new_output

    from flatnb.evidence import run_records as records

    def git(*a):
        subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "flatnb").mkdir()
    (tmp_path / "book").mkdir()
    (tmp_path / "flatnb" / "m.py").write_text("x = 1\n")
    nb = new_notebook(cells=[new_code_cell("print(1)")])
    nbformat.write(nb, tmp_path / "book" / "c.ipynb")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    monkeypatch.setattr(records, "REPO", tmp_path)
    assert records.dirty() is False
    nb.cells[0].outputs = [new_output("stream", name="stdout", text="1\n")]
    nbformat.write(nb, tmp_path / "book" / "c.ipynb")
    assert records.dirty() is False, "new outputs only"
    nb.cells[0].source = "print(2)"
    nbformat.write(nb, tmp_path / "book" / "c.ipynb")
    assert records.dirty() is True, "a changed code cell"
    git("checkout", "book/c.ipynb")
    (tmp_path / "flatnb" / "m.py").write_text("x = 2\n")
    assert records.dirty() is True, "a changed module"


# ----------------------------------------------------------------------------- shared rules and formatters

def test_fmt_formats_every_interval_kind_the_same_way():
    from flatnb.stats import Fraction, fmt

    assert fmt(Fraction(82, 100), n=True) == "0.82 [0.73, 0.88] (n=100)"  # Wilson (1927): [0.7333, 0.8829]
    assert fmt((0.5, 0.4, 0.6), pct=True) == "50.0 % [40.0, 60.0]"
    assert fmt((1.3, 1.0, 1.6), suffix="×") == "1.30× [1.00, 1.60]"
    assert fmt((0.1, -0.2, 0.3), signed=True) == "+0.10 [-0.20, +0.30]"
    assert fmt(2.0) == "2.00"
    with pytest.raises(ValueError, match="non-finite"):
        fmt((float("nan"), 0.0, 1.0))


def test_interval_rules_decide_on_the_whole_interval():
    from flatnb.evidence import claims as c
    from flatnb.stats import Fraction

    assert c.grade_interval(Fraction(95, 100), 0.8, 0.5)[0] == "reproduced"
    assert c.grade_interval(Fraction(85, 100), 0.8, 0.5)[0] == "partly"  # lower end 0.767 < 0.8
    assert c.grade_interval(Fraction(30, 100), 0.8, 0.5)[0] == "not reproduced"
    assert c.grade_interval((0.01, 0.0, 0.02), 0.05, 0.2, higher_is_yes=False)[0] == "reproduced"
    assert c.grade_interval((0.01, 0.0, 0.10), 0.05, 0.2, higher_is_yes=False)[0] == "partly"
    assert c.grade_interval((0.5, 0.3, 0.6), 0.05, 0.2, higher_is_yes=False)[0] == "not reproduced"
    assert c.grade_ratio((20, 10, 40), 20)[0] == "reproduced"
    assert c.grade_ratio((20, 5, 40), 20)[0] == "partly"
    assert c.grade_ratio((1, 0.5, 2), 20)[0] == "not reproduced"
    assert c.equivalent((0.0, -0.03, 0.04), 0.05)[0] is True
    assert c.equivalent((0.0, -0.10, 0.04), 0.05)[0] is False  # too wide: no evidence of "no difference"
    assert c.adequate_at(0.70, (0.37, 0.34, 0.40))[0] is True
    assert c.adequate_at(0.70, (0.10, 0.05, 0.16))[0] is False and c.adequate_at(0.5, (0.4, 0.35, 0.45))[0] is False


def test_markdown_table_escapes_and_checks_its_shape():
    from flatnb.evidence import claims as c

    assert c.markdown_table(["a", "b"], [[1, "x|y"]]) == "| a | b |\n|---|---|\n| 1 | x\\|y |"
    with pytest.raises(ValueError, match="2 cells"):
        c.markdown_table(["a", "b"], [[1]])


def test_stats_wrappers_give_textbook_values():
    """The scipy-backed wrappers against published numbers: Wilson 8/10 -> [0.4902, 0.9433] (Newcombe 1998,
    Table I style), Spearman of a textbook sample with ties, average ranks, a percentile bootstrap."""
    import numpy as np

    lo, hi = stats.wilson(8, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)
    lo, hi = stats.wilson(0, 10)
    assert lo == 0.0 and round(hi, 4) == 0.2775
    # IQ / hours of TV (the Wikipedia "Spearman's rank correlation coefficient" example): rho = -29/165
    iq = [106, 100, 86, 101, 99, 103, 97, 113, 112, 110]
    tv = [7, 27, 2, 50, 28, 29, 20, 12, 6, 17]
    assert stats.spearman(iq, tv) == pytest.approx(-29 / 165, abs=1e-12)
    assert stats.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert stats._ranks(np.array([10.0, 20.0, 20.0, 30.0])).tolist() == [0.0, 1.5, 1.5, 3.0]
    est, lo, hi = stats.bootstrap_ci(np.arange(101.0))
    assert est == 50.0 and 40 < lo < 50 < hi < 60
    assert stats.bootstrap_ci([3.0, 3.0, 3.0]) == (3.0, 3.0, 3.0)


def test_every_verdict_row_has_one_provenance_and_a_row_without_one_is_named():
    from flatnb.evidence import provenance, verdict_table as verdict

    assert not provenance.check()
    ids = {i for v in verdict.REQUIRED.values() for i in v} | {r["id"] for r in verdict.UNTESTABLE}
    ids |= {"R-walls-std", "R-walls-at"}  # rows chapter 11 saves beside the required (by construction)
    assert not ids - set(provenance.PROVENANCE), ids - set(provenance.PROVENANCE)
    # the referee's reading (science review 2.1-2.2): the book's corollary and hypotheses are derived, the
    # reported bound and the ViT / Tiny ImageNet rows are secondary, the valley's shape is the paper's
    assert {i for i in ("T-radius", "A-suff", "A-rank", "A-temperature", "E3-masking")
            if provenance.of(i)[0] == "derived"} == {"T-radius", "A-suff", "A-rank", "A-temperature", "E3-masking"}
    assert all(provenance.of(i)[0] == "secondary" for i in ("T-bound-reported", "E6-arch-vit",
                                                          "E6-tinyimagenet-resnet18", "E6-tinyimagenet-vit"))
    assert all(provenance.of(i)[0] == "paper" for i in ("E6-rise", "E6-peak", "E6-fall"))
    with pytest.raises(provenance.MissingProvenance, match=r"'X-new' has no provenance: add it to"):
        provenance.of("X-new")
    assert provenance.check({"X": ("primary", "note"), "Y": ("paper", " ")}) == [
        f"X: provenance must be one of {provenance.KINDS} with a note, got ('primary', 'note')",
        f"Y: provenance must be one of {provenance.KINDS} with a note, got ('paper', ' ')"]


def test_the_verdict_table_takes_provenance_by_id_and_flags_a_row_without(tmp_path, monkeypatch):
    from flatnb.evidence import verdict_table as verdict

    monkeypatch.setenv("FLATNB_RUNS", str(tmp_path))
    _fake_records(tmp_path)  # records whose rows carry no provenance field, like those written before it
    table = verdict.collect()
    row = next(r for r in table.rows if r["id"] == "T-radius")
    assert row["provenance"] == "derived" and "corollary" in row["provenance_note"]
    assert not verdict.policy_problems(table)
    md = verdict.groups_markdown(table)
    assert "| # | claim | from | paper | this book | verdict | run |" in md
    assert "| T-radius | claim T-radius | derived |" in md and "where the claim comes from" in md
    # a row the mapping does not know: collected, shown as **none**, named by the policy and the counts
    rows = _fake_rows("11_off_manifold") + [claims.claim("X-new", "a new claim", "p", "o", "partly", "rule")]
    m = dict(records.meta("11_off_manifold", "quick", "cpu", 0, 1.0), slug="cpu", date="2026-12-01T00:00:00Z",
             commit="c" * 40)
    records.save(rows, m, tmp_path)
    table = verdict.collect()
    assert any("X-new: no provenance" in p for p in verdict.policy_problems(table))
    assert "| X-new | a new claim | **none** |" in verdict.groups_markdown(table)
    assert "- **No provenance** (counted nowhere): X-new." in verdict.counts_markdown(table)


def test_interval_helpers_ratio_difference_envelope_and_censored_format():
    assert stats.ratio_ci((2.0, 1.0, 4.0), (1.0, 0.5, 2.0)) == (2.0, 0.5, 8.0)
    with pytest.raises(ValueError, match="positive denominator"):
        stats.ratio_ci(1.0, (1.0, 0.0, 2.0))
    d = stats.diff_ci(stats.Fraction(30, 100), (0.1, 0.05, 0.2))
    assert d[0] == pytest.approx(0.2) and d[1] == pytest.approx(stats.Fraction(30, 100).lo - 0.2)
    assert stats.envelope([(1.0, 0.5, 2.0), (3.0, 2.0, 5.0)]) == (2.0, 0.5, 5.0)
    with pytest.raises(stats.EmptySelection):
        stats.envelope([])
    assert stats.fmt_capped((51, 51, 51), 50) == "> 50"
    assert stats.fmt_capped((6.0, 4.5, 51), 50) == "6 [4.5, > 50]"


def test_the_rules_of_chapters_9_to_13():
    assert claims.grade_basin((25.0, 12.0, 40.0), True, True)[0] == "reproduced"
    assert claims.grade_basin((25.0, 12.0, 40.0), True, False)[0] == "partly"
    assert claims.grade_basin((0.6, 0.4, 0.9), True, True)[0] == "not reproduced"
    assert "half the paper's 20×" in claims.grade_basin((2.0, 1.5, 3.0), True, True)[1]

    ok, why = claims.enough_paths({"rise": Fraction(4, 5), "fall": Fraction(30, 40)})
    assert ok
    ok, why = claims.enough_paths({"rise": Fraction(2, 3), "fall": Fraction(30, 40), "loss": Fraction(0, 0)})
    assert not ok and why == "too few paths to grade: rise over 3, loss over 0 (fewer than 5)"
    assert not claims.enough_paths({"fall": Fraction(9, 9)}, min_n=10)[0]
    with pytest.raises(ValueError):
        claims.enough_paths({})
    with pytest.raises(ValueError):
        claims.enough_paths({"fall": Fraction(9, 9)}, min_n=0)

    ok, why = claims.adequate_zoo({"a": 0.93, "b": 0.80})
    assert ok
    ok, why = claims.adequate_zoo({"a": 0.93, "b": 0.61})
    assert not ok and "1 of the zoo's 2 models" in why and "b, 61.0%" in why
    with pytest.raises(ValueError):
        claims.adequate_zoo({})
    # an AT model below the clean bar passes on the AT bar (60 % clean, AutoAttack interval above 15 %) ...
    assert claims.adequate_zoo({"a": 0.93, "at": 0.72}, at={"at": (0.36, 0.33, 0.39)})[0]
    # ... but not without robustness, and a standard model never on the AT bar
    ok, why = claims.adequate_zoo({"a": 0.93, "at": 0.72}, at={"at": (0.10, 0.05, 0.15)})
    assert not ok and "at, 72.0%" in why and "adversarially trained" in why
    assert not claims.adequate_zoo({"a": 0.70, "at": 0.72}, at={"at": (0.36, 0.33, 0.39)})[0]
    with pytest.raises(ValueError, match="no clean accuracy"):
        claims.adequate_zoo({"a": 0.93}, at={"x": (0.36, 0.33, 0.39)})

    same, wide, more = (0.01, -0.03, 0.04), (0.0, -0.3, 0.3), (0.3, 0.2, 0.4)
    assert claims.grade_sufficiency({"x": False}, {"x": same})[0] == "not testable here"
    v, why = claims.grade_sufficiency({"x": True, "y": True}, {"x": same, "y": more})
    assert v == "reproduced" and why.startswith("flatter and shown no more robust (AutoAttack): x")
    assert claims.grade_sufficiency({"y": True}, {"y": more})[0] == "not reproduced"
    v, why = claims.grade_sufficiency({"x": True}, {"x": wide})  # no difference detected is not "no difference"
    assert v == "not testable here" and why.startswith("inconclusive")
    # AutoAttack at a floor: equivalent, but the flip radius shows the model more robust -> not "no more robust"
    v, why = claims.grade_sufficiency({"x": True}, {"x": same}, more_robust={"x": True})
    assert v == "not reproduced" and "more robust by another measure" in why
    v, _ = claims.grade_sufficiency({"x": True, "z": True}, {"x": same, "z": same}, more_robust={"x": True})
    assert v == "reproduced"

    assert claims.grade_rank(None)[0] == "not testable here"
    assert claims.grade_rank((0.1, -0.2, 0.4), (0.5, 0.1, 0.8))[0] == "reproduced"
    assert claims.grade_rank((-0.6, -0.9, -0.2), None)[0] == "not reproduced"
    assert claims.grade_rank((-0.34, -0.91, 0.5))[0] == "partly"
    v, why = claims.grade_rank((-0.34, -0.91, 0.5), (0.98, 0.9, 1.0))
    assert v == "not testable here" and "ill-conditioned" in why


def test_max_relative_error_against_hand_values():
    import torch

    assert stats.max_relative_error(torch.tensor([1.0, 2.2]), torch.tensor([1.0, 2.0])) == pytest.approx(0.1)
    assert stats.max_relative_error([3.0], [3.0]) == 0.0
    with pytest.raises(ValueError, match="without zeros"):
        stats.max_relative_error([1.0], [0.0])


def test_adequate_arch_uses_the_family_bar_and_names_both_networks():
    import pytest

    from flatnb.evidence import claims as c

    ok, why = c.adequate_arch("wrn28_4", "cifar10", 0.905, "WRN-16-4", "WRN-28-4")
    assert ok is True
    ok, why = c.adequate_arch("wrn28_4", "cifar10", 0.87, "WRN-16-4", "WRN-28-4")
    assert ok is False and "WRN-16-4" in why and "WRN-28-4" in why and "88 %" in why
    assert c.adequate_arch("vit_tiny", "cifar10", 0.71, "ViT (dim 128, depth 6)", "ViT (dim 192, depth 12)")[0]
    assert not c.adequate_arch("vit_tiny", "cifar10", 0.69, "ViT", "ViT")[0]
    assert c.adequate_arch("resnet18", "tinyimagenet", 0.41, "r", "r")[0]
    assert not c.adequate_arch("resnet18", "tinyimagenet", 0.39, "r", "r")[0]
    with pytest.raises(ValueError, match="ARCH_BAR"):
        c.adequate_arch("resnet18", "mnist", 0.9, "r", "r")
    with pytest.raises(ValueError, match="fraction"):
        c.adequate_arch("resnet18", "cifar10", 90.5, "r", "r")


def test_a_pooled_verdict_stands_only_where_no_model_contradicts_it():
    pooled = Fraction(900, 1000)
    same = {"a": Fraction(450, 500), "b": Fraction(450, 500)}
    v, why = claims.across_models(claims.grade(pooled), same)
    assert v == "reproduced" and "no model alone may contradict" in why
    # one model whose own interval lies wholly below 0.8 turns "reproduced" into "partly", named
    odd = {"a": Fraction(490, 500), "b": Fraction(300, 500)}
    v, why = claims.across_models(claims.grade(Fraction(790 + 100, 1000)), odd)
    assert v == "partly" and "b 0.60" in why and "pooled: reproduced" in why
    # a small model whose interval straddles the threshold contradicts nothing
    assert claims.across_models(claims.grade(pooled), {"a": Fraction(890, 980), "b": Fraction(7, 10)})[0] == \
        "reproduced"
    # "not reproduced" is checked the other way round
    v, _ = claims.across_models(claims.grade(Fraction(300, 1000)), {"a": Fraction(60, 500), "b": Fraction(450, 500)})
    assert v == "partly"
    assert claims.across_models(("partly", "r"), odd) == ("partly", "r; pooled over 2 model(s), and no model "
                                                                     "alone may contradict the pooled verdict on "
                                                                     "its own interval")
    # empty per-model fractions are ignored; with one model the verdict is unchanged
    assert claims.across_models(claims.grade(pooled), {"a": pooled, "b": Fraction(0, 0)})[0] == "reproduced"


def test_side_places_the_whole_interval_against_the_reference_and_refuses_nan():
    assert claims.side(Fraction(95, 100), 0.8) == "above"      # Wilson [0.89, 0.98]
    assert claims.side(Fraction(50, 100), 0.8) == "below"      # [0.40, 0.60]
    assert claims.side(Fraction(8, 10), 0.8) == "overlaps"     # the estimate sits on it, the interval straddles
    assert claims.side((0.92, 0.92, 0.95), 0.92) == "above"    # "at or above": the lower end may touch
    assert claims.side((0.5, 0.4, 0.91999), 0.92) == "below"
    assert claims.side(0.3, 0.3) == "above" and claims.side(0.29, 0.3) == "below"
    with pytest.raises(ValueError, match="NaN"):
        claims.side((float("nan"), 0.1, 0.2), 0.5)
