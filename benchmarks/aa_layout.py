"""The reference AutoAttack on a shipped model in the default (NCHW) and the channels-last memory layout, side by
side: CPU time of each and whether the per-image outcomes agree. The zoo command (``flatnb/zoo/cli.py``) runs
its AutoAttack measurements channels-last on this evidence.

    python benchmarks/aa_layout.py fastnet32-pgd_at-s0 --n 50 --norm linf

Both runs see the same float32 weights, the same seeded test images and the same attack seed; only the order of
the convolutions' sums differs, so an image may in principle change outcome where the attack is on a knife's
edge. Process CPU time on one thread (on a shared CPU the wall clock measures the scheduler). Needs CIFAR-10
(``FLATNB_DATA``) and the shipped weights.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from flatnb import attacks
from flatnb import data as fdata
from flatnb import zoo
from flatnb.zoo import robust


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name", help="a shipped model, e.g. fastnet32-pgd_at-s0")
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--norm", default="linf", choices=sorted(robust.EPS))
    args = p.parse_args()
    torch.set_num_threads(1)
    model = zoo.load(args.name, torch.device("cpu")).eval()
    test = fdata.subset(fdata.load("cifar10", "test"), n=args.n, seed=0)
    x, y = test.images.float().div(255), test.labels
    out = {}
    for layout, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
        m = copy.deepcopy(model).to(memory_format=fmt)
        t0 = time.process_time()
        res = attacks.autoattack(m, x, y, eps=robust.EPS[args.norm], norm=args.norm, version="standard")
        out[layout] = (time.process_time() - t0, (res.clean_correct & ~res.success).cpu())
        print(f"{layout:14s} {out[layout][0]:7.1f} s CPU, robust {int(out[layout][1].sum())}/{args.n}", flush=True)
    (t_a, r_a), (t_b, r_b) = out["contiguous"], out["channels_last"]
    print(f"ratio contiguous/channels_last CPU time: {t_a / t_b:.2f}; per-image outcomes differ on "
          f"{int((r_a != r_b).sum())} of {args.n}")


if __name__ == "__main__":
    main()
