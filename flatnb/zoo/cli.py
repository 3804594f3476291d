"""``python -m flatnb.zoo``: train, measure, ship and check the book's models on any machine.

    python -m flatnb.zoo list                         what the catalogue holds and what is shipped
    python -m flatnb.zoo train [--group G] [--only NAME ...] [--shard i/n]
                                                      train (resuming), measure and ship, one model at a time
    python -m flatnb.zoo measure --only NAME ... [--n 1000] [--norm linf|l2]
                                                      AutoAttack on shipped models into the manifest (resumable)
    python -m flatnb.zoo verify [--n 1000]            SHA-256 and clean accuracy of every shipped model

``train`` skips a model whose exact configuration is already shipped (``--force`` measures it again) but adds
the AutoAttack measurements its catalogue group asks for and its manifest entry lacks (``--group atlas``: ℓ∞
and ℓ2 on 500 images),
resumes an interrupted model from its checkpoint, prints a line per epoch with an estimate of the time
left, and with ``--shard i/n`` takes every n-th model of the list from the i-th (0-based), so any job
runner (a Slurm array, a second laptop) can share the work. Two shards on one machine: one torch thread
each (``--threads 1``, the default), ``OMP_WAIT_POLICY=PASSIVE``.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import tempfile
import time

import torch

from flatnb import data as fdata
from flatnb.training import train as ftrain
from flatnb.runtime import describe_device
from flatnb.stats import wilson
from flatnb.zoo import catalogue, robust
from flatnb.zoo import manifest as mf


def _clean(model, config_or_dataset, device, n: int | None = None) -> dict:
    dataset = config_or_dataset if isinstance(config_or_dataset, str) else None
    test = fdata.load(dataset, "test") if dataset else ftrain.test_data(config_or_dataset)
    len_full = len(test)
    if n is not None and n < len(test):
        test = fdata.subset(test, n=n, seed=0)
    ev = ftrain.evaluate(model, test, device)
    k = round(ev["accuracy"] * ev["n"])
    lo, hi = wilson(k, ev["n"])
    return {"value": ev["accuracy"], "n": ev["n"], "ci95": [lo, hi], "mean_confidence": ev["mean_confidence"],
            "images": f"a seeded subset of {ev['n']} (seed 0)" if n is not None and n < len_full else
            "all test images"}


#: the test images a verification measures (a seeded subset): the manifest records the accuracy on exactly these,
#: so that a check compares like with like (a 1,000-image subset differs from the whole test set by about
#: 1.6 points of sampling error, more than any tolerance worth checking)
CHECK_N = 1000


def _clean_with_check(model, config_or_dataset, device) -> dict:
    """Clean accuracy on every test image, with ``check``: the accuracy on the :data:`CHECK_N` seeded test images
    that :func:`verify` measures again."""
    out = _clean(model, config_or_dataset, device)
    out["check"] = {k: v for k, v in _clean(model, config_or_dataset, device, n=CHECK_N).items()
                    if k in ("value", "n", "images")}
    return out


def _aa(model, dataset: str, n: int, device, norm: str) -> dict:
    """:func:`robust.autoattack` on a copy of ``model`` laid out channels-last (``model`` itself is left as it
    is): the same float32 weights and the same reference attack, about 1.4 times faster on a CPU
    (``benchmarks/aa_layout.py`` measures the ratio and that the per-image outcomes agree). The cache key (the
    weights' SHA-256) does not depend on the layout."""
    rob = robust.autoattack(copy.deepcopy(model).to(memory_format=torch.channels_last), dataset, n, device,
                            norm=norm)
    rob["layout"] = "channels_last, float32"
    return rob


def _shard(names: list[str], shard: str | None) -> list[str]:
    if shard is None:
        return names
    try:
        i, n = (int(v) for v in shard.split("/"))
        assert 0 <= i < n
    except (ValueError, AssertionError):
        raise SystemExit(f"--shard must be i/n with 0 <= i < n (e.g. 0/2), got {shard!r}") from None
    return names[i::n]


def _aa_wanted(item) -> tuple[int, tuple]:
    """(images, norms) of the AutoAttack measurements a catalogue item asks for."""
    if isinstance(item, dict):
        return item.get("aa_n", 0), tuple(item.get("aa_norms", ("linf",)))
    return item.aa_n, tuple(item.aa_norms)


def _ensure_robust(name: str, item, args, device, root) -> None:
    """Add to the shipped model's manifest entry the AutoAttack measurements its catalogue item asks for and the
    entry lacks (resumable; nothing to do when each norm is measured on at least as many images)."""
    n, norms = _aa_wanted(item)
    if not (n and args.aa):
        return
    entry = mf.read_manifest(root)["models"][name]
    for norm in norms:
        if robust.measured(entry, n, norm) is None:
            rob = measure(name, n, root, device, norm=norm)
            print(f"[{name}] AutoAttack {norm} {100 * rob['value']:.1f} % on {n} (added to the manifest)", flush=True)


def _train_one(name: str, args, device, root) -> None:
    item = catalogue.item(name, args.group)
    aa_n, aa_norms = _aa_wanted(item)
    if isinstance(item, dict):  # external: nothing to train, measure and record
        have = mf.read_manifest(root)["models"].get(name)
        if have is not None and not args.force:
            print(f"[{name}] shipped already (external)")
            _ensure_robust(name, item, args, device, root)
            return
        entry = {k: v for k, v in item.items() if k not in ("aa_n", "aa_norms")}
        entry["robust"] = []
        with tempfile.TemporaryDirectory() as staging:  # the manifest lists a model only once it is measured
            mf.write_entry(name, entry, staging)
            model = mf.load_external(name, device, staging)  # checks the pinned SHA-256
        entry["clean"] = _clean_with_check(model, "cifar10", device)
        print(f"[{name}] clean {100 * entry['clean']['value']:.2f} % on {entry['clean']['n']:,}", flush=True)
        if aa_n and args.aa:
            entry["robust"] = [_aa(model, "cifar10", aa_n, device, nm) for nm in aa_norms]
            for r in entry["robust"]:
                print(f"[{name}] AutoAttack {r['norm']} {100 * r['value']:.1f} % on {aa_n}", flush=True)
        entry["commit"] = mf._git_commit()
        mf.write_entry(name, entry, root)
        return
    config = ftrain.config_for(item.arch, item.dataset, item.recipe, item.profile, item.seed)
    train_ds = ftrain.training_data(config)
    hit = mf.find(config, train_ds.digest, root)
    if hit is not None and not args.force:
        print(f"[{name}] shipped already as {hit[1]['file']}")
        _ensure_robust(hit[0], item, args, device, root)
        return
    t0 = time.time()

    def eta(epoch: int, metrics: dict) -> None:
        done = epoch + 1
        if start[0] is None:  # epochs a checkpoint had before this run
            start[0] = epoch
        left = (time.time() - t0) / max(done - start[0], 1) * (config.last_epoch - done)
        print(f"[{name}] epoch {done}/{config.last_epoch} in {metrics['train_s'] / 60:.1f} min, about "
              f"{left / 60:.0f} min left", flush=True)

    start = [None]
    model = ftrain.train(config, device, train_ds=train_ds, callback=eta, progress=False,
                         snapshots=getattr(item, "snapshots", ()))
    history = getattr(model, "train_info", {}).get("history", [])
    minutes = sum(h.get("train_s", 0.0) for h in history) / 60
    # the shipped file is what readers load: measure the half-precision weights, not the float32 ones
    shipped = ftrain.build_model(config)
    shipped.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in
                             mf.half_state(model.state_dict()).items()})
    shipped = shipped.to(device).eval()
    clean = _clean_with_check(shipped, config, device)
    clean["value_fp32"] = _clean(model, config, device)["value"]
    measured = ([_aa(shipped, config.dataset, aa_n, device, nm) for nm in aa_norms]
                if aa_n and args.aa else [])
    training = {"device": describe_device(device), "threads": torch.get_num_threads(), "minutes": minutes,
                "history": history}
    entry = mf.export(model, config, train_ds.digest, name, root, clean=clean, training=training, robust=measured,
                      data_source=train_ds.source)
    rob = "".join(f", AutoAttack {r['norm']} {100 * r['value']:.1f} % (n = {r['n']})" for r in measured)
    print(f"[{name}] shipped {entry['file']}: clean {100 * clean['value']:.2f} % on {clean['n']:,}{rob}, "
          f"{minutes:.1f} min of training", flush=True)


