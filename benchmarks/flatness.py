"""Flatness kernels: speed ratios measured side by side in one run (issue 5).

1. closed-form kappa over N CIFAR-10 test images with ResNet-18 vs the exact
   autograd route (per image: features, then the last-layer Hessian with one
   autograd call per weight, then the double-sum kappa).  The autograd route is
   timed on a few images and extrapolated per image.  Target >= 1000x.
2. closed-form kappa (flatness_over) vs a bare forward pass over the same images.
   Target <= 1.10x.
3. Hutchinson trace (flatnb) vs PyHessian's ``trace`` on the same model, batch and
   probe count.  Target >= 1.5x faster, estimates equal within their noise.

Usage: python benchmarks/flatness.py [--n N] [--device auto|cpu|cuda] [--width 64]
The model is randomly initialised (speed does not depend on the weights).
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from flatnb import curvature as fl
from flatnb import models
from flatnb.runtime import describe_device, resolve_device


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats=3):
    """Best of ``repeats`` wall times (after one warm-up call), and the last result."""
    out = fn()
    sync(device)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def load_images(n, device):
    try:
        from flatnb import data

        ds = data.subset(data.load("cifar10", "test"), n=n, seed=0)  # all classes (the split is class-sorted)
        x = ds.images.float().div(255)
        y = ds.labels
        source = f"CIFAR-10 test, seeded subset of {len(y)} images"
    except Exception as err:  # no data here: random inputs, said loudly
        g = torch.Generator().manual_seed(0)
        x = torch.rand(n, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (n,), generator=g)
        source = f"RANDOM inputs (CIFAR-10 unavailable: {type(err).__name__}: {err})"
    return x.to(device), y.to(device), source


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=None, help="images for the closed form (default 2000 on GPU, 128 on CPU)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--width", type=int, default=64, help="ResNet-18 width (64 = the standard net, m=512)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 500 GPU, 64 CPU)")
    ap.add_argument("--exact-n", type=int, default=None, help="images for the autograd route (default 10 GPU, 2 CPU)")
    ap.add_argument("--probes", type=int, default=None, help="Hutchinson probes (default 50 GPU, 10 CPU)")
    ap.add_argument("--hbatch", type=int, default=None, help="batch for the Hessian trace (default 128 GPU, 4 CPU)")
    ap.add_argument("--chunk", type=int, default=None, help="probes per vmapped HVP (default 10 GPU, all probes on CPU)")
    args = ap.parse_args()
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    if not gpu:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    n = args.n or (2000 if gpu else 128)
    batch = args.batch or (500 if gpu else 64)
    exact_n = args.exact_n or (10 if gpu else 2)
    probes = args.probes or (50 if gpu else 10)
    hbatch = args.hbatch or (128 if gpu else 4)
    chunk = args.chunk or (10 if gpu else probes)

    torch.manual_seed(0)
    model = models.build("resnet18", 10, width=args.width).to(device).eval()
    x, y, source = load_images(n, device)
    batches = [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(x), batch)]
    print(f"device: {describe_device(device)}; torch {torch.__version__}")
    print(f"model: ResNet-18 width {args.width} (m={model.head.in_features}, k=10), random init, eval, float32")
    print(f"data: {source}; batch {batch}")
    rows = []

    # -- 2. closed form vs bare forward (interleaved repeats, best of each)
    def bare():
        with torch.no_grad():
            return [model(xb) for xb, _ in batches]

    def closed():
        return fl.flatness_over(model, batches)

    t_fwd, t_cf = math.inf, math.inf
    bare(), closed()
    for _ in range(3):
        t, _ = timed(bare, device, repeats=1)
        t_fwd = min(t_fwd, t)
        t, res = timed(closed, device, repeats=1)
        t_cf = min(t_cf, t)
    per_img_cf = t_cf / n

    # -- 1. exact autograd route on a few images
    w, b = model.head.weight.detach(), model.head.bias.detach()

    def exact():
        out = []
        for i in range(exact_n):
            with torch.no_grad():
                phi = model.features(x[i : i + 1])
            h = fl.last_layer_hessian_autograd(phi, y[i : i + 1], w, b)
            out.append(torch.stack(fl.kappa_from_hessian(h, w), -1))
        return torch.cat(out)

    t0 = time.perf_counter()
    ex = exact()
    sync(device)
    per_img_ex = (time.perf_counter() - t0) / exact_n
    agree = torch.stack([res.terms.kappa_sq[:exact_n], res.terms.kappa_neuron[:exact_n]], -1)
    rel = float(((agree - ex).abs() / ex.abs().clamp_min(1e-30)).max())
    rows.append(("closed-form kappa vs exact autograd (per image)", per_img_ex, per_img_cf, per_img_ex / per_img_cf,
                 ">= 1000x faster", per_img_ex / per_img_cf >= 1000))
    # the part after the features alone: autograd Hessian + double sum vs the closed form
    with torch.no_grad():
        phi1 = model.features(x[:1])
    t0 = time.perf_counter()
    fl.kappa_from_hessian(fl.last_layer_hessian_autograd(phi1, y[:1], w, b), w)
    sync(device)
    t_head_ex = time.perf_counter() - t0
    with torch.no_grad():
        phi_all = model.features(x)
        logits_all = model.head(phi_all)
    dist = fl.class_distances(w)
    t_head_cf, _ = timed(lambda: fl.closed_form(phi_all, logits_all, w, dist), device)
    rows.append(("  same, after the features only (phi given)", t_head_ex, t_head_cf / n, t_head_ex * n / t_head_cf,
                 "(information)", True))
    rows.append((f"closed-form kappa vs bare forward ({n} images)", t_fwd, t_cf, t_cf / t_fwd,
                 "<= 1.10x cost", t_cf / t_fwd <= 1.10))

    # -- 3. Hutchinson vs PyHessian
    xh, yh = x[:hbatch], y[:hbatch]
    gen = torch.Generator(device=device).manual_seed(1)

    op = fl.ParameterHVP(model, xh, yh)

    def ours(p=probes):
        return fl.hutchinson_trace(model, xh, yh, n_probes=p, chunk=min(chunk, p), generator=gen, hvp=op)

    ours(2)  # warm-up (also decides forward-over-reverse vs double backward)
    sync(device)
    t0 = time.perf_counter()
    est = ours()
    sync(device)
    t_ours = time.perf_counter() - t0
    hut = (float(est.mean), float(est.stderr))
    mode = op.mode
    pyh_note = ""
    try:
        from pyhessian import hessian as pyh_hessian

        def theirs(p=probes):
            model.zero_grad(set_to_none=True)
            h = pyh_hessian(model, torch.nn.CrossEntropyLoss(), data=(xh, yh), cuda=gpu)
            vals = h.trace(maxIter=p, tol=-math.inf)  # tol=-inf: exactly `p` probes, no early stop
            model.zero_grad(set_to_none=True)
            return vals

        theirs(2)
        sync(device)
        t0 = time.perf_counter()
        vals = theirs()
        sync(device)
        t_pyh = time.perf_counter() - t0
        model.eval()
        pm = sum(vals) / len(vals)
        pse = math.sqrt(sum((v - pm) ** 2 for v in vals) / (len(vals) - 1) / len(vals))
        z = abs(hut[0] - pm) / math.sqrt(hut[1] ** 2 + pse**2)
        rows.append((f"Hutchinson vs PyHessian trace ({hbatch} imgs, {probes} probes)", t_pyh, t_ours, t_pyh / t_ours,
                     ">= 1.5x faster", t_pyh / t_ours >= 1.5))
        pyh_note = (f"trace estimates: flatnb {hut[0]:.4g} +- {hut[1]:.2g} ({mode}, chunk {chunk}); "
                    f"PyHessian {pm:.4g} +- {pse:.2g}; |diff| = {z:.2f} combined std errors "
                    f"({'equal within noise' if z < 3 else 'NOT equal within noise'})")
    except ImportError as err:
        pyh_note = f"PyHessian not installed ({err}); pip install -r benchmarks/requirements.txt"

    print()
    print(f"{'comparison':58s} {'baseline s':>11s} {'flatnb s':>11s} {'ratio':>9s}  target           met")
    for name, base, ours_t, ratio, target, ok in rows:
        print(f"{name:58s} {base:11.4g} {ours_t:11.4g} {ratio:9.3g}  {target:16s} {'yes' if ok else 'NO'}")
    print()
    print(f"exact route timed on {exact_n} images and extrapolated per image "
          f"({per_img_ex:.3g} s/image; closed form {per_img_cf * 1e3:.3g} ms/image); "
          f"max relative difference of kappa on those images: {rel:.2e}")
    print("ratio column: baseline/flatnb for speed-ups, flatnb/baseline for the forward-pass overhead")
    print(pyh_note)


if __name__ == "__main__":
    main()
