"""The chapter runner and the staged HTML build (flatnb.book), on tiny notebooks and fake run records.

Papermill is replaced by a fake ``execute`` except in one test, so these tests take seconds.
"""
import json
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from flatnb.book import runner as book
from flatnb.book import site as book_site


def _notebook(text: str | None = None, injected: bool = False, code=("x = 1",)) -> dict:
    """A chapter-like notebook: a title cell (when ``text``), the parameters cell, papermill's injected one
    (when ``injected``, with papermill's metadata), then one code cell per string of ``code``."""
    cells = [new_markdown_cell(f"# {text}")] if text is not None else []
    cells.append(new_code_cell('profile = "auto"', metadata={"tags": ["parameters"]}))
    if injected:
        cells.append(new_code_cell('profile = "quick"', metadata={"tags": ["injected-parameters"]}))
    cells += [new_code_cell(c) for c in code]
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    if injected:
        nb.metadata["papermill"] = {"input_path": "/work/main/book/a.ipynb", "output_path": "/tmp/x.ipynb"}
        for cell in nb.cells:
            cell.metadata["papermill"] = {"duration": 0.1, "status": "completed"}
    return nb


def _write(path: Path, nb) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nbformat.from_dict(nb), path)
    return path


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A miniature book: two chapters, a config, and book.ROOT pointing at it."""
    root = tmp_path / "repo"
    (root / "book").mkdir(parents=True)
    (root / "_toc.yml").write_text("format: jb-book\nroot: intro\nchapters:\n"
                                   "  - file: book/01_a\n  - file: book/02_b\n")
    (root / "_config.yml").write_text("title: t\n")
    (root / "intro.md").write_text(f"# intro\n\n{book_site.PAGE_TABLE}\n")
    (root / "references.bib").write_text("")
    (root / "_static").mkdir()
    (root / "_static" / "x.css").write_text("p {}\n")
    _write(root / "book" / "01_a.ipynb", _notebook("committed a"))
    _write(root / "book" / "02_b.ipynb", _notebook("committed b"))
    monkeypatch.setattr(book, "ROOT", root)
    return root


def _record(runs: Path, slug: str, stem: str, text: str, date: str | None, profile: str = "full") -> Path:
    nb_path, json_path = book.record_paths(runs, slug, stem, profile)
    _write(nb_path, _notebook(text, injected=True))
    if date is not None:
        json_path.write_text(json.dumps({"meta": {"chapter": stem, "profile": profile, "device": slug,
                                                  "commit": "abc", "date": date, "wall_s": 1.0}, "rows": []}))
    return nb_path


def _fake_execute(calls):
    """Stands in for papermill: 'executes' by copying, and fails chapters whose name contains 'b'."""
    def execute(chapter, output, parameters=None, cell_timeout=0, env=None, tolerate_asserts=False):
        calls.append((chapter.name, dict(parameters or {})))
        timeouts.append(cell_timeout)
        envs.append(env)
        tolerant.append(tolerate_asserts)
        nb = json.loads(Path(chapter).read_text())
        nb["cells"].append(new_code_cell(f"# executed with {parameters}"))
        Path(output).write_text(json.dumps(nb))
        if "_b" in chapter.name and calls_fail_b[0]:
            raise book.ChapterFailure(chapter, "In [3]", "AssertionError: boom", Path(output))
        return 0.01
    return execute


calls_fail_b = [False]
timeouts = []
envs = []
tolerant = []


def _text(path: Path) -> str:
    return "".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"])


def test_strip_papermill_drops_the_injected_cell_and_machine_paths():
    nb = json.loads(json.dumps(_notebook("a", injected=True)))
    out = book_site.strip_papermill(nb)
    assert not any("injected-parameters" in c["metadata"].get("tags", []) for c in out["cells"])
    assert any("parameters" in c["metadata"].get("tags", []) for c in out["cells"]), "parameters cell kept"
    assert "papermill" not in out["metadata"]
    assert not any("papermill" in c["metadata"] for c in out["cells"])
    assert "/work/" not in json.dumps(out)


def test_the_newest_full_record_with_its_json_is_the_page(repo):
    runs = repo / "runs"
    _record(runs, "cpu", "01_a", "full on cpu, January", "2026-01-01T00:00:00+00:00")
    newest = _record(runs, "nvidia-h200", "01_a", "full on h200, February", "2026-02-01T00:00:00+00:00")
    _record(runs, "nvidia-h100", "01_a", "no json, March", None)            # not a run record
    _record(runs, "nvidia-h100", "02_b", "quick, not full", "2026-03-01", profile="quick")
    chapter_a, chapter_b = book_site.chapters(repo)
    assert book_site.page_source(chapter_a, runs) == newest
    assert book_site.page_source(chapter_b, runs) == chapter_b


def test_stage_builds_a_tree_of_config_and_chosen_chapters(repo):
    _record(repo / "runs", "nvidia-h200", "02_b", "paper scale b", "2026-02-01T00:00:00Z")
    site = repo / "_build" / "site"
    (site / "stale.txt").parent.mkdir(parents=True)
    (site / "stale.txt").write_text("left from an earlier build")
    sources = book_site.stage(repo, site)
    assert sources == {"01_a": repo / "book" / "01_a.ipynb",
                       "02_b": repo / "runs" / "nvidia-h200" / "02_b.full.ipynb"}
    for name in ("_config.yml", "_toc.yml", "intro.md", "references.bib", "_static/x.css"):
        assert (site / name).is_file(), name
    assert not (site / "stale.txt").exists()
    assert "committed a" in _text(site / "book" / "01_a.ipynb")
    staged_b = json.loads((site / "book" / "02_b.ipynb").read_text())
    assert "paper scale b" in _text(site / "book" / "02_b.ipynb")
    assert not any("injected-parameters" in c["metadata"].get("tags", []) for c in staged_b["cells"])
    assert "papermill" not in staged_b["metadata"]


def _banner(last_line: str) -> str:
    """The chapter banner's HTML as flatnb.book.chapter writes it, ending in its full-run line."""
    return ('<div class="flatnb-banner"><b>This page shows a full-profile run</b> on cpu.<br>'
            f"Full-profile run (shipped evidence models, referee sample sizes): {last_line}.</div>")


