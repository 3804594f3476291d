"""Execute the book's chapters with papermill and build the HTML book.

    python -m flatnb.book                  # execute every chapter in place, then `jupyter-book build .`
    python -m flatnb.book --profile full   # paper scale (needs a GPU)
    python -m flatnb.book --only 01 --no-build

Chapters are executed in the order of ``_toc.yml``. A chapter is replaced by its
executed version only when it ran without error (the new file is written next
to it and moved into place), so a failing run never destroys a committed,
executed chapter; the failed copy is kept under ``_build/failed/`` for reading.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CELL_TIMEOUT = 1800  # seconds; no single cell of a quick chapter comes near it


def chapters(root: Path = ROOT) -> list[Path]:
    """The notebooks listed in ``_toc.yml``, in book order."""
    import yaml

    toc = yaml.safe_load((root / "_toc.yml").read_text())
    found: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                found.append(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(toc)
    paths = []
    for entry in found:
        path = root / entry
        if path.suffix == "":
            path = path.with_suffix(".ipynb")
        if path.suffix == ".ipynb":
            if not path.exists():
                raise FileNotFoundError(f"_toc.yml lists {entry!r} but {path} does not exist")
            paths.append(path)
    return paths


@dataclass
class ChapterFailure(Exception):
    chapter: Path
    cell: str
    error: str
    executed_copy: Path

    def __str__(self) -> str:
        return (
            f"chapter {self.chapter.name} failed in cell {self.cell} of the executed copy: {self.error}\n"
            f"executed copy with the traceback: {self.executed_copy}"
        )


_KERNEL_ENV = {"FLATNB_PROGRESS": "0", "MPLBACKEND": "module://matplotlib_inline.backend_inline"}


def execute(chapter: Path, output: Path, parameters: dict | None = None,
            cell_timeout: int = DEFAULT_CELL_TIMEOUT) -> float:
    """Run one chapter with papermill into ``output``; return its wall time in seconds.

    Raises :class:`ChapterFailure` naming the chapter, the cell and the error.
    """
    import papermill as pm

    output.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    # The kernel inherits our environment: no text-mode progress bars in executed chapters, and
    # matplotlib's inline backend even where the caller set MPLBACKEND=Agg (CI does; a kernel
    # with Agg stores no figures in the executed chapter).
    saved = {k: os.environ.get(k) for k in _KERNEL_ENV}
    os.environ.update(_KERNEL_ENV)
    try:
        pm.execute_notebook(
            str(chapter), str(output), parameters=parameters or None, cwd=str(chapter.parent),
            execution_timeout=cell_timeout, progress_bar=False, kernel_name="python3",
        )
    except pm.PapermillExecutionError as err:
        raise ChapterFailure(chapter, f"In [{err.exec_count}]",
                             f"{err.ename}: {err.evalue}", output) from None
    except Exception as err:  # a kernel death or a timeout is not a PapermillExecutionError
        raise ChapterFailure(chapter, "?", f"{type(err).__name__}: {err}", output) from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return time.time() - start


def run_in_place(paths: list[Path], parameters: dict | None, cell_timeout: int) -> list[tuple[Path, float]]:
    failed_dir = ROOT / "_build" / "failed"
    done = []
    for chapter in paths:
        print(f"executing {chapter.relative_to(ROOT)} ...", flush=True)
        fd, tmp = tempfile.mkstemp(suffix=".ipynb", dir=chapter.parent, prefix=f".{chapter.stem}.")
        os.close(fd)
        tmp_path = Path(tmp)
        try:
            seconds = execute(chapter, tmp_path, parameters, cell_timeout)
        except ChapterFailure as failure:
            failed_dir.mkdir(parents=True, exist_ok=True)
            kept = failed_dir / chapter.name
            os.replace(tmp_path, kept)
            failure.executed_copy = kept
            raise
        except BaseException:  # interrupted: leave no half-executed copy next to the chapters
            tmp_path.unlink(missing_ok=True)
            raise
        os.replace(tmp_path, chapter)
        done.append((chapter, seconds))
        print(f"  done in {seconds:.0f} s", flush=True)
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=["auto", "quick", "full"], default=None,
                        help="profile injected into every chapter (default: the chapter's own, 'auto')")
    parser.add_argument("--device", default=None, help="device injected into every chapter, e.g. cpu or cuda")
    parser.add_argument("--only", nargs="*", default=None,
                        help="execute only chapters whose file name contains one of these strings")
    parser.add_argument("--no-execute", action="store_true", help="build the book from the stored outputs")
    parser.add_argument("--no-build", action="store_true", help="execute the chapters, do not build HTML")
    parser.add_argument("--cell-timeout", type=int, default=DEFAULT_CELL_TIMEOUT)
    args = parser.parse_args(argv)

    # a plain `kill`/`timeout` sends SIGTERM; turn it into SystemExit so the in-place run cleans up
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    params = {k: v for k, v in (("profile", args.profile), ("device", args.device)) if v is not None}
    paths = chapters()
    if args.only:
        paths = [p for p in paths if any(s in p.name for s in args.only)]
        if not paths:
            parser.error(f"--only {args.only} matches no chapter of _toc.yml")
    if not args.no_execute:
        try:
            done = run_in_place(paths, params, args.cell_timeout)
        except ChapterFailure as failure:
            print(f"\nFAILED: {failure}", file=sys.stderr)
            return 1
        total = sum(s for _, s in done)
        print(f"executed {len(done)} chapter(s) in {total:.0f} s")
    if not args.no_build:
        # the CLI of the interpreter running us, so an unactivated venv works too
        cmd = [sys.executable, "-c", "from jupyter_book.cli.main import main; main()",
               "build", str(ROOT), "--warningiserror", "--nitpick", "--keep-going"]
        print("jupyter-book " + " ".join(cmd[3:]), flush=True)
        result = subprocess.run(cmd, cwd=ROOT)
        if result.returncode != 0:
            return result.returncode
        print(f"book: {ROOT / '_build' / 'html' / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
