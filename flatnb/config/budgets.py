"""Named attack budgets and each chapter's sample sizes per profile: one explicit table each.

Training configurations live in :mod:`flatnb.config.recipes`; this module holds the rest of the book's
configuration. A chapter reads its sizes as ``ch.sizes`` (:func:`flatnb.book.chapter.setup`) and its
attacks as ``budgets.ATTACKS["pgd_linf_long"]`` (keyword arguments for :func:`flatnb.attacks.pgd`).
"""
import re

# ============================================================================= attack budgets
# The named attacks the chapters share (Walter et al. 2026 §5; the Uncanny Valley code's defaults).
# Each is a dict of keyword arguments for flatnb.attacks.pgd (norm, eps, steps, step_size).

ATTACKS = {
    # E3/E6: the paper's standard attack, PGD-ℓ∞ 8/255, 10 steps of 2/255 (no random start for trajectories)
    "pgd_linf_8": dict(norm="linf", eps=8 / 255, steps=10, step_size=2 / 255),
    # E6: the long attack that keeps pushing after the flip, ε = 0.1, 30 steps of 0.0078
    "pgd_linf_long": dict(norm="linf", eps=0.1, steps=30, step_size=0.0078),
    # E1: the weak ℓ2 attack of the scale sweep, ε = 0.025, 25 steps of 0.001
    "pgd_l2_e1": dict(norm="l2", eps=0.025, steps=25, step_size=0.001),
    # E2: the basin-width attack, PGD-ℓ2 ε = 0.5, 50 steps of 0.01
    "pgd_l2_e2": dict(norm="l2", eps=0.5, steps=50, step_size=0.01),
}


# ============================================================================= chapter sizes
# Sample sizes per chapter and profile (read by flatnb.book.chapter.setup into ``ch.sizes``).
# quick: minutes on 2 CPU cores, CI; full: the paper's scale on one GPU.