def test_a_full_record_page_names_itself_in_its_banner_and_says_whether_it_is_stale(repo):
    """A chapter writes its banner before its record exists, so a full run's banner names the previous record
    (here: "pending"); the staged page must name the run it shows, its wall time and whether it is current."""
    runs = repo / "runs"
    pages = {}
    for stem, fingerprint in (("01_a", {"files": {}}), ("02_b", {"files": {"flatnb/book/site.py": "0" * 16}})):
        nb_path = _record(runs, "cpu", stem, f"full {stem}", "2026-02-01T00:00:00Z")
        nb = json.loads(nb_path.read_text())
        nb["cells"][-1]["outputs"] = [{"output_type": "display_data", "metadata": {}, "data": {
            "text/html": _banner("pending: no full-profile run record of this chapter yet")}}]
        nb_path.write_text(json.dumps(nb))
        rec = json.loads(nb_path.with_suffix(".json").read_text())
        rec["meta"].update(wall_s=1234.4, fingerprint=fingerprint)
        nb_path.with_suffix(".json").write_text(json.dumps(rec))
    book_site.stage(repo, repo / "_build" / "site")
    for stem in ("01_a", "02_b"):
        staged = json.loads((repo / "_build" / "site" / "book" / f"{stem}.ipynb").read_text())
        html = [o["data"]["text/html"] for c in staged["cells"] for o in c.get("outputs", [])]
        assert len(html) == 1 and "pending" not in html[0], html
        pages[stem] = html[0]
        assert "this page is that run (full, cpu, 2026-02-01, commit abc" in html[0]
        assert f"1,234 s of wall time), recorded in <code>runs/cpu/{stem}.full.json</code>.</div>" in html[0]
    assert "STALE" not in pages["01_a"]  # its (empty) fingerprint holds
    assert "STALE (the code changed after this run)" in pages["02_b"]  # a file it depended on changed


def test_a_corrupt_full_record_stops_the_build_naming_the_file_and_the_fix(repo):
    nb_path = _record(repo / "runs", "cpu", "01_a", "full a", "2026-02-01T00:00:00Z")
    nb_path.with_suffix(".json").write_text('{"meta": {"chapter": "01_a"}, "rows": [')  # cut off mid-write
    with pytest.raises(ValueError, match=r"01_a\.full\.json is unreadable .*delete it and re-run"):
        book_site.stage(repo, repo / "_build" / "site")


