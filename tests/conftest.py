"""Shared test fixtures.

``chapter_models``: before the first chapter executes, every model the quick chapters use is trained
(or loaded from the checkpoint cache) here, with one progress line per model, outside papermill's
per-cell timeout; the chapters then measure only themselves (a chapter that trains its model in a cell
can run past the cell timeout on a loaded machine).
"""
from __future__ import annotations

import os
import time

import pytest
import torch
import torch.nn as nn


# ----------------------------------------------------------------------------- shared small models


class Tiny(nn.Module):
    """A small network following the flatnb model contract."""

    def __init__(self, k=4, m=6, n_in=12):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(n_in, m), nn.ReLU())
        self.head = nn.Linear(m, k)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


class _Traj:
    """A stand-in trajectory: (T+1, N) rows and flip_step, as flatnb.measure.trajectory.Trajectory has them."""

    def __init__(self, kappa, flip, p_top=None):
        self.kappa_sq = kappa
        self.flip_step = flip
        self.loss = torch.zeros_like(kappa)
        self.p_top = torch.full_like(kappa, 0.9) if p_top is None else p_top


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Unit tests use tiny models: one torch thread (threads only add overhead on a shared machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- the caller's cache

# FLATNB_CACHE as the caller set it (CI points it into its clone), read when pytest starts, before the
# test modules' autouse fixtures replace it with a temp dir.
_CALLER_CACHE = os.environ.get("FLATNB_CACHE")


@pytest.fixture
def caller_cache(monkeypatch):
    """Point FLATNB_CACHE back at the caller's cache (else the default one): the real-data tests decode
    and train there once, and the chapters reuse what they leave."""
    if _CALLER_CACHE:
        monkeypatch.setenv("FLATNB_CACHE", _CALLER_CACHE)
    else:
        monkeypatch.delenv("FLATNB_CACHE", raising=False)


# ----------------------------------------------------------------------------- the chapters' models



def _terminal(request):
    """A print straight to the terminal: pytest captures output inside fixtures."""
    capture = request.config.pluginmanager.get_plugin("capturemanager")

    def say(line):
        if capture is not None:
            with capture.global_and_fixture_disabled():
                print(line, flush=True)
        else:
            print(line, flush=True)
    return say


@pytest.fixture(scope="session")
def chapter_models(request):
    """Load (shipped weights, :func:`flatnb.zoo.model`) or train every model of ``budgets.CHAPTER_MODELS``,
    two at a time.

    Each model trains in its own process with one torch thread, two processes at once: the CI machine
    has two cores, and one-thread training leaves the second idle. A failed training fails here with
    its output.
    """
    import subprocess
    import sys

    from flatnb.config import budgets

    say = _terminal(request)
    needed = list(getattr(budgets, "CHAPTER_MODELS", []))
    lanes = int(os.environ.get("FLATNB_TRAIN_PROCESSES", "2"))
    env = dict(os.environ, OMP_NUM_THREADS="1", FLATNB_THREADS="1", FLATNB_PROGRESS="0")
    code = ("import sys, torch; torch.set_num_threads(1); from flatnb import zoo; "
            "zoo.model(sys.argv[1], sys.argv[2], recipe=sys.argv[3], seed=int(sys.argv[4]), profile='quick', "
            "device='cpu', progress=False)")
    queue, running, start = list(enumerate(needed, 1)), [], time.time()
    while queue or running:
        while queue and len(running) < lanes:
            i, (arch, dataset, recipe, *seed) = queue.pop(0)
            seed = str(seed[0] if seed else 0)
            say(f"[models {i}/{len(needed)}] {arch} {recipe} (seed {seed}) on {dataset} (quick): "
                "training or loading ...")
            proc = subprocess.Popen([sys.executable, "-c", code, arch, dataset, recipe, seed], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            running.append((i, arch, recipe, dataset, proc, time.time()))
        time.sleep(1)
        for item in [r for r in running if r[4].poll() is not None]:
            running.remove(item)
            i, arch, recipe, dataset, proc, t0 = item
            out = proc.stdout.read()
            if proc.returncode != 0:
                for _, *_rest, other, _t in running:
                    other.kill()
                pytest.fail(f"training {arch} {recipe} on {dataset} failed:\n{out[-4000:]}", pytrace=False)
            say(f"[models {i}/{len(needed)}] {arch} {recipe} on {dataset}: ready in {time.time() - t0:.0f} s")
    say(f"[models] all {len(needed)} ready in {time.time() - start:.0f} s ({lanes} at a time)")
    return needed


_RUNNER = ("import json, sys; from pathlib import Path; import flatnb; from flatnb.book import runner as book\n"
           "try:\n"
           "    s = book.execute(Path(sys.argv[1]), Path(sys.argv[2]), {'profile': 'quick'},\n"
           "                     cell_timeout=int(sys.argv[3]))\n"
           "    print(json.dumps({'ok': True, 'seconds': s, 'message': '', 'flatnb': flatnb.__file__}))\n"
           "except book.ChapterFailure as f:\n"
           "    print(json.dumps({'ok': False, 'seconds': 0.0, 'message': str(f), 'flatnb': flatnb.__file__}))\n")


def execute_in_process(chapter, output, env: dict, cell_timeout: int, timeout: float | None = None) -> dict:
    """Execute one chapter (quick profile) with the book runner in a fresh process with ``env``, from the
    chapter's folder: ``{"ok", "seconds", "message", "flatnb"}`` (``flatnb``: the package the runner imported)."""
    import json
    import subprocess
    import sys

    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", _RUNNER, str(chapter), str(output), str(cell_timeout)], env=env,
                          cwd=os.path.dirname(chapter), capture_output=True, text=True, timeout=timeout)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"ok": False, "seconds": time.time() - t0, "flatnb": None,
                "message": f"the runner process died (exit {proc.returncode}):\n{proc.stderr[-4000:]}"}


