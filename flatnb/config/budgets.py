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
# quick: minutes on 2 CPU cores, CI; full: referee sample sizes on the shipped evidence models, each chapter within
# its CPU_MINUTES["full"] on one CPU thread (the whole book in about 3 hours on 2 cores).

#: chapter 5's refined E6 measurement (flatnb.measure.crossing), the same in chapters 5, 9 and 10 so that one claim
#: has one measurement (tests/test_valley.py checks that their sizes agree): ``confident``, the clean top-class
#: probability a path needs for the "rise"; ``bisect``, halvings of the flip segment; ``grid``, κ points inside it
E6 = {"quick": dict(confident=0.8, bisect=24, grid=8), "full": dict(confident=0.9, bisect=30, grid=8)}

SIZES = {
    "01_relative_flatness": {
        "quick": dict(hidden=64, n_check=24, train_steps=300),
        "full": dict(hidden=256, n_check=200, train_steps=2000)},
    "02_inputs_are_weights": {
        "quick": dict(n_lemma=16, deltas=(0.05, 0.25, 1.0), pgd_steps=8, lip_iter=10, n_small=256,
                      small_train=4000, small_epochs=4, n_mc=2000, n_mc_samples=8),
        # full, measured (process CPU time, one thread, 50-image slices of the main model, 2026-12-06): per image and
        # step PGD 7.2 ms, the feature attack 6.7 ms, the local Lipschitz power iteration 12 ms. n_lemma=500 made the
        # perturbation cell alone 29 min (500 x 50 steps x 5 radii x both attacks); the main model's pairs feed
        # identities (an implementation check) and the L-hat stretch, which 200 images settle; the substantive
        # inequality is decided on the certified net's n_small pairs.
        "full": dict(n_lemma=200, deltas=(0.01, 0.05, 0.25, 1.0, 2.0), pgd_steps=50, lip_iter=50, n_small=2000,
                     small_train=20000, small_epochs=10, n_mc=20000, n_mc_samples=64)},
    "03_local_bound": {  # radius_*: chapter 3's measured loss-change radius (bisection with an attack)
        "quick": dict(n_mlp=300, n_small=200, small_train=4000, small_epochs=4, steps=20, restarts=2,
                      n_resnet=12, resnet_deltas=(0.01, 0.05, 0.25, 1.0), resnet_steps=8, lip_iter=10,
                      n_radius=24, radius_scales=(1.0, 3.16, 10.0, 31.6, 100.0, 316.0), radius_steps=20,
                      radius_restarts=1, radius_iter=8),
        # full, measured (process CPU time, one thread beside two other processes, 2026-12-06) on 50 + 50 points,
        # 20 main-model images and 10 radius points: the bound cell 71 s (small net's training included), the main
        # model 9.9 s per image (9 radii), the radius search 17 s per point at 4 restarts and 12 bisections. The
        # first full sizes (2000 + 2000, 500, 500) would have taken hours; these take about 26 min.
        "full": dict(n_mlp=1000, n_small=300, small_train=20000, small_epochs=10, steps=100, restarts=10,
                     n_resnet=48, resnet_deltas=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0),
                     resnet_steps=50, lip_iter=50, n_radius=100,
                     radius_scales=(1.0, 1.78, 3.16, 5.62, 10.0, 17.8, 31.6, 56.2, 100.0, 178.0, 316.0),
                     radius_steps=50, radius_restarts=2, radius_iter=10)},
    "04_local_not_global": {  # toy_seeds: networks per condition in the two-moons comparison
        "quick": dict(n_test=1000, n_pairs=200_000, grid=161, toy_steps=800, toy_seeds=3),
        "full": dict(n_test=10_000, n_pairs=2_000_000, grid=321, toy_steps=3000, toy_seeds=20)},
    # Chapters 5-7 run on every model of MAIN_MODELS (full: three FastNet-64 seeds and the ResNet-18) and pool them.
    # Full sizes from CPU time (time.process_time, one torch thread) of the chapters' package calls on slices of
    # 64 (fastnet64-standard-s0) and 32 (resnet18-pyautoattack) test images, scaled linearly; seeds 1 and 2 are
    # costed as seed 0 (2026-12-06). Per test image: FastNet-64 ≈ 1/4 of the ResNet-18's time.
    "05_uncanny_valley": {  # bisect: halvings of the flip segment; grid: κ points inside it
        # full: per image 0.33 s (FastNet-64: PGD 8/255 0.06, long PGD 0.17, crossings 0.11) and 1.32 s (ResNet-18:
        # 0.23, 0.67, 0.42), so 3 × 0.33 + 1.32 = 2.3 s per image for the four models: 550 images ≈ 21 min
        # (+ loading and figures, ≈ 23 min of the 25); 2,200 pooled test images
        "quick": dict(n_test=256, batch=128, confident=0.8, bisect=24, grid=8),
        "full": dict(n_test=550, batch=250, confident=0.9, bisect=30, grid=8)},
    "06_scale_sweep": {  # scales: the paper's E1 grid of head scales s; n_pair: images for the paired s = 0.25
        # vs 1 test and E1b (only those two scales are attacked on them; quick: the sweep's own images)
        # full: one scale of PGD-ℓ2 per image 0.13 s (FastNet-64) and 0.58 s (ResNet-18), so 0.97 s per image and
        # scale for the four models: 7 scales × 80 + 2 scales × 260 images ≈ 1,050 s ≈ 17.5 min (≈ 19 of the 20);
        # 1,040 pooled images for the deciding fractions
        "quick": dict(n_test=128, n_pair=128, batch=128, scales=(0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 50.0)),
        "full": dict(n_test=80, n_pair=260, batch=260, scales=(0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 50.0))},
    "07_gradient_masking": {  # n_ctrl: images per model for the controls at s = 100 (CW, random start, float64,
        # APGD-DLR); n_ref: images for Square and the reference AutoAttack at s = 100 on the first model only
        # full: CE-PGD 8/255 per image and scale 0.055 s (FastNet-64) and 0.24 s (ResNet-18), so 7 scales ≈ 2.8 s per
        # image for the four models (+ ≈ 0.3 s of transfers): 250 images ≈ 13 min, 1,000 pooled; controls per image
        # ≈ 1.0 s (FastNet-64: float64 0.26, APGD-DLR 100 steps 0.56) and ≈ 4.5 s (ResNet-18; its float64 and APGD
        # costed by the FastNet-64 ratios, not measured), so 40 images ≈ 5 min; Square 0.38 s and AutoAttack 0.94 s per
        # image (FastNet-64, s = 100): 100 images ≈ 2.2 min; in all ≈ 21 min + loading ≈ 22 of the 25 min
        "quick": dict(n_test=128, batch=128, apgd_steps=25, scales=(1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0),
                      n_ctrl=128, n_ref=32, square_queries=5000),
        "full": dict(n_test=250, batch=250, apgd_steps=100, scales=(1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0),
                     n_ctrl=40, n_ref=100, square_queries=5000)},
    "08_flatness_detector": {
        # full, timed on one CPU thread (process time, 2026-12-06, a contended 2-core machine): fwd+bwd per image
        # 8.7 ms for fastnet64-standard-s0. Per image the chapter runs about 53 fwd+bwd units (PGD 8/255x10 and the
        # long PGD, both recorded, and the kappa-aware PGD 8/255x10 with its three forward passes): about 0.46 s on
        # FastNet-64. The "wrn28_4" of the full profile is the shipped WRN-16-4 (wrn16_4-standard-s0), which
        # trains at 80 images/s against FastNet-64's 252 (runs/cpu/benchmark_zoo.txt): about 3.2x, so 1.45 s per
        # image. 1,000 images (the contract's minimum for the detector) take about 32 min with both models, plus
        # about a minute of detector evaluation (CPU_MINUTES: 33).
        "quick": dict(n_test=256, batch=128, archs=("main",)),
        "full": dict(n_test=1000, batch=200, archs=("main", "wrn28_4"))},
    # n_test: E2 paths (50 steps); n_valley: long-attack paths (30 steps + the E6 crossings), a superset of them;
    # n_eval: clean + PGD-10; n_aa: AutoAttack (zoo.robust_accuracy: the manifest's measurement of a shipped model on
    # at least that many images, else measured here). full, on one CPU thread with the shipped FastNet-64 standard
    # and FastNet-32 PGD-2 models: timed on 100 images under contention (wall) and calibrated by one CPU-time
    # measurement (PGD-10 + logits of FastNet-64: 0.064 s of CPU per image against 0.22 s of wall), per image in
    # CPU seconds: FastNet-64 E2 0.33, long 0.21, crossings 0.13, eval 0.064; FastNet-32 E2 0.10, long 0.063,
    # crossings 0.036, eval 0.023. So 500 x 0.43 + 1000 x 0.44 + 2000 x 0.087 = about 14 min, plus loading and
    # figures; AutoAttack must come from the manifest (the standard model's holds 200 images today: measuring 1,000
    # here adds about 10 min of APGD-CE on a standard model; the AT model's robust images go through all four attacks,
    # far longer)
    "09_adversarial_training": {
        "quick": dict(n_test=128, n_valley=128, n_eval=512, n_aa=64, batch=128, **E6["quick"]),
        "full": dict(n_test=500, n_valley=1000, n_eval=2000, n_aa=1000, batch=500, **E6["full"])},
    # cifar100: train and attack a ResNet-18 on CIFAR-100 (downloads it). full, one CPU thread: the long attack plus the
    # E6 crossings cost about 0.34 s of CPU per image on the shipped FastNet-64 (chapter 9's calibrated timing); the
    # full architectures were first estimated by the FLOPs of the paper's sizes (17 s per image for all seven models).
    # Measured instead (record of 2026-12-07, one CPU thread beside a training process, CIFAR-100 offline): the
    # shipped models (WRN-16-4, VGG-11-BN width 32, the two ViTs, the Tiny ImageNet ResNet-18 at width 32 with a
    # stride-2 stem) and the reference FastNet-64 took 245 s of wall time for 100 images per model, loading included.
    # So 1,000 images per model (the contract's minimum for an E6 fraction) take about 40 min; where CIFAR-100 can
    # be downloaded, training its ResNet-18 comes on top. With DenseNet-121 (k = 12) as the seventh model (issue 25)
    # the full record took 3,136.7 s on one thread (record of 2026-12-07, beside another chapter): CPU_MINUTES 52
    "10_architectures": {
        "quick": dict(n_test=64, batch=64, cifar100=False, **E6["quick"]),
        "full": dict(n_test=1000, batch=250, cifar100=True, **E6["full"])},
    "11_off_manifold": {
        # n_cal: held-out images for the temperature; n_aa / n_aa_std: AutoAttack images of the AT / standard model
        # (zoo.robust_accuracy: the manifest's measurement of a shipped model when it covers that many, else
        # measured here); min_at_correct: the AT model's correctly classified images the claim needs;
        # temperature_at_bound: a model worse than a uniform guess is an error (the smoke profile clips, as in 13).
        # full, estimated for one CPU thread (process time, 2026-12-06, contended): fwd+bwd per image 8.7 ms for
        # fastnet64-standard-s0 and 2.85 ms for fastnet32-pgd_at-s0; per correctly classified image walls.measure
        # costs about 12.7 fwd+bwd units per direction (20 forward passes along the line, two Hessian-vector
        # products) over 7 + n_random directions plus the 20-step attack direction: about 2.3 s (FastNet-64) and
        # 0.75 s (FastNet-32 AT) with n_random=12. 350 test images (about 325 standard-correct, 250 AT-correct at
        # 93 % / 72 % clean) take about 16 min, plus about 1.5 min for the 50k-image pool, the nearest-neighbour
        # search and the temperatures; AutoAttack comes from the manifest (both models measured on n=1,000).
        "quick": dict(n_test=64, n_cal=1000, n_pool=5000, n_random=4, n_aa=32, n_aa_std=32, min_at_correct=10,
                      batch=64, temperature_at_bound="raise"),
        "full": dict(n_test=350, n_cal=5000, n_pool=50_000, n_random=12, n_aa=1000, n_aa_std=1000,
                     min_at_correct=200, batch=250, temperature_at_bound="raise")},
    "12_verdict": {"quick": {}, "full": {}},
    "13_atlas": {  # n_kappa: training images for H(w, S); n_aa: AutoAttack images per model and norm
        # quick: AutoAttack ℓ∞ only (on the adversarially trained models its FAB-T and Square parts take minutes
        # per norm on one CPU thread); full: ℓ∞ 8/255 and ℓ2 0.5. aa_iter/aa_queries: the reference's budget.
        # temperature_at_bound: a model worse than a uniform guess is an error (the smoke profile clips)
        # aa_zoo: AutoAttack from the zoo (manifest or cached chunks, on n_aa seeded test images; full), else
        # attacked inside atlas.measure (quick). n_rflat etc.: Stutz et al.'s robust flatness (PGD steps per robust
        # loss, random weight draws, worst-case ascent steps): cost ≈ (2 + samples + worst steps) PGD runs.
        # Full sizes: measured (process CPU time, cProfile, one thread, on 50-input slices of shipped models;
        # session 9): at the first full sizes one robust FastNet-32 took ≈ 8.8 min, the ResNet-18 ≈ 8.5× that.
        # Now: the flip radius by the margin (CW) run alone (radius_ce=False: no cross-entropy run, no random
        # restart; on 60 inputs each of the PGD-AT FastNet-32 and the FastNet-64 the median radius is the same as
        # with both runs, 5-15 % of inputs get a bound > 2 % looser, at half the cost), 10 steps, 6 halvings,
        # steps in bf16 with every flip confirmed in float32 (radius.max_loss_change); κ on the 2,000
        # training images; the basin on 100 of the correct inputs (chapter 9 measures E2 at its own sizes);
        # robust flatness on 100 images with PGD-5. Measured with both flip runs: PGD-AT FastNet-32 158 s,
        # FastNet-64 307 s (flip radius 148 s of it), ResNet-18 ≈ 4× the FastNet-64. Measured at these sizes
        # (margin run alone): a standard FastNet-32 and the PGD-AT one 98 s each (flip radius 29 and 40 s,
        # robust flatness 28 and 30 s), so 22 FastNet-32s ≈ 36 min, the FastNet-64 ≈ 4 and the ResNet-18
        # ≈ 15 (estimated from the ratios above): ≈ 55 min on one thread.
        "quick": dict(n_kappa=2000, n_test=1000, n_cal=1000, n_aa=32, aa_norms=("linf",), aa_iter=100,
                      aa_queries=5000, n_basin=64, n_radius=12, radius_steps=10, radius_iter=5, radius_restarts=0,
                      radius_bf16=True, radius_ce=False, n_curv=16, n_random=4,
                      batch=256, temperature_at_bound="raise", aa_zoo=False, n_rflat=32, rflat_samples=2,
                      rflat_pgd_steps=3, rflat_worst_steps=2),
        "full": dict(n_kappa=2000, n_test=2000, n_cal=2000, n_aa=500, aa_norms=("linf", "l2"), aa_iter=100,
                     aa_queries=5000, n_basin=100, n_radius=200, radius_steps=10, radius_iter=6, radius_restarts=0,
                     radius_bf16=True, radius_ce=False, n_curv=50, n_random=8, batch=500,
                     temperature_at_bound="raise", aa_zoo=True, n_rflat=100, rflat_samples=5, rflat_pgd_steps=5,
                     rflat_worst_steps=10)},
}