SIZES = {
    "01_relative_flatness": {
        "quick": dict(hidden=64, n_check=24, train_steps=300),
        "full": dict(hidden=256, n_check=200, train_steps=2000)},
    "02_inputs_are_weights": {
        "quick": dict(n_lemma=16, deltas=(0.05, 0.25, 1.0), pgd_steps=8, lip_iter=10, n_small=256,
                      small_train=4000, small_epochs=4, n_mc=2000, n_mc_samples=8),
        "full": dict(n_lemma=500, deltas=(0.01, 0.05, 0.25, 1.0, 2.0), pgd_steps=50, lip_iter=50, n_small=2000,
                     small_train=20000, small_epochs=10, n_mc=20000, n_mc_samples=64)},
    "03_local_bound": {  # radius_*: chapter 3's measured loss-change radius (bisection with an attack)
        "quick": dict(n_mlp=300, n_small=200, small_train=4000, small_epochs=4, steps=20, restarts=2,
                      n_resnet=12, resnet_deltas=(0.01, 0.05, 0.25, 1.0), resnet_steps=8, lip_iter=10,
                      n_radius=24, radius_scales=(1.0, 3.16, 10.0, 31.6, 100.0, 316.0), radius_steps=20,
                      radius_restarts=1, radius_iter=8),
        "full": dict(n_mlp=2000, n_small=2000, small_train=20000, small_epochs=10, steps=100, restarts=10,
                     n_resnet=500, resnet_deltas=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0),
                     resnet_steps=50, lip_iter=50, n_radius=500,
                     radius_scales=(1.0, 1.78, 3.16, 5.62, 10.0, 17.8, 31.6, 56.2, 100.0, 178.0, 316.0),
                     radius_steps=50, radius_restarts=4, radius_iter=12)},
    "04_local_not_global": {  # toy_seeds: networks per condition in the two-moons comparison
        "quick": dict(n_test=1000, n_pairs=200_000, grid=161, toy_steps=800, toy_seeds=3),
        "full": dict(n_test=10_000, n_pairs=2_000_000, grid=321, toy_steps=3000, toy_seeds=20)},
    "05_uncanny_valley": {  # bisect: halvings of the flip segment; grid: κ points inside it
        "quick": dict(n_test=256, batch=128, confident=0.8, bisect=24, grid=8),
        "full": dict(n_test=10_000, batch=500, confident=0.9, bisect=30, grid=8)},
    "06_scale_sweep": {  # scales: the paper's E1 grid of head scales s
        "quick": dict(n_test=128, batch=128, scales=(0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 50.0)),
        "full": dict(n_test=10_000, batch=500, scales=(0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 50.0))},
    "07_gradient_masking": {  # n_ref: images for the reference AutoAttack and Square at s = 100
        "quick": dict(n_test=128, batch=128, apgd_steps=25, scales=(1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0),
                      n_ref=32, square_queries=5000),
        "full": dict(n_test=10_000, batch=500, apgd_steps=100, scales=(1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0),
                     n_ref=1000, square_queries=5000)},
    "08_flatness_detector": {
        # full, timed on one CPU thread (process time, 2026-12-06, a contended 2-core machine): fwd+bwd per image
        # 8.7 ms for fastnet64-standard-s0, 53 ms for WRN-28-4 (untrained, full width; not shipped yet, so a full
        # run trains it). Per image the chapter runs about 53 fwd+bwd units (PGD 8/255x10 and the long PGD, both
        # recorded, and the kappa-aware PGD 8/255x10 with its three forward passes): about 0.46 s on FastNet-64
        # and 2.8 s on WRN-28-4, so 400 images take about 22 min with both models (about 3 min with FastNet-64
        # alone), plus about a minute of detector evaluation. NOTE: the full-profile contract asks for >= 1,000
        # images for the detector; with WRN-28-4 that is about 55 min, more than this chapter's 25 min.
        "quick": dict(n_test=256, batch=128, archs=("main",)),
        "full": dict(n_test=400, batch=200, archs=("main", "wrn28_4"))},
    "09_adversarial_training": {  # n_test: recorded paths; n_eval: clean + PGD; n_aa: AutoAttack
        "quick": dict(n_test=128, n_eval=512, n_aa=64, batch=128),
        "full": dict(n_test=1000, n_eval=10_000, n_aa=1000, batch=500)},
    "10_architectures": {  # cifar100: train and attack a ResNet-18 on CIFAR-100 (downloads it)
        "quick": dict(n_test=64, batch=64, cifar100=False),
        "full": dict(n_test=1000, batch=500, cifar100=True)},
    "11_off_manifold": {
        # n_cal: held-out images for the temperature; n_aa / n_aa_std: AutoAttack images of the AT / standard model
        # (zoo.robust_accuracy: the manifest's measurement of a shipped model when it covers that many, else
        # measured here); min_at_correct: the AT model's correctly classified images the claim needs.
        # full, estimated for one CPU thread (process time, 2026-12-06, contended): fwd+bwd per image 8.7 ms for
        # fastnet64-standard-s0 and 2.85 ms for fastnet32-pgd_at-s0; per correctly classified image walls.measure
        # costs about 12.7 fwd+bwd units per direction (20 forward passes along the line, two Hessian-vector
        # products) over 7 + n_random directions plus the 20-step attack direction: about 2.3 s (FastNet-64) and
        # 0.75 s (FastNet-32 AT) with n_random=12. 350 test images (about 325 standard-correct, 250 AT-correct at
        # 93 % / 72 % clean) take about 16 min, plus about 1.5 min for the 50k-image pool, the nearest-neighbour
        # search and the temperatures; AutoAttack comes from the manifest (AT: n=1,000, standard: n=200).
        "quick": dict(n_test=64, n_cal=1000, n_pool=5000, n_random=4, n_aa=32, n_aa_std=32, min_at_correct=10,
                      batch=64),
        "full": dict(n_test=350, n_cal=5000, n_pool=50_000, n_random=12, n_aa=1000, n_aa_std=200,
                     min_at_correct=200, batch=250)},
    "12_verdict": {"quick": {}, "full": {}},
    "13_atlas": {  # n_kappa: training images for H(w, S); n_aa: AutoAttack images per model and norm
        # quick: AutoAttack ℓ∞ only (on the adversarially trained models its FAB-T and Square parts take minutes
        # per norm on one CPU thread); full: ℓ∞ 8/255 and ℓ2 0.5. aa_iter/aa_queries: the reference's budget.
        # temperature_at_bound: a model worse than a uniform guess is an error (the smoke profile clips)
        "quick": dict(n_kappa=2000, n_test=1000, n_cal=1000, n_aa=32, aa_norms=("linf",), aa_iter=100,
                      aa_queries=5000, n_basin=64, n_radius=12, radius_steps=10, radius_iter=5, n_curv=16, n_random=4,
                      batch=256, temperature_at_bound="raise"),
        "full": dict(n_kappa=10_000, n_test=5000, n_cal=5000, n_aa=1000, aa_norms=("linf", "l2"), aa_iter=100,
                     aa_queries=5000, n_basin=500, n_radius=200, radius_steps=30, radius_iter=10, n_curv=200,
                     n_random=16, batch=500, temperature_at_bound="raise")},
}


def sizes(stem: str, profile: str) -> dict:
    """A chapter's sizes in ``profile`` (``{}`` for a chapter without any); ``"smoke"``: the full ones at
    toy scale (:func:`flatnb.config.smoke.sizes`)."""
    table = SIZES.get(stem, {})
    if profile == "smoke":
        from flatnb.config import smoke  # only a smoke run loads it

        return smoke.sizes(stem, table.get("full", {}))
    return dict(table.get(profile, {}))


