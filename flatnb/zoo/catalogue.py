"""Which models the book ships: each a recipe of :data:`flatnb.recipes.TABLE` (or, for the paper's
architecture, the ResNet-18 that ships inside ``pyautoattack``), with what ``python -m flatnb.zoo train``
measures on it. Every number about these models lives in the recipe table or here."""
from __future__ import annotations

from typing import NamedTuple

from flatnb.config import budgets, recipes


class Item(NamedTuple):
    """One shipped model: a recipe of the table in a profile with a seed, and its AutoAttack sample size
    (the reference's standard version, in each norm of ``aa_norms``: ℓ∞ 8/255, ℓ2 0.5; 0 = not measured at
    training time). Robustness claims (the adversarially trained models) get n = 1,000; a standard model, which
    AutoAttack breaks at its first attack, gets 200 (its Wilson interval at 0 % robust is [0, 1.9 %]) to save an
    hour of CPU; the atlas's models get 500 in both norms (issue 26). ``snapshots``: epochs after which the
    run also writes its early-stopped checkpoints (``flatnb.training.train.train(snapshots=...)``)."""

    arch: str
    dataset: str
    recipe: str
    profile: str
    seed: int = 0
    aa_n: int = 0
    aa_norms: tuple = ("linf",)
    snapshots: tuple = ()


#: the evidence models of the paper-grade (`full`) profile, in training order (a shard takes every n-th)
EVIDENCE = {
    "fastnet64-standard-s0": Item("fastnet", "cifar10", "standard", "full", 0, aa_n=200),
    "fastnet32-pgd_at-s0": Item("fastnet", "cifar10", "pgd_at", "full", 0, aa_n=1000),
    "fastnet32-trades-s0": Item("fastnet", "cifar10", "trades", "full", 0, aa_n=1000),
    "fastnet64-standard-s1": Item("fastnet", "cifar10", "standard", "full", 1),
    "fastnet64-standard-s2": Item("fastnet", "cifar10", "standard", "full", 2),
    # the other architectures of chapters 8 and 10 (recipes.TABLE's full entries, CPU recipes of issues 24 and 25):
    # clean accuracy only (targets: >= 88 % for the CNNs: WRN-16-4, VGG-11-BN, DenseNet-121 at k = 12; >= 70 % for
    # the ViT, >= 40 % top-1 on Tiny ImageNet)
    "vgg11bn-standard-s0": Item("vgg11_bn", "cifar10", "standard", "full", 0),
    "wrn16_4-standard-s0": Item("wrn28_4", "cifar10", "standard", "full", 0),
    "densenet121_k12-standard-s0": Item("densenet121", "cifar10", "standard", "full", 0),
    "vit-standard-s0": Item("vit_tiny", "cifar10", "standard", "full", 0),
    "resnet18-tinyimagenet-standard-s0": Item("resnet18", "tinyimagenet", "standard", "full", 0),
    "vit-tinyimagenet-standard-s0": Item("vit_tiny", "tinyimagenet", "standard", "full", 0),
}

#: the models the quick profile's chapters use (budgets.CHAPTER_MODELS), shipped so that CI and readers
#: load them instead of training
QUICK = {}
for _m in budgets.CHAPTER_MODELS:
    _arch, _dataset, _recipe, *_seed = _m
    _arch, _seed = recipes.resolve_arch(_arch, "quick"), (_seed[0] if _seed else 0)
    QUICK[f"quick-{_arch}-{_dataset}-{_recipe}-s{_seed}"] = Item(_arch, _dataset, _recipe, "quick", _seed)

#: the paper's architecture, trained by others: the reference AutoAttack's example model (kuangliu's
#: ResNet-18 layout, 512-d penultimate layer, inputs in [0, 1] without normalisation), inside pyautoattack 0.2.0.
#: Its training recipe is not published; its SHA-256 is pinned here.
EXTERNAL = {
    "resnet18-pyautoattack": {
        "sha256": "399f52da9f914c323fa5a6096d60f460a3449a59b64a6405200c1e629f8425a7",
        "external": {"package": "pyautoattack", "requirement": "pyautoattack==0.2.0",
                     "file": "examples/model_test.pt", "module": "examples/resnet.py", "factory": "ResNet18",
                     "head": "linear", "arch": "resnet18 (kuangliu layout, pyautoattack's example model)"},
        "provenance": "the ResNet-18 shipped inside pyautoattack 0.2.0 (examples/model_test.pt): the reference "
                      "AutoAttack's example CIFAR-10 model; trained by its authors with an unpublished recipe",
        "aa_n": 200,
    },
}

