"""One GPU session, prepared and rehearsed on the CPU: what a lent device runs in one call, and what comes back.

A session gets about 15 minutes of device time, the machine's start included, and one command may run 10
minutes; what it writes under ``$OUT`` comes back (at most 8 files of 16 MiB). So everything goes into one
command with a deadline, each step in its own process with its own share of the time, and whatever
finished comes back even when a later step runs out of time:

1. ``session.txt``    the GPU, driver, torch, bf16 support, the commit
2. ``benchmark.txt``  training images/s side by side in one run (``benchmarks/train.py``): the paper's
                      ResNet-18 recipe eager and through ``torch.compile``, and the quick FastNet
3. ``book.log``       the full-profile book, chapter by chapter until the deadline
                      (``python -m flatnb.book --profile full --device cuda --no-build``)
4. ``records.tar.gz`` the run records it wrote: ``runs/<device>/<chapter>.full.{ipynb,json}``

Here, before the call (the device has torch and torchvision but no registry, and no copy of the data;
``../shared`` does not travel, the carried folders do; ``.gitignore`` ignores both)::

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        -d .whl $(python benchmarks/gpu_session.py --wheels)
    zip -q -d .whl/pyautoattack-*.whl 'pyautoattack/examples/*'    # 42 MB of example weights, unused
    mkdir -p .data && cp ../shared/data/cifar10-webp.tar.gz .data/

The call (device tool ``run``, ``carry=[".whl", ".data"]``, ``timeout_s=590``)::

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
    PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 python3 benchmarks/gpu_session.py --deadline 560 --out $OUT

Afterwards, here: ``tar xzf <files_at>/records.tar.gz`` in the repository root puts the records into
``runs/<device>/``; commit them with ``benchmark.txt`` and ``session.txt`` beside them.

Rehearse the whole thing on the CPU first (the same steps; the book in the smoke profile through
``--dry-run``, a CPU-sized benchmark)::

    python benchmarks/gpu_session.py --rehearse --deadline 1800 --out /tmp/gpu-rehearsal

Tiny ImageNet (152 MB) does not fit the 64 MiB a call carries, so chapter 10's Tiny ImageNet rows fail on
the device unless the archive is sent ahead in pieces (``split -b 50M``, one piece per call while the
machine stays warm, joined with ``cat`` under /tmp); CIFAR-100 needs a network, which the device lacks,
so chapter 10 reports those rows as not loadable.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: packages the device image lacks (its list: /work/.library/device/KINDS.md), pinned by constraints.txt
WHEELS = ("papermill", "entrypoints", "tenacity", "nbclient", "nbformat", "fastjsonschema", "jsonschema",
          "jsonschema-specifications", "referencing", "rpds-py", "jupyter-client", "jupyter-core", "traitlets",
          "platformdirs", "pyzmq", "tornado", "ipykernel", "comm", "debugpy", "ipython", "matplotlib-inline",
          "nest-asyncio2", "prompt-toolkit", "wcwidth", "jedi", "parso", "stack-data", "executing", "asttokens",
          "pure-eval", "pexpect", "ptyprocess", "ipython-pygments-lexers", "pyautoattack")


def pinned_wheels(constraints: Path = ROOT / "constraints.txt") -> list[str]:
    """``name==version`` of each of :data:`WHEELS` as constraints.txt pins it (ValueError if one is missing)."""
    pins = {}
    for line in constraints.read_text().splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, version = line.split("==", 1)
            pins[name.strip().lower().replace("_", "-")] = version.split(";")[0].strip()
    missing = [w for w in WHEELS if w not in pins]
    if missing:
        raise ValueError(f"constraints.txt pins no version of {', '.join(missing)}; add them (pip freeze)")
    return [f"{w}=={pins[w]}" for w in WHEELS]


def step(name: str, cmd: list[str], seconds: float, log: Path, env: dict | None = None) -> tuple[int | None, float]:
    """Run ``cmd`` with at most ``seconds`` (SIGTERM, then SIGKILL 20 s later), its output into ``log``;
    returns (exit status or None when stopped at its limit, wall seconds)."""
    t0 = time.time()
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd)} (limit {seconds:.0f} s)", flush=True)
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        try:
            rc = proc.wait(timeout=max(1.0, seconds))
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            rc = None
    wall = time.time() - t0
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {'stopped at its limit' if rc is None else f'exit {rc}'} "
          f"after {wall:.0f} s", flush=True)
    return rc, wall


def pack(folder: Path, out: Path, limit: int = 16 * 2**20) -> Path | None:
    """``folder``'s ``*.full.ipynb``/``*.full.json`` (paths relative to the repository) into ``out``, if any."""
    files = sorted(p for p in folder.glob("*.full.*") if p.suffix in (".ipynb", ".json"))
    if not files:
        return None
    with tarfile.open(out, "w:gz") as tar:
        for p in files:
            tar.add(p, arcname=str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else p.name)
    if out.stat().st_size > limit:
        print(f"warning: {out} is {out.stat().st_size / 2**20:.1f} MiB, over the {limit / 2**20:.0f} MiB that "
              "come back from the device; the book's figures are the bulk", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/flatnb-gpu-session")))
    ap.add_argument("--deadline", type=float, default=560, help="seconds for the whole session (default 560)")
    ap.add_argument("--benchmark-share", type=float, default=0.15,
                    help="fraction of the deadline for the training benchmark (default 0.15)")
    ap.add_argument("--rehearse", action="store_true",
                    help="on the CPU: the same steps, the book through --dry-run (smoke profile)")
    ap.add_argument("--only", nargs="*", default=None, help="chapters for the book step (default: all)")
    ap.add_argument("--wheels", action="store_true", help="print the pinned wheels the device needs, and exit")
    args = ap.parse_args(argv)
    if args.wheels:
        print(" ".join(pinned_wheels()))
        return 0

    start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    data = ROOT / ".data"
    env = {"FLATNB_DATA": str(data)} if (data / "cifar10-webp.tar.gz").exists() else {}
    env["FLATNB_CACHE"] = os.environ.get("FLATNB_CACHE", "/tmp/flatnb-cache")
    info = args.out / "session.txt"
    probe = ("import torch, platform, subprocess, flatnb.evidence.run_records as r; "
             "print('commit', r.commit(), 'dirty', r.dirty()); print('python', platform.python_version(), "
             "'torch', torch.__version__); c = torch.cuda.is_available(); print('cuda', c); "
             "c and print('gpu', torch.cuda.get_device_name(0), 'bf16', torch.cuda.is_bf16_supported(), "
             "'memory GiB', round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))")
    step("environment", [py, "-c", probe], 120, info, env)
    if not args.rehearse:
        step("nvidia-smi", ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv"], 30, info)

    bench = [py, "benchmarks/train.py", "--steps", "3" if args.rehearse else "30", "--compare-compile",
             "--recipes", "resnet18:standard", "main:standard", "--profile", "quick" if args.rehearse else "full",
             "--device", "cpu" if args.rehearse else "cuda", "--threads", "2"]
    step("benchmark", bench, args.benchmark_share * args.deadline, args.out / "benchmark.txt", env)

    left = args.deadline - (time.time() - start) - 30  # 30 s to pack and return
    only = ["--only", *args.only] if args.only else []
    if args.rehearse:
        chapters_dir = args.out / "chapters"
        book = [py, "-m", "flatnb.book", "--profile", "full", "--dry-run", "--output", str(chapters_dir), *only]
        folder = chapters_dir
    else:
        book = [py, "-m", "flatnb.book", "--profile", "full", "--device", "cuda", "--no-build", *only]
        sys.path.insert(0, str(ROOT))
        from flatnb.book.runner import device_slug
        folder = ROOT / "runs" / device_slug("cuda")
    rc, wall = step("book", book, left, args.out / "book.log", env)
    packed = pack(folder, args.out / "records.tar.gz")
    print(f"records: {packed or 'none written'}; session {time.time() - start:.0f} s of {args.deadline:.0f}",
          flush=True)
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
