"""The named verdict rules of chapters 2-8 (flatnb.evidence.claims) and the loss change of chapter 2's lemma."""
import pytest
import torch
import torch.nn.functional as F

from flatnb.curvature import bounds
from flatnb.evidence import claims
from flatnb.stats import Fraction


def test_grade_checks_all_or_nothing():
    assert claims.grade_checks({"a": True, "b": True})[0] == "reproduced"
    verdict, rule = claims.grade_checks({"a": True, "b held": False})
    assert verdict == "not reproduced" and "failed: b held" in rule
    with pytest.raises(ValueError):
        claims.grade_checks({})


def test_grade_weakest_takes_the_worst_verdict():
    strong, middling, weak = Fraction(95, 100), Fraction(70, 100), Fraction(10, 100)
    assert claims.grade_weakest([strong, strong])[0] == "reproduced"
    assert claims.grade_weakest([strong, middling])[0] == "partly"
    assert claims.grade_weakest([middling, weak])[0] == "not reproduced"


def test_grade_above_null():
    assert claims.grade_above_null(Fraction(95, 100), 0.3)[0] == "reproduced"
    verdict, rule = claims.grade_above_null(Fraction(6, 10), 0.5)  # Wilson lower end 0.31 <= 0.5
    assert verdict == "not reproduced" and "shuffle null" in rule


def test_grade_if_broken():
    assert claims.grade_if_broken(Fraction(990, 1000), Fraction(0, 1000))[0] == "reproduced"
    assert claims.grade_if_broken(Fraction(95, 100), Fraction(100, 1000))[0] == "not reproduced"


def test_grade_all_intervals():
    tight, wide, high = Fraction(0, 1000), Fraction(0, 32), Fraction(500, 1000)
    # at or below 0.05: Wilson 0/1000 ends at 0.0038, 0/32 at 0.107, 500/1000 starts at 0.47
    assert claims.grade_all_intervals({"a": tight}, 0.05, 0.05, higher_is_yes=False)[0] == "reproduced"
    assert claims.grade_all_intervals({"a": tight, "b": wide}, 0.05, 0.05, higher_is_yes=False)[0] == "partly"
    assert claims.grade_all_intervals({"a": high}, 0.05, 0.05, higher_is_yes=False)[0] == "not reproduced"
    assert claims.grade_all_intervals({"a": (0.5, 0.4, 0.6)}, 0.3, 0.1)[0] == "reproduced"


def test_falls_peak_and_grade_falls():
    down = {1: (10.0, 9.0, 11.0), 2: (5.0, 4.0, 6.0), 4: (1.0, 0.5, 1.5)}
    up_down = {0.5: (1.0, 0.9, 1.1), 1: (10.0, 9.0, 11.0), 2: (0.5, 0.4, 0.6)}
    overlapping = {1: (10.0, 1.0, 20.0), 2: (9.0, 2.0, 19.0)}
    assert claims.falls(down) and not claims.falls(up_down) and not claims.falls(overlapping)
    assert claims.falls(up_down, [1, 2])
    assert claims.peak_key(up_down) == 1
    assert claims.grade_falls(down, partly=False, partly_rule="x")[0] == "reproduced"
    assert claims.grade_falls(up_down, partly=True, partly_rule="it peaks at s=1")[0] == "partly"
    assert claims.grade_falls(up_down, partly=False, partly_rule="x")[0] == "not reproduced"


def test_symmetric_loss_change_matches_cross_entropy():
    g = torch.Generator().manual_seed(0)
    phi, w, b = (torch.randn(*s, dtype=torch.float64, generator=g) for s in ((5,), (3, 5), (3,)))
    A = bounds.haar_orthogonal(4, 5, g)

    def loss(W):
        return F.cross_entropy((phi @ W.T + b)[None], torch.tensor([1])).item()

    ref = [(loss(w + 0.1 * w @ a) + loss(w - 0.1 * w @ a)) / 2 - loss(w) for a in A]
    torch.testing.assert_close(bounds.symmetric_loss_change(phi, 1, w, b, A, 0.1), torch.tensor(ref, dtype=torch.float64))
    torch.testing.assert_close(bounds.symmetric_loss_change(phi, 1, w, b, A[0], 0.1).item(), ref[0])
    assert bounds.symmetric_loss_change(phi, 1, w, b, A[0], 0.0).item() == 0.0