# Estimated wall minutes per chapter on one CPU thread (quick: measured in the committed quick records; full: the
# budget each chapter's full sizes are chosen to fit, so that the whole book takes at most 3 hours on 2 cores).
# The runner balances its --jobs lanes with these; each record states the chapter's measured wall time.
CPU_MINUTES = {
    "quick": {"01_relative_flatness": 0.5, "02_inputs_are_weights": 0.5, "03_local_bound": 1.2,
              "04_local_not_global": 0.8, "05_uncanny_valley": 1.3, "06_scale_sweep": 1.5,
              "07_gradient_masking": 2.2, "08_flatness_detector": 0.7, "09_adversarial_training": 3.2,
              "10_architectures": 2.5, "11_off_manifold": 2.2, "12_verdict": 0.2, "13_atlas": 7.3},
    "full": {"01_relative_flatness": 3, "02_inputs_are_weights": 25, "03_local_bound": 28,
             "04_local_not_global": 10, "05_uncanny_valley": 33, "06_scale_sweep": 22, "07_gradient_masking": 25,
             "08_flatness_detector": 33, "09_adversarial_training": 30, "10_architectures": 52,
             "11_off_manifold": 25, "12_verdict": 1, "13_atlas": 60},
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
    # full: 24 converged models (issue 26), shipped by `python -m flatnb.zoo train --group atlas`
    # (flatnb.zoo.catalogue.ATLAS, with the training time each takes). FastNet-32 for 12 epochs (18 for weight decay ×4
    # and LogitNorm, which converge more slowly), one change each (flatnb.config.recipes, "atlas_*"); the ε = 8/255 PGD-AT and β = 6 TRADES models and FastNet-64 are the
    # evidence models; the ResNet-18 is the one inside pyautoattack (the paper's architecture, 94.2 %).
    "full": {
        "standard, seed 0": ("fastnet", "cifar10", "atlas_standard", 0),
        "standard, seed 1": ("fastnet", "cifar10", "atlas_standard", 1),
        "standard, seed 2": ("fastnet", "cifar10", "atlas_standard", 2),
        "SAM ρ=0.02": ("fastnet", "cifar10", "atlas_sam_0.02", 0),
        "SAM ρ=0.05": ("fastnet", "cifar10", "atlas_sam_0.05", 0),
        "SAM ρ=0.1": ("fastnet", "cifar10", "atlas_sam_0.1", 0),
        "label smoothing 0.1": ("fastnet", "cifar10", "atlas_ls_0.1", 0),
        "label smoothing 0.2": ("fastnet", "cifar10", "atlas_ls_0.2", 0),
        "label smoothing 0.3": ("fastnet", "cifar10", "atlas_ls_0.3", 0),
        "mixup α=0.2": ("fastnet", "cifar10", "atlas_mixup_0.2", 0),
        "mixup α=1": ("fastnet", "cifar10", "atlas_mixup_1", 0),
        "weight decay ×1/4": ("fastnet", "cifar10", "atlas_wd_0.25x", 0),
        "weight decay ×4": ("fastnet", "cifar10", "atlas_wd_4x", 0),
        "LogitNorm τ=0.04": ("fastnet", "cifar10", "atlas_logitnorm_0.04", 0),
        "LogitNorm τ=0.2": ("fastnet", "cifar10", "atlas_logitnorm_0.2", 0),
        "early-stopped, epoch 6 of 12": ("fastnet", "cifar10", "atlas_early_6", 0),
        "early-stopped, epoch 9 of 12": ("fastnet", "cifar10", "atlas_early_9", 0),
        "PGD-2 AT ε=2/255": ("fastnet", "cifar10", "atlas_pgd_at_2", 0),
        "PGD-2 AT ε=4/255": ("fastnet", "cifar10", "atlas_pgd_at_4", 0),
        "PGD-2 AT ε=8/255": ("fastnet", "cifar10", "pgd_at", 0),
        "TRADES β=1": ("fastnet", "cifar10", "atlas_trades_1", 0),
        "TRADES β=6": ("fastnet", "cifar10", "trades", 0),
        "FastNet-64, standard, seed 0": ("fastnet", "cifar10", "standard", 0),
        "ResNet-18 (pyautoattack)": "resnet18-pyautoattack",
    },
}
ZOO["smoke"] = ZOO["full"]  # the smoke profile: the full zoo's recipes at toy scale (flatnb.config.smoke)
#: chapters 9 and 11 compare adversarial training with standard training on ONE network: the AT model and its
#: standard twin, same architecture, width, epochs and optimizer, only the attack in the loss differs (κ, the
#: margins and the basin depend on the width, so a wider standard model would mix architecture with training).
#: (arch, dataset, recipe, seed); seed None: the chapter's seed. full: FastNet-32, 12 epochs, both shipped (the
#: standard twin is the atlas's seed-0 standard model); quick: the quick main network and its FGSM-RS copy (the same
#: network and optimizer, but 5 epochs of 10,000 images against 8 of 50,000: a toy, graded "not testable here").
AT_PAIR = {"quick": {"standard": ("main", "cifar10", "standard", None), "AT": ("main", "cifar10", "pgd_at", None)},
           "full": {"standard": ("fastnet", "cifar10", "atlas_standard", None),
                    "AT": ("fastnet", "cifar10", "pgd_at", None)}}
