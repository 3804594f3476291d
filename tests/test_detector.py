"""The decision stump of flatnb.measure.stump against brute force."""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from flatnb.measure import stump as an




def _brute_force_best(s, t):
    """Best accuracy over every threshold in {values, values +- tiny, +-inf} and both polarities."""
    cands = np.concatenate([s, s - 1e-9, s + 1e-9, [-np.inf, np.inf]])
    best = 0.0
    for thr, pol in itertools.product(cands, (1, -1)):
        pred = (pol * (s - thr) > 0).astype(int)
        best = max(best, float((pred == t).mean()))
    return best


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(-5, 5), st.integers(0, 1)), min_size=1, max_size=25))
def test_stump_matches_brute_force(rows):
    s = np.array([r[0] for r in rows], dtype=float)
    t = np.array([r[1] for r in rows])
    thr, pol, acc = an.fit_stump(s, t)
    assert acc == pytest.approx(_brute_force_best(s, t))
    # the returned rule really achieves the reported accuracy
    assert float((an.predict_stump(s, thr, pol) == t).mean()) == pytest.approx(acc)


def test_stump_separable_and_reversed():
    s = np.array([0.1, 0.2, 0.3, 5.0, 6.0, 7.0])
    thr, pol, acc = an.fit_stump(s, [0, 0, 0, 1, 1, 1])
    assert acc == 1.0 and pol == 1 and 0.3 < thr < 5.0
    thr, pol, acc = an.fit_stump(s, [1, 1, 1, 0, 0, 0])
    assert acc == 1.0 and pol == -1


def test_cross_validation_uses_held_out_folds():
    rng = np.random.default_rng(0)
    # separable data: every fold is perfect
    s = np.concatenate([rng.normal(0, 1, 100), rng.normal(10, 1, 100)])
    t = np.repeat([0, 1], 100)
    accs = an.cross_validate_stump(s, t, folds=5, seed=0)
    assert accs.shape == (5,) and np.all(accs == 1.0)
    # pure noise: training accuracy of a stump overfits above 0.5, held-out accuracy stays near 0.5
    s = rng.normal(size=400)
    t = rng.integers(0, 2, 400)
    accs = an.cross_validate_stump(s, t, folds=5, seed=1)
    assert abs(accs.mean() - 0.5) < 0.1
    # two Gaussians with a known Bayes accuracy Phi(1) = 0.841
    s = np.concatenate([rng.normal(-1, 1, 2000), rng.normal(1, 1, 2000)])
    t = np.repeat([0, 1], 2000)
    accs = an.cross_validate_stump(s, t, folds=5, seed=2)
    assert abs(accs.mean() - 0.8413) < 0.03


def test_stump_rejects_bad_input():
    with pytest.raises(ValueError, match="0 or 1"):
        an.fit_stump([1.0, 2.0], [0, 2])
    with pytest.raises(ValueError, match="finite"):
        an.fit_stump([1.0, float("inf")], [0, 1])
    with pytest.raises(ValueError, match="fewer than folds"):
        an.cross_validate_stump([1.0, 2.0, 3.0], [0, 1, 1], folds=5)