def test_restamp_leaves_other_html_alone():
    nb = {"cells": [{"cell_type": "code", "outputs": [
        {"output_type": "display_data", "data": {"text/html": ["<p>Full-profile run (shipped evidence models, ",
                                                                "referee sample sizes): x.</div>"]}},
        {"output_type": "display_data", "data": {"text/html": [_banner("old")]}}]}]}
    assert book_site.restamp_banner(nb, "new") == 1
    outs = nb["cells"][0]["outputs"]
    assert outs[0]["data"]["text/html"] == ["<p>Full-profile run (shipped evidence models, ",
                                            "referee sample sizes): x.</div>"]  # not a banner: as it was
    assert outs[1]["data"]["text/html"].endswith("referee sample sizes): new.</div>")


def test_executing_on_the_cpu_never_replaces_a_full_profile_page(repo, monkeypatch):
    calls = []
    calls_fail_b[0] = False
    monkeypatch.setattr(book, "execute", _fake_execute(calls))
    record = _record(repo / "runs", "nvidia-h200", "01_a", "paper scale a", "2026-02-01T00:00:00Z")
    assert book.main(["--profile", "quick", "--no-build"]) == 0
    assert "executed with {'profile': 'quick'}" in _text(repo / "book" / "01_a.ipynb")  # in place
    sources = book_site.stage(repo, repo / "_build" / "site")
    assert sources["01_a"] == record
    assert "paper scale a" in _text(repo / "_build" / "site" / "book" / "01_a.ipynb")


def test_output_folder_leaves_book_alone_and_failures_do_not_stop_the_run(repo, monkeypatch, capsys):
    calls = []
    calls_fail_b[0] = True
    envs.clear()
    monkeypatch.setattr(book, "execute", _fake_execute(calls))
    before = {p.name: p.read_text() for p in (repo / "book").iterdir()}
    out = repo / "elsewhere"
    try:
        assert book.main(["--output", str(out), "--no-build"]) == 1
    finally:
        calls_fail_b[0] = False
    assert {p.name: p.read_text() for p in (repo / "book").iterdir()} == before
    assert envs and all(e == {"FLATNB_RUN_DIR": str(out.resolve())} for e in envs)  # records beside them
    assert (out / "01_a.ipynb").is_file() and not (out / "02_b.ipynb").exists()
    assert (repo / "_build" / "failed" / "02_b.ipynb").is_file()
    log = capsys.readouterr().out
    assert "[ 1/2] 01_a" in log and " pass " in log and " FAIL " in log
    assert "1/2 chapter(s) passed" in log and "FAILED: 02_b" in log
    assert [c for c, _ in calls] == ["01_a.ipynb", "02_b.ipynb"]


def test_full_profile_runs_on_a_cpu_into_runs_cpu(repo, monkeypatch, capsys):
    """The full profile is paper grade on the shipped models on any device: on a CPU it writes runs/cpu/."""
    calls = []
    envs.clear()
    monkeypatch.setattr(book, "execute", _fake_execute(calls))
    monkeypatch.setattr(book, "cuda_available", lambda: False)
    before = {p.name: p.read_text() for p in (repo / "book").iterdir()}
    assert book.main(["--profile", "full", "--no-build"]) == 0
    assert [p for _, p in calls] == [{"profile": "full", "device": "cpu"}] * 2
    assert all((repo / "runs" / "cpu" / f"{s}.full.ipynb").is_file() for s in ("01_a", "02_b"))
    assert {p.name: p.read_text() for p in (repo / "book").iterdir()} == before
    assert envs[-1] == {"FLATNB_RUN_DIR": str(repo / "runs" / "cpu")}


def test_a_full_run_gives_a_cell_hours_a_quick_run_half_an_hour(repo, monkeypatch, capsys):
    """A full chapter's cell may hold most of its CPU budget: 1800 s stopped chapter 5 on a busy 2-core machine."""
    monkeypatch.setattr(book, "execute", _fake_execute([]))
    monkeypatch.setattr(book, "cuda_available", lambda: False)
    for argv, want in ((["--profile", "full"], book.FULL_CELL_TIMEOUT), (["--profile", "quick"], 1800),
                       (["--profile", "full", "--cell-timeout", "60"], 60)):
        timeouts.clear()
        assert book.main([*argv, "--no-build", "--force"]) == 0
        assert timeouts == [want, want], argv
    assert book.FULL_CELL_TIMEOUT >= 3 * 3600