def measure(name: str, n: int, root=None, device="cpu", norm: str = "linf") -> dict:
    """AutoAttack (standard; ``norm`` ℓ∞ 8/255 or ℓ2 0.5) on ``n`` test images of the shipped model ``name``
    (resumable in chunks), recorded in its manifest entry in place of an earlier measurement of the same attack,
    norm and radius."""
    model = mf.load(name, device, root)
    rob = _aa(model, "cifar10", n, device, norm)
    rob["commit"] = mf._git_commit()
    entry = mf.read_manifest(root)["models"][name]
    entry["robust"] = [r for r in entry.get("robust", []) if (r["attack"], r["norm"], r["eps"]) !=
                       (rob["attack"], rob["norm"], rob["eps"])] + [rob]
    mf.write_entry(name, entry, mf.weights_dir(root))
    return rob


def measure_flip(name: str, root=None, device="cpu") -> dict:
    """Clean accuracy of the shipped model ``name`` with horizontal-flip test-time augmentation
    (:func:`flatnb.models.tta.flip_average`, airbench94's evaluation) on every test image, recorded in its manifest
    entry as ``clean_flip``. The book's chapters use the network without it; this is the number to compare with
    results reported with flip averaging."""
    from flatnb.models.tta import flip_average  # only this command needs it

    model = mf.load(name, device, root)
    entry = mf.read_manifest(root)["models"][name]
    out = _clean(flip_average(model), mf.config_from(entry) if "config" in entry else "cifar10", device)
    out["evaluation"] = "flip test-time augmentation: the mean of the logits of an image and its mirror image"
    out["commit"] = mf._git_commit()
    entry = mf.read_manifest(root)["models"][name]
    entry["clean_flip"] = out
    mf.write_entry(name, entry, mf.weights_dir(root))
    return out


