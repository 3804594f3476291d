"""The package installs the way users install it: a wheel built from a clean copy of the checkout,
installed non-editable into a fresh virtual environment, imports every subpackage of the source tree.

The fresh environment gets flatnb only from the wheel; its dependencies (torch and the rest, gigabytes)
come from this interpreter's site-packages through a ``.pth`` line, which Python appends after the
environment's own site-packages and which does not activate an editable install found there (``.pth``
files are read only in site directories). The test asserts that ``flatnb`` is imported from the wheel.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _subpackages() -> set[str]:
    return {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "flatnb").rglob("__init__.py")
            if "__pycache__" not in p.parts}


def _clean_copy(dest: Path) -> Path:
    """The files git knows of (tracked, and untracked but not ignored): no caches, no venv, no build."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, check=True).stdout.decode()
    for rel in filter(None, out.split("\0")):
        src = REPO / rel
        if src.is_file() and not rel.startswith(("weights/", "runs/", "book/", "_build/")):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to list the checkout's files")
def test_wheel_installs_non_editable_and_imports_every_subpackage(tmp_path):
    src = _clean_copy(tmp_path / "src")
    dist = tmp_path / "dist"
    # no build isolation: the build backend (setuptools) is this environment's, so no network is needed
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(dist), str(src)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = dist.glob("flatnb-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        in_wheel = {str(Path(n).parent).replace("/", ".") for n in zf.namelist() if n.endswith("/__init__.py")}
        in_wheel.add("flatnb") if "flatnb/__init__.py" in zf.namelist() else None
    expected = _subpackages()
    assert expected <= in_wheel, f"the wheel lacks {sorted(expected - in_wheel)}"

    env = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=False).create(env)
    py = env / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                              str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout + install.stderr
    (site / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    code = ("import importlib, flatnb, pathlib, sys\n"
            f"site = pathlib.Path({str(site)!r}).resolve()\n"
            "where = pathlib.Path(flatnb.__file__).resolve()\n"
            "assert site in where.parents, f'flatnb imported from {where}, not from the wheel'\n"
            f"for name in {sorted(expected)!r}:\n"
            "    importlib.import_module(name)\n"
            "print('imported', len(sys.modules))\n")
    run = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("imported")
