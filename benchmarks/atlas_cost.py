"""CPU cost of chapter 13's per-model measurement (``flatnb.measure.atlas.measure``), part by part, and the flip
radius with and without the cross-entropy run: the numbers behind chapter 13's full sizes in
``flatnb/config/budgets.py``.

    python benchmarks/atlas_cost.py cost fastnet32-pgd_at-s0 fastnet64-standard-s0            # at the full sizes
    python benchmarks/atlas_cost.py cost fastnet32-pgd_at-s0 --sizes '{"n_radius": 50, "n_rflat": 25}'   # a slice
    python benchmarks/atlas_cost.py radius fastnet32-pgd_at-s0 fastnet64-standard-s0           # CE+margin vs margin

``cost`` profiles one ``atlas.measure`` per shipped model with ``cProfile`` on process CPU time (one thread; on a
shared CPU the wall clock measures the scheduler, not the code) and prints the time of its parts; AutoAttack is
left out (the full profile reads it from the manifest). ``radius`` runs the flip-radius bisection at the full
sizes' settings on the first 60 (``--n``) correctly classified test images, once with the cross-entropy and the margin
runs and once with the margin run alone, and prints both medians, how often the margin-only bound is looser or
tighter by more than 2 %, and the CPU time of each. Needs CIFAR-10 (``FLATNB_DATA``) and the shipped weights.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time
import types

import torch

from flatnb import data as fdata
from flatnb import zoo
from flatnb.config import budgets
from flatnb.measure import atlas, radius

PARTS = ("_flatness", "model_logits", "flip_radius", "directional_curvature", "robust_flatness")


def cost(names: list[str], overrides: dict) -> None:
    sizes = types.SimpleNamespace(**{**budgets.sizes("13_atlas", "full"), **overrides})
    train, test = fdata.load("cifar10", "train"), fdata.load("cifar10", "test")
    pr = atlas.probe(train, test, sizes.n_kappa, sizes.n_test, sizes.n_cal, seed=0)
    for name in names:
        model = zoo.load(name, torch.device("cpu")).eval()
        prof = cProfile.Profile(time.process_time)
        t0 = time.process_time()
        prof.enable()
        e = atlas.measure(model, pr, sizes, torch.device("cpu"), seed=0, robust={"linf": None, "l2": None})
        prof.disable()
        print(f"{name}: {time.process_time() - t0:.1f} s CPU (sizes: full{' + ' + json.dumps(overrides) if overrides else ''}); "
              f"median flip radius {e['radius'][0]:.3f}", flush=True)
        stats = pstats.Stats(prof).stats
        for part in PARTS:  # cumulative time of every function of that name
            print(f"   {part:24s} {sum(v[3] for k, v in stats.items() if k[2] == part):7.1f} s CPU", flush=True)


def compare_radius(names: list[str], n: int = 60) -> None:
    s = budgets.sizes("13_atlas", "full")
    test = fdata.load("cifar10", "test")
    for name in names:
        model = zoo.load(name, torch.device("cpu")).eval()
        x, y = test.images[: 2 * n].float().div(255), test.labels[: 2 * n]
        with torch.no_grad():
            ok = model(x).argmax(1) == y
        x, y = x[ok][:n], y[ok][:n]
        out = {}
        for ce in (True, False):
            t0 = time.process_time()
            r = radius.flip_radius(model, x, y, torch.zeros(len(y)), torch.full((len(y),), 0.1), n_iter=s["radius_iter"],
                                   max_radius=20.0, steps=s["radius_steps"], restarts=s["radius_restarts"],
                                   generator=torch.Generator().manual_seed(0), autocast_dtype=torch.bfloat16,
                                   ce_attack=ce)
            out[ce] = (r.hi, time.process_time() - t0)
        ratio = out[False][0] / out[True][0]
        print(f"{name} ({len(y)} inputs): median radius, CE + margin {out[True][0].median():.4f} ({out[True][1]:.0f} s CPU), "
              f"margin alone {out[False][0].median():.4f} ({out[False][1]:.0f} s CPU); ratio median {ratio.median():.4f}, "
              f"> 1.02: {(ratio > 1.02).float().mean():.2f}, < 0.98: {(ratio < 0.98).float().mean():.2f}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("cost", "radius"))
    p.add_argument("models", nargs="+", help="shipped model names (python -m flatnb.zoo list)")
    p.add_argument("--sizes", default="{}", help="JSON overrides of chapter 13's full sizes (cost only)")
    p.add_argument("--n", type=int, default=60, help="correctly classified test images (radius only)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.what == "cost":
        cost(args.models, json.loads(args.sizes))
    else:
        compare_radius(args.models, args.n)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