def test_a_full_run_resumes_skipping_current_records(repo, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(book, "execute", _fake_execute(calls))
    monkeypatch.setattr(book, "cuda_available", lambda: False)
    monkeypatch.setattr(book, "record_is_current", lambda runs, slug, stem: stem == "01_a")
    assert book.main(["--profile", "full", "--no-build"]) == 0
    assert [c for c, _ in calls] == ["02_b.ipynb"]
    assert "skip 01_a" in capsys.readouterr().out
    calls.clear()
    assert book.main(["--profile", "full", "--no-build", "--force"]) == 0
    assert [c for c, _ in calls] == ["01_a.ipynb", "02_b.ipynb"]


def test_a_record_is_current_only_when_complete_and_its_code_unchanged(tmp_path, monkeypatch):
    import os

    from flatnb.evidence import run_records

    changed = [[]]
    monkeypatch.setattr(run_records, "load", lambda path: {"meta": {}, "rows": []})
    monkeypatch.setattr(run_records, "changed_files", lambda rec, *a, **k: changed[0])
    nb, js = book.record_paths(tmp_path, "cpu", "05_x", "full")
    assert not book.record_is_current(tmp_path, "cpu", "05_x")  # nothing there
    js.parent.mkdir(parents=True)
    js.write_text("{}")
    assert not book.record_is_current(tmp_path, "cpu", "05_x")  # the JSON of a run that never finished
    nb.write_text("{}")
    os.utime(js, (1_000, 1_000))
    os.utime(nb, (2_000, 2_000))
    assert book.record_is_current(tmp_path, "cpu", "05_x")
    os.utime(js, (3_000, 3_000))  # an interrupted rerun: a newer JSON beside the older notebook
    assert not book.record_is_current(tmp_path, "cpu", "05_x")
    os.utime(js, (1_000, 1_000))
    changed[0] = ["flatnb/measure/crossing.py"]
    assert not book.record_is_current(tmp_path, "cpu", "05_x")


def test_a_chapter_without_rows_gets_a_record_from_the_runner(tmp_path):
    """Chapter 1 and chapter 12 save no verdict rows: the runner writes their full record (rows: []), else
    their full run would never count as complete and would run again on every resume."""
    import os
    import time

    from flatnb.evidence import run_records

    nb, js = book.record_paths(tmp_path, "cpu", "01_relative_flatness", "full")
    started = time.time()
    assert book.mark_complete(js, "01_relative_flatness", {"profile": "full", "device": "cpu"}, 12.5, started) == js
    nb.write_text("{}")
    rec = run_records.load(js)
    assert rec["rows"] == [] and rec["meta"]["wall_s"] == 12.5 and rec["meta"]["profile"] == "full"
    files = rec["meta"]["fingerprint"]["files"]
    # every module of the package, not only those this process imported
    assert len([f for f in files if f.startswith("flatnb/")]) == len(book.package_modules()) > 40
    assert "book/01_relative_flatness.ipynb" in files and "flatnb/measure/walls.py" in files
    assert book.record_is_current(tmp_path, "cpu", "01_relative_flatness")
    # a chapter that wrote its own record during the run is left alone
    before = js.read_text()
    assert book.mark_complete(js, "01_relative_flatness", {"profile": "full"}, 1.0, started - 60) is None
    assert js.read_text() == before
    # a chapter with required rows that wrote none gets nothing: its run is not current
    _, js5 = book.record_paths(tmp_path, "cpu", "05_uncanny_valley", "full")
    assert book.mark_complete(js5, "05_uncanny_valley", {"profile": "full"}, 1.0, time.time()) is None
    assert not js5.exists()
    # a reader (chapter 12) is current only while no record it reads is newer
    nb12, js12 = book.record_paths(tmp_path, "cpu", "12_verdict", "full")
    book.mark_complete(js12, "12_verdict", {"profile": "full", "device": "cpu"}, 3.0, time.time())
    nb12.write_text("{}")
    os.utime(js, (1_000, 1_000))
    os.utime(js12, (2_000, 2_000))
    os.utime(nb12, (2_000, 2_000))
    assert book.record_is_current(tmp_path, "cpu", "12_verdict")
    os.utime(js, (3_000, 3_000))  # chapter 1's record is newer than the verdict that read the records
    assert not book.record_is_current(tmp_path, "cpu", "12_verdict")


def test_the_runner_marks_a_full_chapter_complete_before_it_moves_the_notebook(repo, monkeypatch):
    monkeypatch.setattr(book, "execute", _fake_execute([]))
    monkeypatch.setattr(book, "cuda_available", lambda: False)
    assert book.main(["--profile", "full", "--no-build", "--only", "01_a"]) == 0
    nb, js = book.record_paths(repo / "runs", "cpu", "01_a", "full")
    assert js.is_file() and nb.stat().st_mtime >= js.stat().st_mtime
    assert json.loads(js.read_text())["rows"] == []


def test_lanes_balance_the_estimates_and_keep_book_order():
    stems = ["01", "02", "03", "04", "05"]
    est = {"01": 60, "02": 10, "03": 25, "04": 25, "05": 5}
    got = book.lanes(stems, 2, est)
    assert sorted(sum(got, [])) == stems and all(lane == sorted(lane) for lane in got)
    loads = sorted(sum(est[s] for s in lane) for lane in got)
    assert loads == [60, 65]  # 60 + 5 against 25 + 25 + 10: the best split of these estimates
    assert sorted(map(len, book.lanes(stems, 9, est))) == [1] * 5  # no empty lanes
    with pytest.raises(ValueError, match="--jobs must be >= 1"):
        book.lanes(stems, 0, est)


def test_full_profile_writes_run_records_not_book(repo, monkeypatch, capsys):
    calls = []
    envs.clear()
    monkeypatch.setattr(book, "execute", _fake_execute(calls))
    monkeypatch.setattr(book, "cuda_available", lambda: True)
    monkeypatch.setattr(book, "device_slug", lambda device=None: "nvidia-h200")
    marked = []  # no GPU here to describe in a record's metadata: only where the runner would write one
    monkeypatch.setattr(book, "mark_complete", lambda js, stem, *a: marked.append(js))
    before = {p.name: p.read_text() for p in (repo / "book").iterdir()}
    assert book.main(["--profile", "full", "--device", "cuda", "--no-build"]) == 0
    assert marked == [repo / "runs" / "nvidia-h200" / f"{s}.full.json" for s in ("01_a", "02_b")]
    assert {p.name: p.read_text() for p in (repo / "book").iterdir()} == before
    for stem in ("01_a", "02_b"):
        assert (repo / "runs" / "nvidia-h200" / f"{stem}.full.ipynb").is_file()
    assert all(p == {"profile": "full", "device": "cuda"} for _, p in calls)
    assert envs[-1] == {"FLATNB_RUN_DIR": str(repo / "runs" / "nvidia-h200")}, "the chapter learns its record folder"
    log = capsys.readouterr().out
    assert "01_a" in log and "02_b" in log and "in total" in log


def test_dry_run_executes_smoke_into_a_temp_folder_and_checks_the_record_paths(repo, monkeypatch, capsys):
    calls = []
    envs.clear()
    tolerant.clear()
    monkeypatch.setattr(book, "execute", _fake_execute(calls))
    before = {p.name: p.read_text() for p in (repo / "book").iterdir()}
    assert book.main(["--profile", "full", "--dry-run"]) == 0
    assert [p for _, p in calls] == [{"profile": "smoke"}] * 2
    assert tolerant == [True, True], "the smoke run tolerates failed asserts (evidence checks), nothing else"
    assert all(Path(e["FLATNB_RUN_DIR"]).name.startswith("flatnb-dry-run-") for e in envs), \
        "the smoke run's records go to the temp folder, never into runs/"
    assert {p.name: p.read_text() for p in (repo / "book").iterdir()} == before
    assert not (repo / "runs").exists(), "the writability probe leaves nothing behind"
    assert "writable" in capsys.readouterr().out
    blocker = repo / "not_a_folder"
    blocker.write_text("a file where the runs folder should be")
    assert book.main(["--dry-run", "--runs", str(blocker)]) == 1
    assert "not writable" in capsys.readouterr().err


def test_smoke_execution_tolerates_failed_asserts_and_nothing_else(tmp_path, capsys):
    """A real papermill run: a failed assert, an empty selection and a NameError they cause are listed and
    the later cells still run; a KeyError fails, and so does a NameError nothing excuses."""
    ok = _write(tmp_path / "ok.ipynb", _notebook(code=(
        "x = 1\nassert x > 5, 'too small'\nz = 2",
        "from flatnb.stats import Fraction\nFraction(0, 0).value",
        "print(z)",
        "y = x + 1")))
    out = tmp_path / "out" / "ok.ipynb"
    book.execute(ok, out, {"profile": "smoke"}, cell_timeout=120, tolerate_asserts=True)
    log = capsys.readouterr().out
    assert "tolerated (smoke)" in log and "too small" in log and "assert x > 5" in log
    assert "EmptySelection" in log and "NameError" in log
    nb = json.loads(out.read_text())
    assert nb["cells"][-1]["execution_count"] is not None, "the cell after the failed assert ran"
    bad = _write(tmp_path / "bad.ipynb", _notebook(code=("assert False", "{}['missing']", "z = 1")))
    with pytest.raises(book.ChapterFailure, match="KeyError"):
        book.execute(bad, tmp_path / "out" / "bad.ipynb", {"profile": "smoke"}, cell_timeout=120,
                     tolerate_asserts=True)
    typo = _write(tmp_path / "typo.ipynb", _notebook(code=("x = 1", "print(xx)")))
    with pytest.raises(book.ChapterFailure, match="NameError"):
        book.execute(typo, tmp_path / "out" / "typo.ipynb", {"profile": "smoke"}, cell_timeout=120,
                     tolerate_asserts=True)
    with pytest.raises(book.ChapterFailure, match="AssertionError"):  # outside the smoke run an assert fails
        book.execute(ok, tmp_path / "out" / "ok2.ipynb", {"profile": "quick"}, cell_timeout=120)


def test_help_says_what_the_runner_does(capsys):
    with pytest.raises(SystemExit):
        book.main(["--help"])
    text = capsys.readouterr().out
    for phrase in ("--profile full", "--dry-run", "runs/<device>/<stem>.full.ipynb", "--output",
                   "_build/site", "injected-parameters", "--no-execute", "smoke profile"):
        assert phrase in text, phrase


def test_device_slug_of_the_cpu():
    assert book.device_slug("cpu") == "cpu"


def test_execute_strips_the_injected_cell_from_a_real_papermill_run(tmp_path):
    src = _write(tmp_path / "tiny.ipynb", _notebook("tiny"))
    out = tmp_path / "out" / "tiny.ipynb"
    book.execute(src, out, {"profile": "quick"}, cell_timeout=120)
    nb = json.loads(out.read_text())
    assert not any("injected-parameters" in c["metadata"].get("tags", []) for c in nb["cells"])
    assert "papermill" not in nb["metadata"] and str(tmp_path) not in out.read_text()
    assert [c["execution_count"] for c in nb["cells"] if c["cell_type"] == "code"] == [1, 3]


def test_publishing_builds_from_committed_outputs_and_deploys():
    import yaml

    flow = yaml.safe_load((book.ROOT / ".github" / "workflows" / "pages.yml").read_text())
    steps = [s for job in flow["jobs"].values() for s in job["steps"]]
    runs = " ".join(s.get("run", "") for s in steps)
    assert "python -m flatnb.book --no-execute" in runs and "pytest" not in runs and "papermill" not in runs
    assert any(s.get("uses", "").startswith("actions/deploy-pages") for s in steps)
    assert any(s.get("with", {}).get("path") == "_build/html" for s in steps)
    assert "https://flatnb.github.io/flatnb/" in (book.ROOT / "README.md").read_text()


def test_license_and_citation_agree_with_pyproject():
    import tomllib

    import yaml

    project = tomllib.loads((book.ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT" and (book.ROOT / "LICENSE").read_text().startswith("MIT License")
    cff = yaml.safe_load((book.ROOT / "CITATION.cff").read_text())
    assert cff["license"] == "MIT" and str(cff["version"]) == project["version"]
    paper = cff["references"][0]
    assert [a["family-names"] for a in paper["authors"]] == ["Walter", "Adilova", "Vreeken", "Kamp"]
    assert "2510.14231" in str(paper["identifiers"]) and paper["year"] == 2026


def test_the_intro_says_which_run_each_page_shows(repo):
    _record(repo / "runs", "nvidia-h200", "02_b", "paper scale b", "2026-02-01T00:00:00Z")
    site = repo / "_build" / "site"
    book_site.stage(repo, site)
    intro = (site / "intro.md").read_text()
    assert book_site.PAGE_TABLE not in intro
    rows = [line for line in intro.splitlines() if line.startswith("| {doc}")]
    assert len(rows) == 2, intro
    assert rows[0].startswith("| {doc}`committed a <book/01_a>` |")
    assert "| full | nvidia-h200 | 2026\u201102\u201101 | `runs/nvidia-h200/02_b.full.ipynb` |" in rows[1]
    assert "`book/01_a.ipynb`" in rows[0]
    assert book_site.PAGE_TABLE in (repo / "intro.md").read_text(), "the committed intro keeps its marker"


def test_auto_on_a_gpu_writes_run_records_and_on_the_cpu_the_book(repo, monkeypatch):
    calls = []
    monkeypatch.setattr(book, "execute", _fake_execute(calls))
    monkeypatch.setattr(book, "device_slug", lambda device=None: "nvidia-h200")
    monkeypatch.setattr(book, "cuda_available", lambda: True)
    monkeypatch.setattr(book, "mark_complete", lambda *a: None)  # a faked GPU: no device to describe in a record
    assert book.main(["--only", "01", "--no-build"]) == 0
    assert (repo / "runs" / "nvidia-h200" / "01_a.full.ipynb").is_file()
    assert "executed with" not in _text(repo / "book" / "01_a.ipynb")
    assert book.main(["--only", "01", "--device", "cpu", "--no-build"]) == 0  # a CPU run on a GPU machine
    assert "executed with {'device': 'cpu'}" in _text(repo / "book" / "01_a.ipynb")
    monkeypatch.setattr(book, "cuda_available", lambda: False)
    assert book.main(["--only", "02", "--no-build"]) == 0
    assert "executed with {}" in _text(repo / "book" / "02_b.ipynb")


def _gpu_session():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_session", Path(book.__file__).parents[2] / "benchmarks"
                                                  / "gpu_session.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_session_pins_every_wheel_and_packs_only_full_records(tmp_path):
    gs = _gpu_session()
    wheels = gs.pinned_wheels()
    assert len(wheels) == len(gs.WHEELS) and all("==" in w for w in wheels)
    assert any(w.startswith("papermill==") for w in wheels) and any(w.startswith("pyautoattack==") for w in wheels)
    bad = tmp_path / "constraints.txt"
    bad.write_text("papermill==2.7.0\n")
    with pytest.raises(ValueError, match="pins no version of entrypoints"):
        gs.pinned_wheels(bad)
    runs = tmp_path / "nvidia-h200"
    runs.mkdir()
    for name in ("05_uncanny_valley.full.ipynb", "05_uncanny_valley.full.json", "05_uncanny_valley.quick.json",
                 ".05_uncanny_valley.tmp.ipynb"):
        (runs / name).write_text("{}")
    assert gs.pack(tmp_path / "empty", tmp_path / "none.tar.gz") is None
    import tarfile
    with tarfile.open(gs.pack(runs, tmp_path / "records.tar.gz")) as tar:
        assert sorted(tar.getnames()) == ["05_uncanny_valley.full.ipynb", "05_uncanny_valley.full.json"]


def test_gpu_session_step_stops_a_command_at_its_limit(tmp_path):
    gs = _gpu_session()
    import sys
    rc, wall = gs.step("sleeper", [sys.executable, "-c", "import time; time.sleep(30)"], 1, tmp_path / "log")
    assert rc is None and wall < 15
    rc, _ = gs.step("quick", [sys.executable, "-c", "print('hi')"], 30, tmp_path / "log")
    assert rc == 0 and "hi" in (tmp_path / "log").read_text()
