"""The verdict policy (claims), its intervals (stats) and the run records that carry the rows."""
import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from flatnb import claims, records, stats


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
    with pytest.raises(ValueError, match="n >= 1"):
        stats.wilson(0, 0)
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
    recs = records.load_all()
    assert len(recs) == 2
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


def test_a_record_is_stale_when_the_code_changes_but_not_when_outputs_do(tmp_path, monkeypatch):
    monkeypatch.setenv("FLATNB_RUNS", str(tmp_path))
    rows = [claims.claim("E6-rise", "k rises", "yes", "0.9", "reproduced")]
    m = records.meta("05_uncanny_valley", "quick", "cpu", 0, 1.0)
    assert m["code"] == records.code_fingerprint("05_uncanny_valley") is not None
    records.save(rows, m)
    assert records.load_all()[0]["stale"] is False
    records.save(rows, dict(m, code="0" * 16))  # the run saw other code than this checkout has
    rec = records.load_all()[0]
    assert rec["stale"] is True and "STALE" in records.label(rec)
    records.save(rows, dict(m, code=None))  # a record without a fingerprint cannot tell
    assert records.load_all()[0]["stale"] is None