# Chapters that read every other chapter's run record execute last; the longest ones first, so that the
# two lanes finish together (quick-profile times on the CI machine, longest first).
_READS_OTHERS = ("12_verdict",)
_LONGEST_FIRST = ("13_atlas", "09_adversarial_training", "10_architectures", "07_gradient_masking", "06_scale_sweep",
                  "11_off_manifold", "03_local_bound")


@pytest.fixture(scope="session")
def chapter_runs(request, chapter_models):
    """Execute the selected chapters two at a time, each in its own process (papermill kernel, one torch
    thread): the CI machine has two cores and one chapter uses one. Returns ``{stem: Future}``; each
    future's result is ``{"ok": bool, "seconds": float, "message": str}``. Chapters in ``_READS_OTHERS``
    start after all the others have finished."""
    import concurrent.futures as cf

    from flatnb.book import runner as book

    say = _terminal(request)
    wanted = {item.callspec.params["chapter"].stem: item.callspec.params["chapter"] for item in request.session.items
              if item.originalname == "test_chapter_executes_in_quick_profile"}
    lanes = int(os.environ.get("FLATNB_CHAPTER_PROCESSES", "2"))
    timeout = int(os.environ.get("FLATNB_CHAPTER_CELL_TIMEOUT", "1200"))
    env = dict(os.environ, OMP_NUM_THREADS="1", FLATNB_THREADS="1")
    def run(stem: str, after=()) -> dict:
        cf.wait(after)
        chapter = wanted[stem]
        say(f"[chapters] {stem}: executing ...")
        t0 = time.time()
        out = execute_in_process(chapter, book.ROOT / "_build" / "executed" / chapter.name, env, timeout)
        say(f"[chapters] {stem}: {'done' if out['ok'] else 'FAILED'} in {time.time() - t0:.0f} s")
        return out

    order = sorted((s for s in wanted if s not in _READS_OTHERS),
                   key=lambda s: (_LONGEST_FIRST.index(s) if s in _LONGEST_FIRST else len(_LONGEST_FIRST), s))
    pool = cf.ThreadPoolExecutor(max_workers=lanes)
    futures = {s: pool.submit(run, s) for s in order}
    others = list(futures.values())
    futures |= {s: pool.submit(run, s, others) for s in wanted if s in _READS_OTHERS}
    yield futures
    pool.shutdown(wait=True)


@pytest.fixture(autouse=True)
def _models_before_chapters(request):
    """Chapter-execution tests (marked ``chapters``) get the trained models first."""
    if request.node.get_closest_marker("chapters") is not None and "execut" in request.node.name:
        request.getfixturevalue("chapter_models")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` (real trainings of minutes) run only with FLATNB_SLOW=1."""
    if os.environ.get("FLATNB_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set FLATNB_SLOW=1 to run it")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip)
