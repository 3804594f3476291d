"""How many torch threads on a small CPU, with and without a busy neighbour?

    python benchmarks/threads.py            # prints the ratios behind flatnb.book.chapter.DEFAULT_CPU_THREADS

Each configuration runs in a fresh process (thread settings are per process): a fixed training-step
workload (forward + backward of the quick ResNet-18, batch 128) timed with 1 and 2 threads, first on an
idle machine, then beside a CPU-bound neighbour process (a busy loop pinned to nothing, like a second
job on a shared 2-core CI machine), and with OMP_WAIT_POLICY=PASSIVE (OpenMP threads sleep instead of
spinning at barriers). The numbers are ratios measured side by side in one run, not absolute times.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

WORK = r"""
import time, torch, torch.nn.functional as F
from flatnb import models
torch.set_num_threads({threads})
torch.manual_seed(0)
m = models.build("resnet18", 10, width=16)
opt = torch.optim.SGD(m.parameters(), lr=0.01)
x, y = torch.rand(128, 3, 32, 32), torch.randint(0, 10, (128,))
for i in range({warm}):
    F.cross_entropy(m(x), y).backward(); opt.step(); opt.zero_grad()
t = time.perf_counter()
for i in range({steps}):
    F.cross_entropy(m(x), y).backward(); opt.step(); opt.zero_grad()
print(time.perf_counter() - t)
"""


def run(threads: int, steps: int, passive: bool, timeout: float) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    code = WORK.format(threads=threads, steps=steps, warm=2)
    try:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                             timeout=timeout, check=True)
    except subprocess.TimeoutExpired:
        return float("inf")
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--timeout", type=float, default=300, help="per configuration; slower counts as inf")
    args = ap.parse_args(argv)
    rows = []
    for busy in (False, True):
        neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            time.sleep(0.5 if busy else 0)
            for threads, passive in ((1, False), (2, False), (2, True)):
                s = run(threads, args.steps, passive, args.timeout)
                rows.append((busy, threads, passive, s))
                print(f"neighbour {'busy' if busy else 'idle'}  threads {threads}  "
                      f"{'OMP_WAIT_POLICY=PASSIVE' if passive else 'default wait policy':24s}  "
                      f"{s:8.2f} s for {args.steps} steps", flush=True)
        finally:
            if neighbour is not None:
                neighbour.kill()
                neighbour.wait()
    t = {(b, n, p): s for b, n, p, s in rows}

    def r(a, b):
        return f"{a / b:.2f}x" if a != float("inf") and b != float("inf") else "n/a (a run timed out)"

    print(f"idle: 2 threads are {r(t[False, 1, False], t[False, 2, False])} the speed of 1")
    print(f"busy: 2 threads are {r(t[True, 1, False], t[True, 2, False])} the speed of 1 "
          f"(PASSIVE: {r(t[True, 1, False], t[True, 2, True])})")
    print(f"busy vs idle, 1 thread: {r(t[True, 1, False], t[False, 1, False])} slower; "
          f"2 threads: {r(t[True, 2, False], t[False, 2, False])} slower")
    return 0


if __name__ == "__main__":
    sys.exit(main())