#: the atlas of chapter 13 at referee scale (budgets.ZOO["full"], label -> recipe; issue 26): 24 models, each
#: measured by AutoAttack (standard) on 500 test images in ℓ∞ 8/255 and ℓ2 0.5 when shipped (cached in chunks,
#: resumable), so that the chapter reads both from the manifest. Models the evidence group or the externals
#: already ship (PGD-AT ε = 8/255, TRADES β = 6, FastNet-64 seed 0, the pyautoattack ResNet-18) keep their names
#: and are not trained again: `train --group atlas` only adds the measurements they lack.
#: The early-stopped models are snapshots of "atlas-fastnet32-standard-s0", written while it trains (it
#: comes first in this list; on another shard before it finishes, an early-stopped model trains its k epochs of
#: the same schedule itself: the same weights on the CPU, at the cost of k epochs).
#:
#: Training time on one CPU thread, MEASURED (the manifest's "training" minutes; beside one or two other processes):
#:   standard-type FastNet-32, 12 epochs: 13.6-18.5 min (3 seeds, label smoothing, mixup, weight decay ×1/4);
#:   the 18-epoch variants (weight decay ×4, LogitNorm τ = 0.04 and 0.2): 22.6-29.4 min; SAM: 30-36 min; PGD-2 AT:
#:   35-52 min; TRADES β = 1: 71 min; early-stopped checkpoints: 0 (snapshots of the seed-0 run).
#: AutoAttack, 500 images per norm, MEASURED: a standard-type model falls at APGD-CE, 1.1-2.8 min per norm; an
#: adversarially trained FastNet-32 runs all four attacks on its robust points: ℓ∞ 15-22 min, ℓ2 32-39 min.
ATLAS = {}
for _label, _spec in budgets.ZOO["full"].items():
    if isinstance(_spec, str):  # an external model
        ATLAS[_spec] = {**EXTERNAL[_spec], "aa_n": 500, "aa_norms": ("linf", "l2")}
        continue
    _arch, _dataset, _recipe, _seed = _spec
    _shipped = next((n for n, it in EVIDENCE.items() if (it.arch, it.dataset, it.recipe, it.seed) ==
                     (_arch, _dataset, _recipe, _seed)), None)
    _width = recipes.lookup(_arch, _dataset, _recipe, "full", _seed).width
    ATLAS[_shipped or f"atlas-{_arch}{_width}-{_recipe.removeprefix('atlas_')}-s{_seed}"] = Item(
        _arch, _dataset, _recipe, "full", _seed, aa_n=500, aa_norms=("linf", "l2"),
        snapshots=recipes._EARLY if (_recipe, _seed) == ("atlas_standard", 0) else ())

GROUPS = {"evidence": EVIDENCE, "quick": QUICK, "external": EXTERNAL, "atlas": ATLAS}


def names(group: str = "all") -> list[str]:
    """Catalogue names in training order: external first (nothing to train), then evidence, then the atlas, then
    quick (a name in two groups is listed once, at its first)."""
    if group == "all":
        return list(dict.fromkeys([*EXTERNAL, *EVIDENCE, *ATLAS, *QUICK]))
    if group not in GROUPS:
        raise ValueError(f"group must be one of {['all', *GROUPS]}, got {group!r}")
    return list(GROUPS[group])


def item(name: str, group: str = "all"):
    """The catalogue entry ``name``: as ``group`` lists it (a model in two groups, e.g. the ε = 8/255 PGD-AT
    model in "evidence" and "atlas", has one entry per group: the atlas's asks for more measurements), else
    its first group's."""
    if group != "all" and name in GROUPS.get(group, {}):
        return GROUPS[group][name]
    for g in GROUPS.values():
        if name in g:
            return g[name]
    raise ValueError(f"no model {name!r} in the zoo's catalogue; choose from {names()}")