AT_PAIR["smoke"] = AT_PAIR["full"]
#: the zoo's model for the paper's E2 and E6-AT rows (chapter 13): PGD adversarial training at ε = 8/255, the
#: paper's setting (the zoo's other AT models train at smaller ε or with TRADES)
ZOO_AT = {"quick": "PGD-2 AT", "full": "PGD-2 AT ε=8/255"}
ZOO_AT["smoke"] = ZOO_AT["full"]
#: the kind of each zoo label (the atlas's colours, markers and sets), by the label's first word. "standard" is
#: the yardstick (the seeds of one recipe); other architectures trained the standard way form their own group.
ZOO_METHOD = {"standard": "standard", "SAM": "flatness-seeking (SAM)", "label": "confidence regulariser",
              "mixup": "confidence regulariser", "LogitNorm": "confidence regulariser",
              "weight": "weight decay", "early": "early-stopped", "PGD": "adversarial training",
              "TRADES": "adversarial training", "FastNet": "other architecture", "ResNet": "other architecture"}


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
    ("densenet121", "cifar10", "standard"),  # chapter 10 (quick: DenseNet-21, k = 8)
    ("vit_tiny", "cifar10", "standard"),
    ("resnet18", "tinyimagenet", "standard"),
    ("vit_tiny", "tinyimagenet", "standard"),
    # chapter 13's zoo, (arch, dataset, recipe, seed)
    *((a, d, r, s) for a, d, r, s in ZOO["quick"].values()),
]
