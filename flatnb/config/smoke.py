"""The smoke profile: the full profile's code paths at toy scale, to test a full-profile run in minutes.

``python -m flatnb.book --profile full --dry-run`` executes every chapter with ``profile="smoke"``: the full
profile's models, recipes, attacks, datasets and chapter branches, each recipe trained for one epoch of a few
hundred images (:func:`config`) and each sample size capped (:func:`sizes`). Its numbers mean nothing and it
writes no run record under ``runs/``. Only a smoke run imports this module, so changing it never makes a
quick or full run record stale (records fingerprint the modules a chapter loaded).
"""
from __future__ import annotations

import dataclasses

#: each full-profile recipe is trained for one epoch of at most this many images
IMAGES = 256
#: a model's clean accuracy in the chapter banner is measured on this many test images
EVAL_IMAGES = 256

#: caps on the full profile's integer sizes, by the key's ending, then its beginning (first match wins);
#: keys that match none (grids, widths, flags, tuples of scales) keep their full value
CAPS = {"ending": {"_epochs": 1, "_train": 256, "steps": 5, "_iter": 3, "restarts": 1, "_seeds": 2,
                   "_queries": 50, "_samples": 4},
        "beginning": {"n_": 24},
        "whole": {"n_pairs": 20_000, "batch": 16}}

#: per chapter, values that replace the capped ones (chapter 6: the paired test on more images than the sweep, as
#: in the full profile, so that its separate run is exercised). A one-epoch model is right about one image in ten
#: and confident about nothing: the E6 confidence threshold of chapters 5, 9 and 10 drops to 0 (their
#: confident-path branches must still run); chapter 11 needs one correctly classified image of the AT
#: model instead of the full profile's 200 and clips the temperature as chapter 13 does; chapter 13 measures on 128 test images (so that every zoo model
#: classifies some basin images) and takes the largest allowed temperature for a model whose logits are worse
#: than a uniform guess (a real run raises there), and attacks its 24 toy models with AutoAttack at the capped budget
#: (``aa_iter``, ``aa_queries``) inside the chapter instead of the zoo's full-budget measurement: a one-epoch model
#: that outputs nearly one class is "robust" on that class's images, and the full budget then spends minutes per model
#: on them (the zoo's path, :func:`flatnb.zoo.robust_accuracy`, is exercised by chapters 9 and 11).
OVERRIDES = {"05_uncanny_valley": {"confident": 0.0},
             "06_scale_sweep": {"n_pair": 32},  # more than the sweep's n_test, as in full: the separate paired run
             "09_adversarial_training": {"confident": 0.0}, "10_architectures": {"confident": 0.0},
             "11_off_manifold": {"min_at_correct": 1, "temperature_at_bound": "clip"},
             "13_atlas": {"n_test": 128, "n_basin": 128, "temperature_at_bound": "clip", "aa_zoo": False}}


def _cap(key: str) -> int | None:
    if key in CAPS["whole"]:
        return CAPS["whole"][key]
    for kind, test in (("ending", key.endswith), ("beginning", key.startswith)):
        for part, cap in CAPS[kind].items():
            if test(part):
                return cap
    return None


def sizes(stem: str, full: dict) -> dict:
    """Chapter ``stem``'s full-profile sizes ``full`` at toy scale: integers capped by :data:`CAPS`, then
    :data:`OVERRIDES`."""
    out = {}
    for key, value in full.items():
        cap = _cap(key) if isinstance(value, int) and not isinstance(value, bool) else None
        out[key] = value if cap is None else min(value, cap)
    out.update(OVERRIDES.get(stem, {}))
    return out


def config(full):
    """A full-profile :class:`flatnb.config.train_config.TrainConfig` at toy scale: the same architecture, width, loss,
    attack and optimizer; one epoch of at most :data:`IMAGES` images; warmup and lookahead inside it (an early-stopped recipe stops
    after that epoch)."""
    return dataclasses.replace(full, epochs=1, n_train=min(full.n_train or IMAGES, IMAGES),
                               batch_size=min(full.batch_size, 64), warmup_epochs=min(full.warmup_epochs, 0.25),
                               ema_start_epochs=min(full.ema_start_epochs, 0.5),
                               stop_epochs=min(full.stop_epochs, 1), profile="smoke")
