"""Execute every chapter of ``_toc.yml`` headless with papermill, in the quick profile.

Executed copies go to ``_build/executed/`` (never into ``book/``), so a failed
run can be read there. Each chapter gets ``FLATNB_CHAPTER_CELL_TIMEOUT`` seconds
per cell (default 1200). The chapters run two at a time (``FLATNB_CHAPTER_PROCESSES``),
each in its own process with one torch thread (the ``chapter_runs`` fixture of
``tests/conftest.py``). Set ``FLATNB_SKIP_CHAPTERS=1`` to run the unit tests only.
"""
import json
import os
from pathlib import Path

import pytest

from flatnb.book import runner as book

ROOT = book.ROOT
OUT = ROOT / "_build" / "executed"
CHAPTERS = book.chapters()

pytestmark = [
    pytest.mark.chapters,
    pytest.mark.skipif(os.environ.get("FLATNB_SKIP_CHAPTERS") == "1", reason="FLATNB_SKIP_CHAPTERS=1"),
]


def test_toc_lists_chapters_and_each_has_a_parameters_cell():
    assert CHAPTERS, "_toc.yml lists no notebook"
    for chapter in CHAPTERS:
        nb = json.loads(chapter.read_text())
        tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{chapter.name}: needs exactly one cell tagged 'parameters'"
        assert "profile" in "".join(tagged[0]["source"]), f"{chapter.name}: parameters cell must set `profile`"


def test_the_quick_main_model_meets_its_target(chapter_models):
    """The quick main model's target: >= 89 % test accuracy on all 10,000 original CIFAR-10 test images, without
    label smoothing or test-time augmentation (85 % until 2026-12-06, on the JPEG copy of CIFAR-10, where this
    recipe reached 86.3 %; on the original images it reaches 89.9 %); checked on the model the chapters use
    (the shipped weights, or the model this run trained)."""
    import torch

    from flatnb import zoo
    from flatnb.training import train

    torch.set_num_threads(1)
    model = zoo.model("main", "cifar10", profile="quick", device="cpu", progress=False)
    cfg = train.config_for("main", "cifar10", profile="quick")
    assert (cfg.arch, cfg.label_smoothing, cfg.mixup_alpha) == ("fastnet", 0.0, 0.0)
    result = train.evaluate(model, train.test_data(cfg), "cpu")
    print(f"quick main model: {result['accuracy']:.4f} on {result['n']} test images")
    assert result["n"] == 10_000 and result["accuracy"] >= 0.89


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_chapter_executes_in_quick_profile(chapter: Path, chapter_runs):
    # executed two at a time by the chapter_runs fixture (tests/conftest.py); this waits for its own
    result = chapter_runs[chapter.stem].result()
    if not result["ok"]:
        pytest.fail(result["message"], pytrace=False)
    output = OUT / chapter.name
    print(f"{chapter.name}: {result['seconds']:.0f} s")
    executed = json.loads(output.read_text())
    injected = [c for c in executed["cells"] if "injected-parameters" in c.get("metadata", {}).get("tags", [])]
    assert not injected, "the runner strips papermill's injected-parameters cell"
    assert "papermill" not in executed["metadata"], "papermill's metadata holds this machine's paths"
    printed = json.dumps([c.get("outputs", []) for c in executed["cells"]])
    assert "quick" in printed, "the provenance block should say the chapter ran in the quick profile"


def test_a_failing_chapter_is_reported_with_its_cell_and_error(tmp_path):
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    nb = new_notebook(cells=[
        new_code_cell('profile = "auto"', metadata={"tags": ["parameters"]}),
        new_code_cell("x = 1"),
        new_code_cell("assert x == 2, 'the maths broke'"),
    ])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    src = tmp_path / "broken.ipynb"
    nbformat.write(nb, src)
    with pytest.raises(book.ChapterFailure) as info:
        book.execute(src, tmp_path / "out" / "broken.ipynb", {"profile": "quick"}, cell_timeout=120)
    message = str(info.value)
    assert "broken.ipynb" in message and "AssertionError: the maths broke" in message
    # execution counts include papermill's injected-parameters cell (stripped from the copy afterwards)
    assert "cell In [4]" in message


def _run_cell(tmp_path, code: str) -> list[dict]:
    """Execute a two-cell notebook (parameters, ``code``) through the book runner; its cells' outputs."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    nb = new_notebook(cells=[new_code_cell('profile = "auto"', metadata={"tags": ["parameters"]}),
                             new_code_cell(code)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    src = tmp_path / "cell.ipynb"
    nbformat.write(nb, src)
    book.execute(src, tmp_path / "out.ipynb", {"profile": "quick"}, cell_timeout=120)
    return [o for c in json.loads((tmp_path / "out.ipynb").read_text())["cells"] for o in c.get("outputs", [])]


def test_figures_are_stored_even_when_the_caller_sets_agg(tmp_path, monkeypatch):
    # CI sets MPLBACKEND=Agg; a kernel that inherited it would store no figure in the chapter
    monkeypatch.setenv("MPLBACKEND", "Agg")
    outputs = _run_cell(tmp_path, "import matplotlib.pyplot as plt\nplt.plot([0, 1], [1, 0])\nplt.show()")
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert os.environ["MPLBACKEND"] == "Agg"  # restored for the caller


def test_a_chapter_kernel_imports_this_checkouts_package(tmp_path, monkeypatch):
    """A chapter runs in book/, where Python would import an installed copy of flatnb (pip install .) before
    the checkout's: the runner puts the checkout first on the kernel's path, and restores the caller's."""
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "elsewhere"))
    outputs = _run_cell(tmp_path, "import flatnb, os\nprint(flatnb.__file__)\nprint(os.environ['PYTHONPATH'])")
    where, path = "".join("".join(o.get("text", "")) for o in outputs).split()[:2]
    assert Path(where).resolve() == book.ROOT / "flatnb" / "__init__.py"
    assert path.split(os.pathsep) == [str(book.ROOT), str(tmp_path / "elsewhere")]
    assert os.environ["PYTHONPATH"] == str(tmp_path / "elsewhere")
