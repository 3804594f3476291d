"""The old and the new quick main model side by side: training images/s and test accuracy.

    python benchmarks/train.py                       # images/s of both recipes (a few timed steps each)
    python benchmarks/train.py --full-run            # also train both end to end: accuracy after each epoch
    python benchmarks/train.py --recipes main:pgd_at --full-run   # any table entries, "arch:recipe"
    python benchmarks/train.py --profile full --device cuda --steps 30 --compare-compile
                                                     # on a GPU: each recipe eager and through torch.compile

Both run on the same device with the same thread count, one after the other. The rows name the
load average before and after: on a shared CPU another busy process slows both, and the process
CPU time (user + system) is printed beside the wall time so the two can be told apart.
Absolute numbers only mean something on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time

import torch

from flatnb import data as fdata
from flatnb.training import train as T
from flatnb.runtime import describe_device, resolve_device

OLD, NEW = "resnet18:standard", "main:standard"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def throughput(cfg: T.TrainConfig, device, root, steps: int, compile: bool = False) -> float:
    """Training images/s (wall clock) of ``cfg`` over ``steps`` steps of the real loop (the first two steps
    excluded: the first compiles with ``compile=True``, the second may recompile)."""
    return throughput_rates(cfg, device, root, steps, compile)["wall"]


def throughput_rates(cfg: T.TrainConfig, device, root, steps: int, compile: bool = False, warmup: int = 2,
                     train_ds: fdata.Dataset | None = None) -> dict:
    """Training images per second of wall clock (``wall``) and per second of this process's CPU time (``cpu``,
    user + system of all its threads) over ``steps`` steps of the real loop, after ``warmup`` untimed steps.
    On a CPU shared with other jobs the wall rate falls with the share this process gets; the CPU-time rate
    (divided by the thread count) is what one thread of its own would do. ``train_ds``: where the batches come
    from (default: the recipe's training data)."""
    ds = fdata.subset(train_ds if train_ds is not None else T.training_data(cfg, root),
                      n=(steps + warmup) * cfg.batch_size, seed=0)
    bench = dataclasses.replace(cfg, epochs=1, n_train=None, warmup_epochs=0, ema_start_epochs=0)
    times, orig = [], T._loss

    def timed_loss(*a, **k):
        _sync(device)
        times.append((time.perf_counter(), time.process_time()))
        return orig(*a, **k)

    T._loss = timed_loss
    try:
        T.train(bench, device, train_ds=ds, use_cache=False, progress=False, compile=compile)
    finally:
        T._loss = orig
    _sync(device)
    times.append((time.perf_counter(), time.process_time()))
    n = (len(times) - 1 - warmup) * cfg.batch_size
    return {"wall": n / (times[-1][0] - times[warmup][0]), "cpu": n / (times[-1][1] - times[warmup][1])}


def full_run(cfg: T.TrainConfig, device, root, n_eval: int) -> list[tuple[str, str]]:
    """Train ``cfg`` without the cache; test accuracy (``n_eval`` seeded test images) after each epoch."""
    test = T.test_data(cfg, root)
    sub = test if n_eval >= len(test) else fdata.subset(test, n=n_eval, seed=0)
    rows, cum = [], [0.0, 0.0]
    cpu0 = time.process_time()

    def cb(epoch, m):
        cum[0] += m["train_s"]
        rows.append((f"  epoch {epoch + 1}/{cfg.epochs}", f"train {cum[0]:.0f} s wall (cumulative), "
                     f"test acc {m['test_acc']:.4f} ({len(sub)} images), train loss {m['loss']:.3f}"))
        print(*rows[-1], flush=True)

    t = time.perf_counter()
    model = T.train(cfg, device, root=root, use_cache=False, progress=False, callback=cb, eval_ds=sub)
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu0
    r = T.evaluate(model, test, device)
    rows += [("  training wall time (s, sum of epochs)", f"{cum[0]:.1f}"),
             ("  wall incl. per-epoch evaluation (s)", f"{wall:.1f}"),
             ("  process CPU time incl. evaluation (s)", f"{cpu:.1f}"),
             ("  final test accuracy (all test images, no TTA)", f"{r['accuracy']:.4f}"),
             ("  mean confidence", f"{r['mean_confidence']:.4f}"),
             ("  precision", str(model.train_info["precision"]))]
    if cfg.recipe != "standard":
        rob = T.robust_accuracy(model, fdata.subset(test, n=1000, seed=0), device)
        rows.append(("  PGD-10 8/255 robust accuracy (1000 images)", f"{rob:.4f}"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=[OLD, NEW], help="table entries arch:recipe (cifar10)")
    ap.add_argument("--profile", default="quick", choices=["quick", "full"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=5, help="timed training steps per recipe")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--root", default=None, help="data root (default: FLATNB_DATA)")
    ap.add_argument("--full-run", action="store_true", help="also train each recipe end to end")
    ap.add_argument("--compare-compile", action="store_true",
                    help="also time each recipe through torch.compile (same loop, same device)")
    ap.add_argument("--n-eval", type=int, default=10_000, help="test images evaluated after each epoch")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    rows = [("device", describe_device(device)), ("load average before", " ".join(f"{v:.2f}" for v in os.getloadavg()))]
    for spec in args.recipes:
        arch, recipe = spec.split(":")
        cfg = T.config_for(arch, "cifar10", recipe, args.profile)
        rows.append((f"{spec} → {cfg.arch} {cfg.recipe} {cfg.profile}",
                     f"{cfg.epochs} epochs, batch {cfg.batch_size}, width {cfg.width}, "
                     f"n_train {cfg.n_train or 'all'}, precision {T.select_precision(device, cfg)['autocast'] or 'fp32'}"))
        rows.append(("  train images/s", f"{throughput(cfg, device, args.root, args.steps):.0f}"))
        print(*rows[-1], flush=True)
        if args.compare_compile:
            try:
                rate = f"{throughput(cfg, device, args.root, args.steps, compile=True):.0f}"
            except Exception as err:  # noqa: BLE001 - a compiler missing on this machine is a result too
                rate = f"failed: {type(err).__name__}: {str(err)[:200]}"
            rows.append(("  train images/s, torch.compile", rate))
            print(*rows[-1], flush=True)
        if args.full_run:
            rows += full_run(cfg, device, args.root, args.n_eval)
    rows.append(("load average after", " ".join(f"{v:.2f}" for v in os.getloadavg())))
    w = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"{k:<{w}}  {v}")


if __name__ == "__main__":
    main()
