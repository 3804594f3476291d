"""The atlas (chapter 13): its measurements against independent computations, its by-construction copies,
and the rank correlations it reports."""
import math

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn as nn

from flatnb import stats
from flatnb.config import budgets, recipes
from flatnb.measure import atlas
from flatnb import data as fdata


class SmallConv(nn.Module):
    """A tiny image classifier with the features/head contract (10 classes, 8×8 images)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Linear(24, 10)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


def _dataset(n, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    images = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    images[:, 0] = (100 + labels * 6).to(torch.uint8)[:, None, None]  # the class is in the red channel, 6/255 apart
    return fdata.Dataset(images, labels, [str(i) for i in range(10)], f"toy{seed}", "toy")


SIZES = type("S", (), dict(batch=32, n_aa=12, aa_norms=("linf", "l2"), aa_iter=100, aa_queries=5000, n_basin=24, n_radius=6,
                          radius_steps=5, radius_iter=3, n_curv=4, n_random=2, temperature_at_bound="raise"))()


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = SmallConv()
    train, test = _dataset(400, 1), _dataset(300, 2)
    opt = torch.optim.Adam(model.parameters(), 0.02)
    x, y = train.images.float() / 255, train.labels
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    pr = atlas.probe(train, test, n_train=40, n_test=120, n_cal=100, seed=0)
    return model, pr, atlas.measure(model, pr, SIZES, "cpu", seed=0)


def test_probe_is_seeded_and_its_test_and_calibration_images_are_disjoint():
    train, test = _dataset(50, 1), _dataset(40, 2)
    a, b = atlas.probe(train, test, 20, 15, 10, seed=3), atlas.probe(train, test, 20, 15, 10, seed=3)
    assert torch.equal(a.test.images, b.test.images) and torch.equal(a.train.images, b.train.images)
    rows = lambda ds: {bytes(im.numpy()) for im in ds.images}  # noqa: E731
    assert not rows(a.test) & rows(a.cal)
    assert (len(a.train), len(a.test), len(a.cal)) == (20, 15, 10)
    with pytest.raises(ValueError, match="exceeds"):
        atlas.probe(train, test, 20, 30, 20)


def _hessian_trace(model, x, y):
    """Tr of the Hessian of the cross-entropy w.r.t. the head weight, per sample, by autograd in float64."""
    m = model.double()
    out = []
    for xi, yi in zip(x.double(), y):
        phi = m.features(xi[None]).detach()
        w0 = m.head.weight.detach().clone()

        def loss(w):
            return nn.functional.cross_entropy(phi @ w.T + m.head.bias, yi[None])

        h = torch.autograd.functional.hessian(loss, w0).reshape(w0.numel(), w0.numel())
        out.append(float(torch.diagonal(h).sum()))
    model.float()
    return torch.tensor(out, dtype=torch.float64), float(w0.pow(2).sum())


def test_kappa_over_training_images_is_the_dataset_hessian_trace(setup):
    model, pr, e = setup
    x, y = pr.train.images.float() / 255, pr.train.labels
    tr, w_sq = _hessian_trace(model, x, y)
    assert e["kappa_train"]["kappa_sq"][0] == pytest.approx(float((w_sq * tr).mean()), rel=1e-4)
    lo, hi = e["kappa_train"]["kappa_sq"][1:]
    assert lo < e["kappa_train"]["kappa_sq"][0] < hi


def test_measure_reports_accuracy_and_robustness_of_the_model(setup):
    model, pr, e = setup
    with torch.no_grad():
        correct = model(pr.test.images.float() / 255).argmax(1) == pr.test.labels
    assert e["clean"].k == int(correct.sum()) and e["clean"].n == len(pr.test)
    assert e["clean"].value > 0.3, "the toy model should have learnt the red channel"
    for key in ("aa_linf", "aa_l2"):
        assert e[key].n == SIZES.n_aa and e[key].value <= correct[:SIZES.n_aa].float().mean() + 1e-9
    for key in ("basin", "radius", "curv_in"):
        assert all(math.isfinite(v) for v in e[key]) and e[key][1] <= e[key][0] <= e[key][2]
    assert 0 < e["temperature"] < 100 and 0 <= e["ece"] <= 1
    assert len(e["per_radius"]["radius"]) == len(e["per_radius"]["kappa_sq"]) == len(e["per_radius"]["p_top"])


def test_the_calibrated_copy_inherits_decisions_and_has_the_kappa_of_scaled_logits(setup):
    model, pr, e = setup
    cal, c = atlas.calibrated(model, e, pr, SIZES, "cpu")
    assert c["inherited"] == atlas.BY_CONSTRUCTION
    for f in atlas.BY_CONSTRUCTION:
        assert c[f] is e[f]
    assert c["basin"] is None and c["curv_in"] is None
    # independent: softmax of logits / T in float64, κ = ‖w/T‖² (1 - ‖p‖²) ‖φ‖²
    t = e["temperature"]
    x = pr.train.images.double() / 255
    m = model.double()
    with torch.no_grad():
        phi = m.features(x)
        p = (m.head(phi) / t).softmax(1)
        want = (m.head.weight / t).pow(2).sum() * (1 - p.pow(2).sum(1)) * phi.pow(2).sum(1)
    model.float()
    assert c["kappa_train"]["kappa_sq"][0] == pytest.approx(float(want.mean()), rel=1e-4)
    assert "†" in atlas.table({"raw": e, "raw (T)": c})


def test_columns_refuse_non_finite_values(setup):
    _, _, e = setup
    cols = atlas.columns({"a": e, "b": e})
    assert cols["kappa_sq_train"].shape == (2,) and "aa_l2" in cols
    assert "aa_l2" not in atlas.columns({"a": e, "b": dict(e, aa_l2=None)}), "a norm not run for every model"
    shown = atlas.table({"a": dict(e, aa_l2=None)})
    assert "AA ℓ2 0.5: not run" in shown and "AA ℓ2 0.5 %" not in shown
    assert "AA ℓ2 0.5 % (n=12)" in atlas.table({"a": e})
    # models attacked on different numbers of images (the manifest may hold 1,000 where 500 were asked): the header
    # gives the range and each cell its own n, never one model's n for all (chapter 13's full run, session 15)
    more = dict(e, aa_linf=stats.Fraction(0, 1000))
    mixed = atlas.table({"a": e, "b": more})
    assert "AA ℓ∞ 8/255 % (n=12-1,000, per cell)" in mixed and "AA ℓ2 0.5 % (n=12)" in mixed
    assert "0.0 [0.0, 0.4] (n=1,000)" in mixed and f"{100 * e['aa_linf'].value:.1f}" in mixed.split("| a |")[1]
    assert f"(n={e['aa_linf'].n})" in mixed.split("| a |")[1].split("\n")[0]
    bad = dict(e, conf=float("nan"))
    with pytest.raises(ValueError, match="conf"):
        atlas.columns({"a": e, "b": bad})


def test_every_zoo_entry_has_a_recipe_and_a_method_group():
    from flatnb.zoo import catalogue

    for profile, zoo in budgets.ZOO.items():
        for label, spec in zoo.items():
            assert budgets.zoo_method(label)
            if isinstance(spec, str):  # a shipped external model
                assert spec in catalogue.EXTERNAL
                continue
            arch, dataset, recipe, seed = spec
            assert recipes.lookup(arch, dataset, recipe, profile, seed).seed == seed
    # the full zoo (24 converged models) covers every method of the quick one (nine 2-epoch networks)
    assert {budgets.zoo_method(n) for n in budgets.ZOO["quick"]} < {budgets.zoo_method(n) for n in budgets.ZOO["full"]}
    assert len(budgets.ZOO["full"]) >= 24
    # chapter 13's E2 model is in each zoo, adversarially trained, and in full the paper's ε = 8/255 evidence model
    for profile, label in budgets.ZOO_AT.items():
        assert budgets.zoo_method(label) == "adversarial training" and label in budgets.ZOO[profile]
    assert budgets.ZOO["full"][budgets.ZOO_AT["full"]] == ("fastnet", "cifar10", "pgd_at", 0)
    assert recipes.lookup("fastnet", "cifar10", "pgd_at", "full").eps == 8 / 255
    with pytest.raises(ValueError, match="first word"):
        budgets.zoo_method("unknown method")


# ----------------------------------------------------------------------------- rank correlations


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        x, y = rng.integers(0, 5, 12).astype(float), rng.normal(size=12)
        if len(set(x)) > 1:
            assert stats.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic, abs=1e-12)


def test_partial_spearman_is_the_textbook_formula_on_ranks():
    rng = np.random.default_rng(1)
    x, y, z = rng.normal(size=(3, 30))
    y = y + 2 * z
    x = x + z
    r = lambda a, b: scipy.stats.spearmanr(a, b).statistic  # noqa: E731
    want = (r(x, y) - r(x, z) * r(y, z)) / math.sqrt((1 - r(x, z) ** 2) * (1 - r(y, z) ** 2))
    assert stats.partial_spearman(x, y, z) == pytest.approx(want, abs=1e-10)
    assert abs(stats.partial_spearman(x, y, z)) < abs(stats.spearman(x, y))  # the shared z removed


def test_correlations_refuse_what_has_no_ranking():
    with pytest.raises(ValueError, match="constant"):
        stats.spearman([1, 1, 1, 1], [1, 2, 3, 4])
    with pytest.raises(ValueError, match="non-finite"):
        stats.spearman([1, 2, float("nan")], [1, 2, 3])
    with pytest.raises(ValueError, match="at least 3"):
        stats.spearman([1, 2], [2, 1])
    est, lo, hi = stats.correlation_ci(stats.spearman, np.arange(8.0), np.arange(8.0) ** 3)
    assert (est, lo, hi) == pytest.approx((1.0, 1.0, 1.0), abs=1e-12)  # scipy's Spearman: 1 up to rounding
    est, lo, hi = stats.correlation_ci(stats.spearman, np.arange(9.0), [3, 1, 4, 1, 5, 9, 2, 6, 5])
    assert lo < est < hi


def test_as_interval_reads_fractions_tuples_and_numbers():
    f = stats.Fraction(3, 10)
    assert stats.as_interval(f) == (0.3, *f.interval)
    assert stats.as_interval((1, 0, 2)) == (1.0, 0.0, 2.0)
    assert stats.as_interval(0.5) == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError):
        stats.as_interval((1, 2))


def _brute_p(a, b):
    """Two-sided permutation p of the Pearson correlation of a and b over every ordering of b (independent of scipy)."""
    import itertools

    def r(u, v):
        u, v = u - u.mean(), v - v.mean()
        return float((u * v).sum() / math.sqrt(float((u * u).sum() * (v * v).sum())))

    obs = abs(r(a, b))
    perms = [abs(r(a, np.array(p))) for p in itertools.permutations(b)]
    return sum(v >= obs - 1e-12 for v in perms) / len(perms)


def test_rank_permutation_p_is_exact_for_small_n_and_matches_the_t_approximation_for_large_n():
    x = np.array([1.0, 2.5, 2.0, 4.0, 7.0, 5.5])
    y = np.array([0.3, 0.1, 0.9, 0.8, 1.4, 0.7])
    z = np.array([3.0, 1.0, 2.0, 6.0, 4.0, 5.0])
    rx, ry = scipy.stats.rankdata(x), scipy.stats.rankdata(y)
    assert stats.rank_permutation_p(x, y) == pytest.approx(_brute_p(rx, ry), abs=1e-12)
    # the partial test permutes rank residuals on z (Kennedy 1995)
    rz = scipy.stats.rankdata(z)
    res = lambda v: v - np.polyval(np.polyfit(rz, v, 1), rz)  # noqa: E731
    assert stats.rank_permutation_p(x, y, z) == pytest.approx(_brute_p(res(rx), res(ry)), abs=1e-12)
    g = np.random.default_rng(0)
    a = g.normal(size=60)
    b = 0.35 * a + g.normal(size=60)
    want = scipy.stats.spearmanr(a, b).pvalue  # the t approximation, good at n = 60
    assert stats.rank_permutation_p(a, b, n_resamples=20000) == pytest.approx(want, abs=0.01)
    t = stats.rank_test(a, b, seed=1)
    assert t["n"] == 60 and t["rho"][1] < t["rho"][0] < t["rho"][2] and "p = " in stats.fmt_test(t)
    with pytest.raises(ValueError, match="constant"):
        stats.rank_permutation_p(np.ones(5), np.arange(5.0))


def test_measure_takes_autoattack_from_outside_and_adds_robust_flatness(setup):
    model, pr, _ = setup
    sizes = type("S", (), {**{k: getattr(SIZES, k) for k in dir(SIZES) if not k.startswith("_")},
                           "n_rflat": 16, "rflat_samples": 2, "rflat_pgd_steps": 2, "rflat_worst_steps": 2})()
    given = {"linf": stats.Fraction(3, 500), "l2": stats.Fraction(40, 500)}
    e = atlas.measure(model, pr, sizes, "cpu", seed=0, robust=given)
    assert e["aa_linf"] is given["linf"] and e["aa_l2"] is given["l2"]  # not attacked again here
    lo, est, hi = e["rflat_avg"][1], e["rflat_avg"][0], e["rflat_avg"][2]
    assert lo <= est <= hi and e["robust_loss"] > 0 and math.isfinite(e["rflat_worst"][0])
    assert 0 <= e["basin_censored"].value <= 1
    cols = atlas.columns({"a": e, "b": e, "c": e})
    assert "rflat_avg" in cols and "rflat_worst" in cols and "aa_l2" in cols
    raw, part, n = atlas.within(e) if len(e["per_radius"]["radius"]) >= 3 else (None, None, 0)
    assert raw is None or (-1 <= raw["rho"][0] <= 1 and 0 < raw["p"] <= 1)
    assert "robust flatness avg." in atlas.table({"a": e})


def test_the_at_pair_is_one_network_trained_with_and_without_the_attack():
    """Chapters 9 and 11 compare AT with standard training: in the full profile (budgets.AT_PAIR) the same
    architecture, width, epochs, data, batch and optimizer, only the attack in the loss differs. The quick pair
    shares the network and the optimizer but not the schedule (its FGSM-RS copy trains 5 epochs on 10,000
    images: a few CPU minutes), which budgets.AT_PAIR's comment says."""
    same = ("arch", "dataset", "width", "epochs", "batch_size", "lr", "weight_decay", "n_train", "model_kw")
    for profile, pair in budgets.AT_PAIR.items():
        assert set(pair) == {"standard", "AT"}
        std, at = (recipes.lookup(*pair[r][:3], "full" if profile == "smoke" else profile, 0)
                   for r in ("standard", "AT"))
        shared = same if profile != "quick" else ("arch", "dataset", "width", "batch_size", "lr", "weight_decay")
        assert {k: getattr(std, k) for k in shared} == {k: getattr(at, k) for k in shared}, profile
        assert at.recipe == "pgd_at" and std.recipe != "pgd_at"


