"""Speed of the zoo's recipes as ratios measured in one run: training images/s and achieved FLOP/s against
this CPU's measured matrix-multiply peak, and PGD-10 images/s against torchattacks on the same model.

    python benchmarks/zoo.py                      # every evidence recipe, one thread (as the zoo trains)
    python benchmarks/zoo.py --threads 2 --steps 4 --recipes fastnet:cifar10:standard:full fastnet:cifar10:pgd_at:full
    python benchmarks/zoo.py --recipes vgg11_bn:cifar10:standard:full --no-pgd   # one slice (about a minute)

FLOPs per training step are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one real step of the
recipe's loss (the attack steps of adversarial training included) and its backward pass; the peak is a
torch GEMM (n = 2048) in the same process, in bf16 and in fp32, so the ratio does not depend on the machine.

Rates are per second of this process's CPU time (user + system, all its threads) divided by ``--threads``,
GEMM peak and training alike: on a CPU shared with other jobs (the zoo trains beside a second process) the wall
clock measures the share the scheduler gave this process, not the recipe; the wall-clock images/s are printed
beside. ``--recipes`` takes any entries of the recipe table as ``arch:dataset:recipe:profile``, so the
benchmark runs in slices (``--no-pgd`` leaves out the PGD comparison).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from flatnb import attacks
from flatnb import data as fdata
from flatnb.training import train as T
from flatnb.models import describe
from flatnb.runtime import describe_device, resolve_device
from flatnb.zoo import catalogue

_spec = importlib.util.spec_from_file_location("bench_train", Path(__file__).with_name("train.py"))
bench_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_train)


def gemm_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5, threads: int = 1) -> float:
    """GFLOP/s per thread of a square matrix multiply in ``dtype`` (the best of three timings, in process CPU
    time divided by ``threads``; see the module docstring)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(3):
        t = time.process_time()
        for _ in range(reps):
            a @ b
        best = min(best, (time.process_time() - t) / threads)
    return 2 * n**3 * reps / best / 1e9


def _one_step(cfg: T.TrainConfig, device, batch: int, counter):
    """One real training step of ``cfg`` (loss with its attack steps, and the backward pass) on ``batch`` random
    images inside ``counter`` (a FLOP-counting mode); returns the counter."""
    model = T.build_model(cfg).to(device).train()
    x = torch.rand(batch, 3, cfg.image_size, cfg.image_size, device=device)
    y = torch.randint(0, cfg.n_classes, (batch,), device=device)
    g = torch.Generator().manual_seed(0)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(T.select_precision(device, cfg)["autocast"])

    def autocast():
        return torch.autocast(device.type, dtype=amp, enabled=amp is not None)

    with counter:
        loss, _ = T._loss(model, x, y, cfg, g, autocast)
        loss.backward()
    return counter


def image_flops(cfg: T.TrainConfig, device, batch: int = 32) -> float:
    """FLOPs per image of one training step of ``cfg`` (loss with its attack steps, and the backward pass),
    counted on a step of ``batch`` images (the count is linear in the batch)."""
    return float(_one_step(cfg, device, batch, TotalFlops()).total) / batch