# ============================================================================= the models a claim is checked on
# label -> (arch, dataset, recipe, seed) of flatnb.config.recipes.TABLE, or the name of a shipped external model
# (weights/manifest.json). A claim about "a trained standard model" (E1, E3, E6) is checked on each and pooled:
# quick: the main model; full: three seeds of the main FastNet-64 and the paper's architecture, the ResNet-18
# that ships inside pyautoattack (the reference AutoAttack's example model).
MAIN_MODELS = {
    "quick": {"FastNet-32, seed 0": ("main", "cifar10", "standard", 0)},
    "full": {"FastNet-64, seed 0": ("main", "cifar10", "standard", 0),
             "FastNet-64, seed 1": ("main", "cifar10", "standard", 1),
             "FastNet-64, seed 2": ("main", "cifar10", "standard", 2),
             "ResNet-18 (pyautoattack)": "resnet18-pyautoattack"},
}
MAIN_MODELS["smoke"] = MAIN_MODELS["full"]


# ============================================================================= the atlas's zoo (chapter 13)
# label -> (arch, dataset, recipe, seed) of flatnb.config.recipes.TABLE. quick: FastNet at width 16 for 2 epochs
# (recipes "zoo_*"); full: the paper's ResNet-18 with each training method.
ZOO = {
    "quick": {
        "standard, seed 0": ("fastnet", "cifar10", "zoo_standard", 0),
        "standard, seed 1": ("fastnet", "cifar10", "zoo_standard", 1),
        "standard, seed 2": ("fastnet", "cifar10", "zoo_standard", 2),
        "SAM ρ=0.05": ("fastnet", "cifar10", "zoo_sam", 0),
        "SAM ρ=0.2": ("fastnet", "cifar10", "zoo_sam_0.2", 0),
        "label smoothing 0.2": ("fastnet", "cifar10", "zoo_label_smoothing", 0),
        "mixup α=0.2": ("fastnet", "cifar10", "zoo_mixup", 0),
        "PGD-2 AT": ("fastnet", "cifar10", "zoo_pgd_at", 0),
        "TRADES": ("fastnet", "cifar10", "zoo_trades", 0),
    },
    "full": {
        "standard, seed 0": ("resnet18", "cifar10", "standard", 0),
        "standard, seed 1": ("resnet18", "cifar10", "standard", 1),
        "standard, seed 2": ("resnet18", "cifar10", "standard", 2),
        "SAM ρ=0.05": ("resnet18", "cifar10", "sam", 0),
        "SAM ρ=0.2": ("resnet18", "cifar10", "sam_0.2", 0),
        "label smoothing 0.2": ("resnet18", "cifar10", "label_smoothing", 0),
        "mixup α=0.2": ("resnet18", "cifar10", "mixup", 0),
        "PGD-10 AT": ("resnet18", "cifar10", "pgd_at", 0),
        "TRADES": ("resnet18", "cifar10", "trades", 0),
    },
}
ZOO["smoke"] = ZOO["full"]  # the smoke profile: the full zoo's recipes at toy scale (flatnb.config.smoke)
#: the kind of each zoo label (the atlas's colours and sets): standard / flatness-seeking / confidence / adversarial
ZOO_METHOD = {"standard": "standard", "SAM": "flatness-seeking (SAM)", "label": "confidence regulariser",
              "mixup": "confidence regulariser", "PGD": "adversarial training",
              "TRADES": "adversarial training"}


def zoo_method(label: str) -> str:
    """The method group of a zoo label (its first word decides)."""
    first = re.split(r"[\s,-]+", label.strip())[0]
    if first not in ZOO_METHOD:
        raise ValueError(f"zoo label {label!r}: its first word must be one of {sorted(ZOO_METHOD)}")
    return ZOO_METHOD[first]


# ============================================================================= models the quick chapters use
# (arch, dataset, recipe) trained before the chapters execute in the tests (tests/conftest.py), so that no
# chapter trains inside a cell; the same list is what `make book` trains on a cold cache.
CHAPTER_MODELS = [
    ("main", "cifar10", "standard"),   # chapters 2, 3, 5-11
    ("main", "cifar10", "pgd_at"),     # chapters 9, 11
    ("wrn28_4", "cifar10", "standard"),  # chapter 10 (quick: WRN-16-1)
    ("vgg11_bn", "cifar10", "standard"),
    ("vit_tiny", "cifar10", "standard"),
    ("resnet18", "tinyimagenet", "standard"),
    ("vit_tiny", "tinyimagenet", "standard"),
    # chapter 13's zoo, (arch, dataset, recipe, seed)
    *((a, d, r, s) for a, d, r, s in ZOO["quick"].values()),
]
