"""Colab, end to end (issue 16): the book as a Colab user gets it.

A fresh clone of the committed repository, an empty HOME, no FLATNB_DATA, no cache and downloads on
(``FLATNB_DOWNLOAD=1``, what ``data.download_default`` turns on inside Colab). Chapter 12 runs there from
the clone's own files (from the committed run records, never from other notebooks of the same session), and a notebook kernel fetches CIFAR-10 through the real download code (torchvision's
downloader, pointed at a local HTTP server on 127.0.0.1) into the default folder, which does not exist
before. What Colab adds on top, the ``git clone`` and ``pip install`` of the first cell and a GPU, is not
available offline.
"""
from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import textwrap
import threading
from pathlib import Path

import pytest

from flatnb.book import runner as book

ROOT = book.ROOT


def _clone(tmp: Path) -> Path:
    if not (ROOT / ".git").exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("not a git checkout: CI runs on a clone, so the Colab test must run there", pytrace=False)
        pytest.skip("not a git checkout: nothing to clone")
    dest = tmp / "content" / "flatnb"
    subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{ROOT}", str(dest)], check=True)
    return dest


def _env(tmp: Path, clone: Path, extra_path: Path | None = None, **extra) -> dict:
    home = tmp / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLATNB_") and k != "PYTHONPATH"}
    path = [str(clone)] + ([str(extra_path)] if extra_path else [])
    return dict(env, HOME=str(home), PYTHONPATH=os.pathsep.join(path), FLATNB_DOWNLOAD="1", FLATNB_THREADS="1",
                OMP_NUM_THREADS="1", MPLCONFIGDIR=str(home / ".config" / "matplotlib"), **extra)


def _execute(notebook: Path, output: Path, env: dict, timeout: int = 900) -> dict:
    from conftest import execute_in_process

    result = execute_in_process(notebook, output, env, cell_timeout=600, timeout=timeout)
    assert result["ok"], result["message"]
    return result


@pytest.fixture(scope="module")
def colab(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("colab")
    return tmp, _clone(tmp)


@pytest.mark.parametrize("stem", ["12_verdict"])
def test_chapter_runs_from_a_fresh_clone_with_an_empty_home(colab, stem):
    tmp, clone = colab
    env = _env(tmp, clone)
    out = tmp / "executed" / f"{stem}.ipynb"
    result = _execute(clone / "book" / f"{stem}.ipynb", out, env)
    assert Path(result["flatnb"]).resolve().is_relative_to(clone.resolve()), "the kernel must use the clone's flatnb"
    text = json.dumps(json.loads(out.read_text())["cells"])
    assert "quick" in text and "Traceback" not in text
    if stem == "12_verdict":
        # the table comes from the clone's committed records (collect(require_all=True) raises on a missing
        # chapter): rows of the first and of the last chapter that saves any
        assert "T-lemma" in text and "A-suff" in text
    assert not (Path(env["HOME"]) / ".cache" / "flatnb" / "data").exists(), "chapter 12 needs no data"


_SITE = '''
import os
if os.environ.get("FLATNB_TEST_CIFAR10_URL"):  # the test's local server instead of the Toronto one
    import json
    import torchvision
    spec = json.loads(os.environ["FLATNB_TEST_CIFAR10_MD5"])
    C = torchvision.datasets.CIFAR10
    C.url, C.tgz_md5 = os.environ["FLATNB_TEST_CIFAR10_URL"], spec.pop("tgz")
    C.train_list = [[f"data_batch_{i}", spec[f"data_batch_{i}"]] for i in range(1, 6)]
    C.test_list = [["test_batch", spec["test_batch"]]]
    C.meta = {"filename": "batches.meta", "key": "label_names", "md5": spec["batches.meta"]}
    from flatnb.data import datasets  # a synthetic tarball, not the real CIFAR-10: lift the SHA-256 gate
    datasets.CIFAR10_SHA256 = {}
'''


@pytest.mark.slow  # ~45 s; tests/test_download.py covers the same code in-process on every run
def test_a_kernel_downloads_cifar10_into_the_default_folder(colab):
    """As a chapter's first ``fdata.load("cifar10", ...)`` does in Colab: no folder exists, the download
    creates it, checks every file and decodes the split."""
    import hashlib

    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook
    from test_download import _Handler, cifar10_tarball

    tmp, clone = colab
    payload, md5s = cifar10_tarball()
    files = {"/cifar-10-python.tar.gz": payload}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), type("H", (_Handler,), {"files": files}))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    site = tmp / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(textwrap.dedent(_SITE))
    env = _env(tmp, clone, site, FLATNB_TEST_CIFAR10_URL=f"http://127.0.0.1:{httpd.server_address[1]}/"
               "cifar-10-python.tar.gz", FLATNB_TEST_CIFAR10_MD5=json.dumps(
                   dict(md5s, tgz=hashlib.md5(payload).hexdigest())))
    nb = new_notebook(cells=[
        new_code_cell('profile = "auto"', metadata={"tags": ["parameters"]}),
        new_code_cell("from flatnb import data as fdata\n"
                      "test = fdata.load('cifar10', 'test')\n"
                      "print(len(test), test.source)"),
    ])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    src = clone / "book" / "_download_check.ipynb"
    nbformat.write(nb, src)
    try:
        _execute(src, tmp / "executed" / "download.ipynb", env, timeout=300)
    finally:
        httpd.shutdown()
        httpd.server_close()
        src.unlink()
    printed = json.dumps(json.loads((tmp / "executed" / "download.ipynb").read_text())["cells"])
    assert "2 CIFAR-10, original (torchvision's cifar-10-batches-py)" in printed
    data = Path(env["HOME"]) / ".cache" / "flatnb" / "data"
    landed = sorted(p.name for p in data.iterdir())
    # the verified folder and the decoded cache of the split (cache_dir()/data is the same folder by default);
    # no tarball, no staging folder
    assert landed[0] == "cifar-10-batches-py" and all(n.startswith("cifar10-test-") for n in landed[1:]), landed
    shutil.rmtree(data)