def test_the_full_sizes_meet_the_referee_minimums():
    """Issue 26's minimums for chapter 13's full profile: κ over >= 2,000 training images, flip radii on >= 200
    inputs, AutoAttack on >= 500 images in both norms, and the n_test probe images hold enough correct inputs."""
    s = budgets.sizes("13_atlas", "full")
    assert s["n_kappa"] >= 2000 and s["n_radius"] >= 200 and s["n_aa"] >= 500
    assert set(s["aa_norms"]) == {"linf", "l2"} and s["n_rflat"] > 0
    # the attacked inputs are the first correct ones among n_test: a 70 %-accurate model must have n_radius
    assert 0.7 * s["n_test"] >= max(s["n_radius"], s["n_basin"], s["n_curv"])


def test_findings_state_what_each_interval_and_p_value_decide():
    from flatnb.measure import atlas as at

    def t(est, lo, hi, p):
        return {"rho": (est, lo, hi), "p": p, "n": 24}

    corr = {("kappa_sq_train", "conf"): (t(0.9, 0.8, 0.95, 0.0001), None),
            ("kappa_sq_train", "aa_linf"): (t(-0.6, -0.8, -0.3, 0.002), t(-0.1, -0.5, 0.3, 0.6)),
            ("rflat_avg", "aa_linf"): (t(-0.4, -0.7, 0.05, 0.04), None)}  # p < 0.05 but the interval holds 0
    text = at.findings(corr, {"SAM", "TRADES"}, {"TRADES", "PGD"}, 24)
    lines = text.splitlines()
    assert "24 trained models" in lines[0]
    assert "κ and the mean confidence: ρ = +0.90 [+0.80, +0.95], p < 0.001: a rank relation" in lines[1]
    assert "partial correlations below are the ones that speak" in lines[1]
    kappa = next(s for s in lines if s.startswith("- the paper's κ"))
    assert "ρ = -0.60 [-0.80, -0.30], p = 0.002: a rank relation" in kappa
    assert "partialled out, ρ = -0.10 [-0.50, +0.30], p = 0.6: no rank relation shown" in kappa
    stutz = next(s for s in lines if s.startswith("- Stutz"))
    assert "no rank relation shown" in stutz  # the interval decides too, not p alone
    assert not any("ℓ2" in s for s in lines[1:])  # a correlation the run did not compute is not reported
    assert lines[-1] == ("- Flatter minimum than every standard seed: 2 method(s) (SAM, TRADES); of these, more robust "
                         "too: 1 (TRADES); flatter but not more robust: 1 (SAM); more robust without being flatter: "
                         "1 (PGD).")
    weak = at.findings({("kappa_sq_train", "conf"): (t(0.2, -0.3, 0.6, 0.4), None)}, set(), set(), 3)
    assert "speak" not in weak and "none" in weak
    with pytest.raises(ValueError, match="at least one model"):
        at.findings({}, set(), set(), 0)