class TotalFlops(TorchDispatchMode):
    """The total of torch's FLOP formulas (``torch.utils.flop_counter.flop_registry``) over every aten op run
    inside; an op without a formula is decomposed first, as ``FlopCounterMode`` does. ``FlopCounterMode`` itself
    cannot count adversarial training: its per-module tracker hooks every backward pass, and the attack's
    ``torch.autograd.grad`` on the input refuses them ("A leaf node was passed to _will_engine_execute_node");
    this mode keeps no per-module table, only the total. tests/test_bench_flops.py checks it against a matmul's
    2mnk and against ``FlopCounterMode`` on standard training, where both run."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in flop_registry and func._overloadpacket not in flop_registry:
            with self:
                r = func.decompose(*args, **kwargs)
                if r is not NotImplemented:
                    return r
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.total += count(*args, **kwargs, out_val=out)
        return out


def flop_counter_flops(cfg: T.TrainConfig, device, batch: int = 32) -> float:
    """The same count as :func:`image_flops` by ``FlopCounterMode`` (standard training only: see TotalFlops)."""
    return float(_one_step(cfg, device, batch, FlopCounterMode(display=False)).get_total_flops()) / batch


def pgd_rates(device, n: int, repeats: int) -> dict:
    """PGD-ℓ∞ 8/255, 10 steps of 2/255: flatnb against torchattacks on the shipped FastNet-64 (or the quick
    main model when nothing is shipped), images/s (median of ``repeats``)."""
    import torchattacks

    from flatnb import zoo

    try:
        model, what = zoo.load("fastnet64-standard-s0", device), "shipped FastNet-64 (fastnet64-standard-s0)"
    except Exception:  # noqa: BLE001 - nothing shipped yet: the quick main model
        model, what = zoo.model("main", "cifar10", profile="quick", device=device), "quick FastNet-32"
    test = fdata.subset(fdata.load("cifar10", "test"), n=n, seed=0)
    x, y = test.images.float().div(255).to(device), test.labels.to(device)
    ta = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=10, random_start=False)
    runs = {"torchattacks PGD-10": lambda: ta(x, y),
            "flatnb attacks.pgd PGD-10": lambda: attacks.pgd(model, x, y, 8 / 255, 10, 2 / 255, warn=False)}
    times = {k: [] for k in runs}
    for fn in runs.values():
        fn()
    for _ in range(repeats):
        for k, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {"model": what, **{k: n / statistics.median(v) for k, v in times.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = sorted({f"{i.arch}:{i.dataset}:{i.recipe}:{i.profile}" for i in catalogue.EVIDENCE.values()})
    ap.add_argument("--recipes", nargs="+", default=default, help="arch:dataset:recipe:profile of the recipe table")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="timed training steps per recipe")
    ap.add_argument("--pgd-n", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-pgd", action="store_true", help="leave out the PGD-10 comparison with torchattacks")
    ap.add_argument("--batch", type=int, help="time steps of this many images instead of the recipe's batch "
                    "(a shorter slice; images/s per thread hardly depend on the batch above about 128)")
    args = ap.parse_args(argv)
    for spec in args.recipes:
        if len(spec.split(":")) != 4:
            ap.error(f"--recipes takes arch:dataset:recipe:profile (e.g. fastnet:cifar10:standard:full), got {spec!r}")
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    rows = [("device", describe_device(device)), ("threads", str(args.threads)),
            ("load average before", " ".join(f"{v:.2f}" for v in os.getloadavg()))]
    peak = {"bf16": gemm_peak(torch.bfloat16, threads=args.threads),
            "fp32": gemm_peak(torch.float32, threads=args.threads)}
    rows += [(f"GEMM peak {k} (n = 2048)", f"{v:.0f} GFLOP/s per thread (CPU time)") for k, v in peak.items()]
    print(*rows[-2:], sep="\n", flush=True)
    for spec in args.recipes:
        arch, dataset, recipe, profile = spec.split(":")
        cfg = T.config_for(arch, dataset, recipe, profile)
        if args.batch:
            cfg = dataclasses.replace(cfg, batch_size=args.batch)
        prec = "bf16" if T.select_precision(device, cfg)["autocast"] == "bf16" else "fp32"
        flops = image_flops(cfg, device)
        rates = bench_train.throughput_rates(cfg, device, None, args.steps, warmup=1)
        rate = rates["cpu"] * args.threads  # images per second of `threads` threads of their own
        achieved = flops * rate / args.threads / 1e9
        epoch_min = len(T.training_data(cfg)) / rate / 60
        rows.append((f"{spec} ({describe(cfg)}, batch {cfg.batch_size}, {prec})",
                     f"{rate:.0f} images/s ({rates['wall']:.0f} by the wall clock), {epoch_min:.1f} min per epoch, "
                     f"{flops / 1e9:.3f} GFLOP per image and step, {achieved:.0f} GFLOP/s per "
                     f"thread = {achieved / peak[prec]:.2f} of the {prec} GEMM peak"))
        print(*rows[-1], flush=True)
    if not args.no_pgd:
        pgd = pgd_rates(device, args.pgd_n, args.repeats)
        ta, ours = pgd["torchattacks PGD-10"], pgd["flatnb attacks.pgd PGD-10"]
        rows.append((f"PGD-10 on the {pgd['model']}, {args.pgd_n} images", f"torchattacks {ta:.1f} images/s, "
                     f"flatnb {ours:.1f} images/s (wall clock): flatnb / torchattacks = {ours / ta:.2f}"))
    rows.append(("load average after", " ".join(f"{v:.2f}" for v in os.getloadavg())))
    w = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
