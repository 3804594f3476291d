"""Training and evaluation throughput (images/s) on the current device, and data load times.

    python benchmarks/train.py --arch resnet18 --dataset cifar10 --profile quick --device cpu
    python benchmarks/train.py --full-run     # train the profile's config end to end, print time and test accuracy

Absolute numbers only mean something on a GPU; on a shared CPU they are indicative.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from flatnb import data as fdata
from flatnb import train as T
from flatnb.runtime import describe_device, resolve_device


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--recipe", default="standard")
    ap.add_argument("--profile", default="quick", choices=["quick", "full"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=10, help="timed training steps")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--root", default=None, help="data root (default: FLATNB_DATA)")
    ap.add_argument("--full-run", action="store_true", help="also train the whole config (no cache) and evaluate")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cfg = T.config_for(args.arch, args.dataset, args.recipe, args.profile)
    rows = [("device", describe_device(device)), ("config", f"{cfg.arch} {cfg.dataset} {cfg.recipe} {cfg.profile}")]

    t = time.perf_counter()
    fdata.load(cfg.dataset, "train", root=args.root)
    rows.append(("first train load (s, decodes unless cached)", f"{time.perf_counter() - t:.2f}"))
    t = time.perf_counter()
    fdata.load(cfg.dataset, "train", root=args.root)
    rows.append(("second train load (s)", f"{time.perf_counter() - t:.3f}"))
    t = time.perf_counter()
    test = T.test_data(cfg, args.root)
    rows.append(("test load (s)", f"{time.perf_counter() - t:.2f}"))

    # training throughput: a few steps of the real loop (warm-up step excluded)
    ds = fdata.subset(T.training_data(cfg, args.root), n=(args.steps + 1) * cfg.batch_size, seed=0)
    bench_cfg = dataclasses.replace(cfg, epochs=1, n_train=None, warmup_epochs=0)
    times = []

    def timer(epoch, metrics):
        pass

    orig = T._loss

    def timed_loss(*a, **k):
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())
        return orig(*a, **k)

    T._loss = timed_loss
    try:
        T.train(bench_cfg, device, train_ds=ds, use_cache=False, progress=False, callback=timer)
    finally:
        T._loss = orig
    if device.type == "cuda":
        torch.cuda.synchronize()
    times.append(time.perf_counter())
    steps = len(times) - 2
    rows.append(("train images/s", f"{steps * cfg.batch_size / (times[-1] - times[1]):.0f}"))

    model = T.build_model(cfg).to(device).eval()
    ev = fdata.subset(test, n=min(len(test), 2000), seed=0)
    T.evaluate(model, fdata.subset(ev, n=min(len(ev), 250)), device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    T.evaluate(model, ev, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    rows.append(("eval images/s", f"{len(ev) / (time.perf_counter() - t):.0f}"))

    if args.full_run:
        t = time.perf_counter()
        model = T.train(cfg, device, root=args.root, use_cache=False, progress=True)
        wall = time.perf_counter() - t
        r = T.evaluate(model, test, device)
        rows += [("full run: train wall time (s)", f"{wall:.1f}"), ("full run: test accuracy", f"{r['accuracy']:.4f}"),
                 ("full run: mean confidence", f"{r['mean_confidence']:.4f}")]
        if cfg.recipe != "standard":
            sub = fdata.subset(test, n=500, seed=0)
            rows.append(("full run: PGD-10 8/255 robust acc (500 pts)", f"{T.robust_accuracy(model, sub, device):.4f}"))

    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")


if __name__ == "__main__":
    main()
