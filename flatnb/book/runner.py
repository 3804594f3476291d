"""Execute the book's chapters with papermill and build the HTML book.

    python -m flatnb.book                       execute every chapter in place (book/), then build the HTML
    python -m flatnb.book --only 05 12 --no-build
    python -m flatnb.book --output /tmp/run     executed chapters go to /tmp/run, book/ is left alone
    python -m flatnb.book --no-execute          build the HTML from the stored outputs only (about a minute)
    python -m flatnb.book --profile full --device cuda
                                                paper scale on a GPU: each executed chapter is written to
                                                runs/<device>/<stem>.full.ipynb (never into book/; the
                                                chapter gets FLATNB_RUN_DIR=runs/<device> for its JSON);
                                                without CUDA it stops at once and points to --dry-run
    python -m flatnb.book --profile full --dry-run [--output DIR]
                                                the CPU test of the line above: executes the chapters in the
                                                smoke profile (every full-profile model, recipe and branch at
                                                toy scale: one epoch of 256 images, a handful of test images;
                                                failed asserts and empty selections are tolerated and listed,
                                                any other error fails)
                                                into a temp folder (or DIR) and checks that the full-profile
                                                record paths runs/<device>/<stem>.full.* are writable; writes
                                                nothing into book/ or runs/, builds no HTML

Chapters run in the order of ``_toc.yml``, one progress line each (start time, seconds, pass/FAIL), then a
summary with the total; a failed chapter does not stop the others (``--fail-fast`` does). A chapter is
written only when it ran without error (to a temp file next to its destination, then moved into place), so
a failing run never destroys a committed chapter; the failed copy is kept under ``_build/failed/``.
papermill's ``injected-parameters`` cell and its metadata (which hold this machine's paths) are stripped
before a chapter is written, so the committed ``profile = "auto"`` still reaches every reader.

The HTML build assembles a staging tree ``_build/site/`` (``_config.yml``, ``_toc.yml``, ``intro.md``,
``references.bib``, ``_static/``, ``book/``) in which each chapter is the newest full-profile run record
``runs/*/<stem>.full.ipynb`` (with its ``<stem>.full.json``) if there is one, else ``book/<stem>.ipynb``;
executing on a CPU therefore never replaces a paper-scale page. The HTML is written to
``_build/html/index.html`` (``--path-output P`` puts the staging tree and the HTML under ``P/_build/``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CELL_TIMEOUT = 1800  # seconds; no single cell of a quick chapter comes near it
SITE_FILES = ("_config.yml", "_toc.yml", "intro.md", "references.bib")
SITE_DIRS = ("_static",)


def chapters(root: Path | None = None) -> list[Path]:
    """The notebooks listed in ``_toc.yml``, in book order."""
    import yaml

    root = Path(root) if root is not None else ROOT

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


# --------------------------------------------------------------------------- notebooks


def strip_papermill(nb: dict) -> dict:
    """Drop papermill's ``injected-parameters`` cell and its notebook/cell metadata, in place.

    The injected cell would pin a chapter to the profile of the run that executed it (``"auto"`` would
    never reach Colab), and papermill's metadata records this machine's input and output paths.
    """
    nb["cells"] = [c for c in nb.get("cells", [])
                   if "injected-parameters" not in c.get("metadata", {}).get("tags", [])]
    nb.get("metadata", {}).pop("papermill", None)
    for cell in nb["cells"]:
        cell.get("metadata", {}).pop("papermill", None)
    return nb


def strip_file(path: Path) -> bool:
    """:func:`strip_papermill` on a notebook file (atomic rewrite); True when something changed."""
    text = Path(path).read_text()
    nb = json.loads(text)
    new = json.dumps(strip_papermill(nb), indent=1, ensure_ascii=False) + "\n"
    if new == text:
        return False
    _atomic_write_text(Path(path), new)
    return True


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


_KERNEL_ENV = {"FLATNB_PROGRESS": "0", "MPLBACKEND": "module://matplotlib_inline.backend_inline",
               "OMP_WAIT_POLICY": "PASSIVE"}  # OpenMP threads sleep at barriers (benchmarks/threads.py)


def execute(chapter: Path, output: Path, parameters: dict | None = None,
            cell_timeout: int = DEFAULT_CELL_TIMEOUT, env: dict | None = None,
            tolerate_asserts: bool = False) -> float:
    """Run one chapter with papermill into ``output`` (papermill's injected cell stripped); return seconds.

    ``env`` adds environment variables for the kernel, e.g. ``FLATNB_RUN_DIR`` (where a full-profile
    chapter writes its run record's JSON).

    ``tolerate_asserts`` (the smoke profile's dry run): every cell runs even after an error. Tolerated and
    listed: a failed ``assert`` (an evidence check a one-epoch model is not expected to pass), an
    :class:`flatnb.stats.EmptySelection` (nothing counted: such a model is right about almost nothing),
    and a ``NameError`` after one of those (a name the stopped cell would have defined). Any other error
    fails the chapter: a full-profile recipe, architecture, dataset or branch that does not run.

    Raises :class:`ChapterFailure` naming the chapter, the cell and the error.
    """
    import papermill as pm

    output.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    # The kernel inherits our environment: no text-mode progress bars in executed chapters, and
    # matplotlib's inline backend even where the caller set MPLBACKEND=Agg (CI does; a kernel
    # with Agg stores no figures in the executed chapter).
    kernel_env = {**_KERNEL_ENV, **(env or {})}
    saved = {k: os.environ.get(k) for k in kernel_env}
    os.environ.update(kernel_env)
    try:
        pm.execute_notebook(
            str(chapter), str(output), parameters=parameters or None, cwd=str(chapter.parent),
            execution_timeout=cell_timeout, progress_bar=False, kernel_name="python3",
            **({"allow_errors": True} if tolerate_asserts else {}),
        )
    except pm.PapermillExecutionError as err:
        if tolerate_asserts:
            hard, seen = [], False
            for cell, name, text in cell_errors(output):
                if name in SMOKE_TOLERATED or (name == "NameError" and seen):
                    seen = True
                    print(f"\n    tolerated (smoke): cell {cell}: {text}", end="", flush=True)
                else:
                    hard.append((cell, text))
            if seen:  # the runner's "pass"/"FAIL" goes on a line of its own under the tolerated ones
                print("\n   ", end="", flush=True)
            if not hard:
                return time.time() - start
            raise ChapterFailure(chapter, hard[0][0], hard[0][1], output) from None
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
        if output.exists():
            strip_file(output)
    return time.time() - start


#: errors a smoke run tolerates (see :func:`execute`)
SMOKE_TOLERATED = ("AssertionError", "EmptySelection")


def cell_errors(notebook: Path) -> list[tuple[str, str, str]]:
    """``(cell label "In [n]", error name, "name: message + the assert's line")`` of every error output."""
    import nbformat

    out = []
    nb = nbformat.read(str(notebook), as_version=4)
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.get("output_type") == "error":
                # IPython marks the failing line with an arrow: "----> 12 assert x > 0"
                tb = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(o.get("traceback", [])))
                arrow = re.findall(r"-+>\s*\d+\s*(.*)", tb)
                line = arrow[-1].strip() if arrow else ""
                text = f"{o.ename}: {o.evalue}" + (f" (at: {line[:140]})" if line else "")
                out.append((f"In [{cell.get('execution_count')}]", o.ename, text))
    return out


# --------------------------------------------------------------------------- where results go


def device_slug(device: str | None = None) -> str:
    """Folder name of a device under ``runs/``: ``cpu``, or the GPU's name such as ``nvidia-h200``
    (the same name the chapters' records use: :func:`flatnb.records.device_slug`)."""
    import torch

    from flatnb.records import device_slug as slug

    return slug(device if device not in (None, "auto") else ("cuda" if torch.cuda.is_available() else "cpu"))


def record_paths(runs: Path, slug: str, stem: str, profile: str) -> tuple[Path, Path]:
    """The run record of one chapter: ``runs/<slug>/<stem>.<profile>.ipynb`` and its ``.json``."""
    base = Path(runs) / slug
    return base / f"{stem}.{profile}.ipynb", base / f"{stem}.{profile}.json"


def _record_time(notebook: Path) -> float:
    """When a run record was made: its JSON's ``meta.date``, else papermill's end time, else the mtime."""
    from datetime import datetime

    sidecar = notebook.with_suffix(".json")
    stamps = []
    try:
        stamps.append(json.loads(sidecar.read_text())["meta"]["date"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        stamps.append(json.loads(notebook.read_text())["metadata"]["papermill"]["end_time"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    for stamp in stamps:
        try:
            return datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()
        except ValueError:
            continue
    return notebook.stat().st_mtime


def page_source(chapter: Path, runs: Path) -> Path:
    """The notebook the HTML shows for ``chapter``: the newest full-profile run record, else itself.

    A run record is ``runs/<device>/<stem>.full.ipynb`` together with the ``<stem>.full.json`` its chapter
    wrote; an executed notebook without that JSON (an older stored run) is not shown in place of the chapter.
    """
    records = sorted(p for p in Path(runs).glob(f"*/{chapter.stem}.full.ipynb")
                     if p.with_suffix(".json").is_file())
    if not records:
        return chapter
    return max(records, key=lambda p: (_record_time(p), str(p)))


PAGE_TABLE = "<!-- flatnb:page-sources -->"


def run_info(notebook: Path) -> dict[str, str]:
    """Title, profile, device and date of the run stored in ``notebook``.

    From the run record's JSON ``meta`` where there is one, else from the chapter's printed provenance block
    (``profile:``/``device:`` lines) and its cells' execution timestamps.
    """
    nb = json.loads(Path(notebook).read_text())
    titles = [line[2:].strip() for c in nb["cells"] if c["cell_type"] == "markdown"
              for line in "".join(c["source"]).splitlines() if line.startswith("# ")]
    info = {"title": titles[0] if titles else Path(notebook).stem, "profile": "?", "device": "?", "date": "?"}
    try:
        meta = json.loads(Path(notebook).with_suffix(".json").read_text())["meta"]
        return {**info, **{k: str(meta[k]) for k in ("profile", "device", "date") if k in meta}}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    text = "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", []))
    for key in ("profile", "device"):
        found = re.findall(rf"^{key}:\s+(.+)$", text, flags=re.M)
        if found:
            info[key] = found[-1].strip()
    stamps = [v for c in nb["cells"] for v in c.get("metadata", {}).get("execution", {}).values()]
    if stamps:
        info["date"] = max(stamps)[:10]
    return info


def page_table(sources: dict[str, Path], root: Path, docs: dict[str, str] | None = None) -> str:
    """A Markdown table: which run each page of the book shows (generated at build time).

    ``docs`` maps a chapter stem to its document name (``book/05_uncanny_valley``) to link the title.
    """
    lines = ["| chapter | run shown | device | date | source |", "|---|---|---|---|---|"]
    for stem, source in sources.items():
        info = {k: v.replace("|", "\\|") for k, v in run_info(source).items()}
        title = f"{{doc}}`{info['title']} <{docs[stem]}>`" if docs and stem in docs else info["title"]
        where = source.relative_to(root) if source.is_relative_to(root) else source.name
        date = info["date"][:10].replace("-", "\u2011")  # non-breaking hyphens: a date stays on one line
        lines.append(f"| {title} | {info['profile']} | {info['device']} | {date} | `{where}` |")
    return "\n".join(lines) + "\n"


def stage(root: Path, site: Path, runs: Path | None = None) -> dict[str, Path]:
    """Assemble the staging tree the HTML is built from; return ``{chapter stem: source notebook}``."""
    root, site = Path(root), Path(site)
    runs = Path(runs) if runs is not None else root / "runs"
    if site.exists():
        shutil.rmtree(site)
    site.mkdir(parents=True)
    for name in SITE_FILES:
        if (root / name).exists():
            shutil.copy2(root / name, site / name)
    for name in SITE_DIRS:
        if (root / name).is_dir():
            shutil.copytree(root / name, site / name)
    sources = {}
    for chapter in chapters(root):
        source = page_source(chapter, runs)
        target = site / chapter.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        nb = strip_papermill(json.loads(source.read_text()))
        target.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
        sources[chapter.stem] = source
    intro = site / "intro.md"
    if intro.exists() and PAGE_TABLE in intro.read_text():
        docs = {c.stem: c.relative_to(root).with_suffix("").as_posix() for c in chapters(root)}
        intro.write_text(intro.read_text().replace(PAGE_TABLE, page_table(sources, root, docs)))
    return sources


def build_html(root: Path, path_output: Path | None = None, runs: Path | None = None) -> Path:
    """Stage the site under ``<path_output>/_build/site`` and build it strictly; return ``index.html``."""
    out = (Path(path_output) if path_output is not None else Path(root)).resolve()
    site = out / "_build" / "site"
    sources = stage(root, site, runs)
    for stem, source in sources.items():
        where = source.relative_to(root) if source.is_relative_to(root) else source
        print(f"  page {stem:<28} from {where}", flush=True)
    cmd = [sys.executable, "-c", "from jupyter_book.cli.main import main; main()",
           "build", str(site), "--path-output", str(out), "--warningiserror", "--nitpick", "--keep-going"]
    print("jupyter-book " + " ".join(cmd[3:]), flush=True)
    start = time.time()
    result = subprocess.run(cmd, cwd=site)
    if result.returncode != 0:
        raise RuntimeError(f"jupyter-book build failed (exit {result.returncode}); see the log above")
    index = out / "_build" / "html" / "index.html"
    print(f"book built in {time.time() - start:.0f} s: {index}", flush=True)
    return index


# --------------------------------------------------------------------------- running chapters


def run(paths: list[Path], destination, parameters: dict | None, cell_timeout: int,
        fail_fast: bool = False, failed_dir: Path | None = None, env: dict | None = None,
        tolerate_asserts: bool = False):
    """Execute ``paths`` in order; ``destination(chapter)`` names the file each executed chapter replaces.

    Prints one line per chapter (start, seconds, pass/FAIL) and returns ``(chapter, seconds, passed)``.
    """
    failed_dir = failed_dir or ROOT / "_build" / "failed"
    results = []
    for i, chapter in enumerate(paths, 1):
        target = Path(destination(chapter))
        target.parent.mkdir(parents=True, exist_ok=True)
        print(f"[{i:2d}/{len(paths)}] {chapter.stem:<28} start {time.strftime('%H:%M:%S')} ...",
              end="", flush=True)
        fd, tmp = tempfile.mkstemp(suffix=".ipynb", dir=target.parent, prefix=f".{chapter.stem}.")
        os.close(fd)
        tmp_path = Path(tmp)
        start = time.time()
        try:
            execute(chapter, tmp_path, parameters, cell_timeout, **({"env": env} if env else {}),
                    **({"tolerate_asserts": True} if tolerate_asserts else {}))
        except ChapterFailure as failure:
            failed_dir.mkdir(parents=True, exist_ok=True)
            kept = failed_dir / chapter.name
            os.replace(tmp_path, kept)
            failure.executed_copy = kept
            seconds = time.time() - start
            print(f" FAIL {seconds:7.1f} s\n{failure}", flush=True)
            results.append((chapter, seconds, False))
            if fail_fast:
                break
            continue
        except BaseException:  # interrupted: leave no half-executed copy behind
            tmp_path.unlink(missing_ok=True)
            print(" interrupted", flush=True)
            raise
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, target)
        seconds = time.time() - start
        print(f" pass {seconds:7.1f} s -> {target}", flush=True)
        results.append((chapter, seconds, True))
    return results


def summary(results: list[tuple[Path, float, bool]]) -> str:
    passed = sum(ok for _, _, ok in results)
    total = sum(s for _, s, _ in results)
    failed = [c.stem for c, _, ok in results if not ok]
    text = f"{passed}/{len(results)} chapter(s) passed in {total:.0f} s ({total / 60:.1f} min) in total"
    return text + (f"; FAILED: {', '.join(failed)}" if failed else "")


def check_writable(paths: list[Path]) -> list[str]:
    """Problems that would stop the files ``paths`` from being written (creates and removes a probe)."""
    problems = []
    for folder in sorted({p.parent for p in paths}):
        created = []
        try:
            for parent in reversed([folder, *folder.parents]):
                if not parent.exists():
                    parent.mkdir()
                    created.append(parent)
            fd, probe = tempfile.mkstemp(dir=folder, prefix=".probe.")
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            problems.append(f"{folder}: {err}")
        finally:
            for parent in reversed(created):
                try:
                    parent.rmdir()
                except OSError:
                    pass
    return problems


def cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


NO_CUDA = ("--profile full runs the paper-scale book and needs a CUDA GPU, but torch.cuda.is_available() is "
           "False on this machine (or --device names a CPU). To test the full-profile path here, run\n"
           "    python -m flatnb.book --profile full --dry-run\n"
           "(the chapters in the quick profile into a temp folder, plus a check that runs/<device>/ is writable).")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flatnb.book", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=["auto", "quick", "full"], default=None,
                        help="profile injected into every chapter (default: the chapter's own 'auto', which is "
                             "'full' on a GPU); 'full' needs CUDA and writes to runs/<device>/<stem>.full.ipynb")
    parser.add_argument("--device", default=None,
                        help="device injected into every chapter, e.g. cpu or cuda (default: the chapter's own)")
    parser.add_argument("--only", nargs="*", default=None,
                        help="execute only chapters whose file name contains one of these strings")
    parser.add_argument("--output", type=Path, default=None,
                        help="write executed chapters into this folder instead of book/ "
                             "(with --profile full: instead of runs/<device>/)")
    parser.add_argument("--runs", type=Path, default=None, help="folder of run records (default: runs/)")
    parser.add_argument("--path-output", type=Path, default=None,
                        help="build the staging tree and HTML under PATH/_build/ (default: the repository)")
    parser.add_argument("--no-execute", action="store_true", help="build the HTML from the stored outputs only")
    parser.add_argument("--no-build", action="store_true", help="execute the chapters, do not build HTML")
    parser.add_argument("--dry-run", action="store_true",
                        help="execute in the smoke profile (the full profile's code paths at toy scale) into a "
                             "temp folder (or --output) and check that the full-profile record paths are writable; "
                             "the CPU test of --profile full, no HTML")
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first failing chapter")
    parser.add_argument("--cell-timeout", type=int, default=DEFAULT_CELL_TIMEOUT,
                        help=f"seconds per cell (default {DEFAULT_CELL_TIMEOUT})")
    args = parser.parse_args(argv)
    args.runs = args.runs if args.runs is not None else ROOT / "runs"
    if args.no_execute and args.dry_run:
        parser.error("--dry-run executes the chapters; it cannot be combined with --no-execute")

    # a plain `kill`/`timeout` sends SIGTERM; turn it into SystemExit so the run cleans up
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    paths = chapters(ROOT)
    if args.only:
        paths = [p for p in paths if any(s in p.name for s in args.only)]
        if not paths:
            parser.error(f"--only {args.only} matches no chapter of _toc.yml")

    status = 0
    if args.dry_run:
        slug = device_slug(args.device)
        records = [p for c in paths for p in record_paths(args.runs, slug, c.stem, "full")]
        problems = check_writable(records)
        for problem in problems:
            print(f"not writable: {problem}", file=sys.stderr)
        print(f"dry run: full-profile records would go to {args.runs / slug}/ "
              f"({'writable' if not problems else 'NOT writable'})", flush=True)
        with tempfile.TemporaryDirectory(prefix="flatnb-dry-run-") as tmp:
            folder = args.output or Path(tmp)
            params = {"profile": "smoke", **({"device": args.device} if args.device else {})}
            print(f"dry run: every chapter in the smoke profile (the full profile's models, recipes and branches "
                  f"at toy scale; failed asserts and empty selections tolerated, any other error fails), "
                  f"executed copies in {folder}/", flush=True)
            results = run(paths, lambda c: folder / c.name, params, args.cell_timeout, args.fail_fast,
                          failed_dir=folder / "failed", env={"FLATNB_RUN_DIR": str(Path(folder).resolve())},
                          tolerate_asserts=True)
        print(summary(results))
        return 1 if problems or not all(ok for *_, ok in results) else 0

    if not args.no_execute:
        params = {k: v for k, v in (("profile", args.profile), ("device", args.device)) if v is not None}
        env, on_gpu = None, not (args.device or "cuda").startswith("cpu") and cuda_available()
        if args.profile == "full" or (args.profile in (None, "auto") and on_gpu):  # auto is full on a GPU
            if not on_gpu:
                print(NO_CUDA, file=sys.stderr)
                return 2
            params.setdefault("device", "cuda")
            folder = args.output or args.runs / device_slug(params["device"])
            destination = lambda c: folder / f"{c.stem}.full.ipynb"  # noqa: E731
            env = {"FLATNB_RUN_DIR": str(folder.resolve())}
        elif args.output is not None:
            destination = lambda c: args.output / c.name  # noqa: E731
        else:
            destination = lambda c: c  # noqa: E731
        results = run(paths, destination, params, args.cell_timeout, args.fail_fast, env=env)
        print(summary(results), flush=True)
        status = 0 if all(ok for *_, ok in results) else 1
    if not args.no_build:
        try:
            build_html(ROOT, args.path_output, args.runs)
        except RuntimeError as err:
            print(err, file=sys.stderr)
            return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
