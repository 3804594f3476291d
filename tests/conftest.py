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


@pytest.fixture(scope="session")
def chapter_models(request):
    import torch

    reporter = request.config.pluginmanager.get_plugin("terminalreporter")

    def say(line):  # straight to the terminal: pytest captures print() inside fixtures
        if reporter is not None:
            reporter.write_line(line)
        else:
            print(line, flush=True)

    from flatnb import budgets, train

    torch.set_num_threads(int(os.environ.get("FLATNB_THREADS", "1")))
    needed = getattr(budgets, "CHAPTER_MODELS", [])
    for i, (arch, dataset, recipe) in enumerate(needed, 1):
        t0 = time.time()
        say(f"[models {i}/{len(needed)}] {arch} {recipe} on {dataset} (quick) ...")
        train.trained_model(arch, dataset, recipe=recipe, profile="quick", device="cpu", progress=False)
        say(f"[models {i}/{len(needed)}] ready in {time.time() - t0:.0f} s")
    return needed


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
