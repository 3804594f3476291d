"""The verdict-table plumbing: claims are validated, saved atomically, read back, rendered."""
import json

import pytest

from flatnb import claims as an


def test_claim_validates_its_verdict_and_fields():
    row = an.claim("E3", "scaling defeats CE-PGD", "93 %", "88.9 %", "reproduced", "within 5 points")
    assert row["verdict"] == "reproduced" and row["id"] == "E3"
    with pytest.raises(ValueError, match="verdict must be one of"):
        an.claim("E3", "x", "y", "z", "maybe")
    with pytest.raises(ValueError, match="needs an id"):
        an.claim("", "x", "y", "z", "partly")


def test_save_and_load_round_trip_with_chapter_device_profile(tmp_path):
    rows = [an.claim("E1", "a | b", "yes", "no", "not reproduced", "r"), an.claim("E2", "c", "1", "2", "partly")]
    path = an.save_claims("06_scale_sweep", rows, "cpu", "quick", root=tmp_path)
    assert path.name == "06_scale_sweep.json"
    an.save_claims("05_uncanny_valley", [an.claim("E6", "d", "e", "f", "reproduced")], "cpu", "full", root=tmp_path)
    loaded = an.load_claims(tmp_path)
    assert [c["id"] for c in loaded] == ["E6", "E1", "E2"]  # ordered by chapter file
    assert loaded[0]["profile"] == "full" and loaded[1]["chapter"] == "06_scale_sweep"
    assert loaded[1]["device"].startswith("cpu")
    # a second save replaces the chapter's rows (no stale rows from an earlier run)
    an.save_claims("06_scale_sweep", rows[:1], "cpu", "quick", root=tmp_path)
    assert [c["id"] for c in an.load_claims(tmp_path)] == ["E6", "E1"]
    table = an.claims_markdown(an.load_claims(tmp_path))
    assert "a \\| b" in table  # a pipe in a cell must not break the Markdown table
    assert table.splitlines()[0].count("|") == 10 and len(table.splitlines()) == 4


def test_bad_rows_and_corrupt_files_raise_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="saves no claims"):
        an.save_claims("x", [], "cpu", "quick", root=tmp_path)
    with pytest.raises(ValueError, match="lacks"):
        an.save_claims("x", [{"id": "E1"}], "cpu", "quick", root=tmp_path)
    (tmp_path / "07_gradient_masking.json").write_text("{not json")
    with pytest.raises(ValueError, match="re-run its chapter"):
        an.load_claims(tmp_path)
    assert not list(tmp_path.glob("*.tmp"))


def test_unsaved_rows_render_without_empty_columns():
    table = an.claims_markdown([an.claim("E5", "stump", "0.92", "0.61", "partly", "why")])
    assert table.splitlines()[0] == "| # | claim | paper | this book | verdict | why |"
    json.dumps(an.claim("E5", "s", "p", "o", "partly"))  # rows are plain JSON


def test_loading_from_a_missing_folder_reads_nothing_and_creates_nothing(tmp_path):
    missing = tmp_path / "no" / "claims"
    assert an.load_claims(missing) == []
    assert not missing.exists()