def verify(n: int = 1000, tolerance: float = 0.01, root=None, device="cpu", names=None) -> list[dict]:
    """Load every shipped model (SHA-256 checked) and measure its clean accuracy on ``n`` test images (a seeded
    subset): it must lie within ``tolerance`` of the manifest's accuracy on the same images (``clean.check``,
    recorded when the model was shipped). Returns one row per model; raises
    :class:`~flatnb.zoo.manifest.ManifestError` for the first failure."""
    rows = []
    for name, entry in mf.read_manifest(root)["models"].items():
        if names is not None and name not in names:
            continue
        model = mf.load(name, device, root)
        cfg = mf.config_from(entry) if "config" in entry else "cifar10"
        got = _clean(model, cfg, device, n=n)["value"]
        check = entry["clean"].get("check", {})
        if check.get("n") != n:
            raise mf.ManifestError(f"shipped model {name!r}: the manifest records no accuracy on {n} seeded test "
                                   f"images to compare with (it has {check.get('n')}). To fix: measure it again "
                                   f"(python -m flatnb.zoo train --only {name} --force) or verify with --n {check.get('n')}")
        want = check["value"]
        rows.append({"name": name, "manifest": want, "measured": got, "n": n})
        if not math.isfinite(got) or abs(got - want) > tolerance:
            raise mf.ManifestError(f"shipped model {name!r}: clean accuracy {100 * got:.1f} % on {n} test images, "
                                   f"the manifest says {100 * want:.1f} % (tolerance {100 * tolerance:.0f} points). "
                                   f"To fix: retrain it (python -m flatnb.zoo train --only {name} --force)")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m flatnb.zoo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    p_list = sub.add_parser("list", help="the catalogue and what is shipped")
    p_train = sub.add_parser("train", help="train, measure and ship (resumable)")
    p_train.add_argument("--group", default="all", choices=["all", *catalogue.GROUPS])
    p_train.add_argument("--only", nargs="*", help="catalogue names (default: the whole group)")
    p_train.add_argument("--shard", help="i/n: every n-th model from the i-th (0-based)")
    p_train.add_argument("--force", action="store_true", help="measure and ship again what is shipped")
    p_train.add_argument("--no-aa", dest="aa", action="store_false", help="skip the AutoAttack measurement")
    p_measure = sub.add_parser("measure", help="AutoAttack on shipped models (resumable), into the manifest")
    p_measure.add_argument("--only", nargs="+", required=True, help="shipped model names")
    p_measure.add_argument("--n", type=int, default=1000, help="test images (default 1,000)")
    p_measure.add_argument("--norm", default="linf", choices=sorted(robust.EPS), help="ℓ∞ 8/255 or ℓ2 0.5")
    p_measure.add_argument("--flip-tta", action="store_true",
                           help="instead of AutoAttack: clean accuracy with flip test-time augmentation (all test images)")
    p_verify = sub.add_parser("verify", help="SHA-256 and clean accuracy of every shipped model")
    p_verify.add_argument("--n", type=int, default=1000)
    p_verify.add_argument("--tolerance", type=float, default=0.01)
    for q in (p_list, p_train, p_measure, p_verify):
        q.add_argument("--weights", help="the weights folder (default: weights/ of this checkout)")
        q.add_argument("--threads", type=int, default=int(os.environ.get("FLATNB_THREADS", "1")))
        q.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = args.weights or mf.weights_dir() or os.path.join(os.getcwd(), "weights")
    if args.cmd == "list":
        shipped = mf.read_manifest(root)["models"]
        for name in catalogue.names():
            e = shipped.get(name)
            state = "not shipped" if e is None else (
                f"clean {100 * e['clean'].get('value', float('nan')):.2f} %"
                + (f" ({100 * e['clean_flip']['value']:.2f} % with flip TTA)" if "clean_flip" in e else "")
                + "".join(f", {r['attack'].split(' (')[0]} {r.get('norm', 'linf')} {100 * r['value']:.1f} % (n={r['n']})" for r in e["robust"]))
            print(f"{name:45s} {state}")
        return 0
    if args.cmd == "verify":
        for r in verify(args.n, args.tolerance, root, args.device):
            print(f"{r['name']:45s} manifest {100 * r['manifest']:.2f} %, measured {100 * r['measured']:.2f} % "
                  f"on {r['n']}")
        return 0
    if args.cmd == "measure":
        for name in args.only:
            if args.flip_tta:
                c = measure_flip(name, root, args.device)
                print(f"[{name}] clean with flip test-time augmentation {100 * c['value']:.2f} % "
                      f"[{100 * c['ci95'][0]:.2f}, {100 * c['ci95'][1]:.2f}] on {c['n']:,}", flush=True)
                continue
            rob = measure(name, args.n, root, args.device, norm=args.norm)
            print(f"[{name}] AutoAttack {100 * rob['value']:.1f} % [{100 * rob['ci95'][0]:.1f}, "
                  f"{100 * rob['ci95'][1]:.1f}] (n = {rob['n']:,}, {rob['minutes']:.0f} min)", flush=True)
        return 0
    names = args.only if args.only else catalogue.names(args.group)
    for n in names:
        catalogue.item(n, args.group)  # unknown names fail before any training
    todo = _shard(names, args.shard)
    print(f"zoo: {len(todo)} model(s) for this shard into {root}: {', '.join(todo)}", flush=True)
    for i, name in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {name}", flush=True)
        _train_one(name, args, args.device, root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
