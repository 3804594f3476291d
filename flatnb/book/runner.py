"""Execute the book's chapters with papermill and build the HTML book.

    python -m flatnb.book                       execute every chapter in place (book/), then build the HTML
    python -m flatnb.book --only 05 12 --no-build
    python -m flatnb.book --output /tmp/run     executed chapters and their run records go to /tmp/run,
                                                book/ and runs/ are left alone
    python -m flatnb.book --no-execute          build the HTML from the stored outputs only (about a minute)
    python -m flatnb.book --profile full --jobs 2
                                                paper grade on the shipped evidence models, on any device
                                                (about 3 h on 2 CPU cores, minutes on a GPU): each executed
                                                chapter is written to runs/<device>/<stem>.full.ipynb (never
                                                into book/; the chapter gets FLATNB_RUN_DIR=runs/<device> for
                                                its JSON). Resumable: a chapter whose full record is current
                                                (complete, and no code it ran has changed) is skipped
                                                (--force runs it again); an interrupted chapter leaves nothing
                                                and runs again; a chapter without verdict rows (1, 12) gets a
                                                rows-less record from the runner. --jobs N runs N chapter processes side by side
                                                (one torch thread each), balanced by budgets.CPU_MINUTES
    python -m flatnb.book --profile full --dry-run [--output DIR]
                                                a quick test of the line above: executes the chapters in the
                                                smoke profile (every full-profile model, recipe and branch at
                                                toy scale: one epoch of 256 images, a handful of test images;
                                                failed asserts and empty selections are tolerated and listed,
                                                any other error fails)
                                                into a temp folder (or DIR) and checks that the full-profile
                                                record paths runs/<device>/<stem>.full.* are writable; writes
                                                nothing into book/ or runs/, builds no HTML

Chapters run in the order of ``_toc.yml`` (a chapter that reads the other chapters' records, chapter 12, after
all of them), one progress line each (start time, seconds, pass/FAIL), then a
summary with the total; a failed chapter does not stop the others (``--fail-fast`` does). A chapter is
written only when it ran without error (to a temp file next to its destination, then moved into place), so
a failing run never destroys a committed chapter; the failed copy is kept under ``_build/failed/``.
papermill's ``injected-parameters`` cell and its metadata (which hold this machine's paths) are stripped
before a chapter is written, so the committed ``profile = "auto"`` still reaches every reader. The HTML build
(staging tree, page sources) is :mod:`flatnb.book.site`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from flatnb.book import site
from flatnb.book.site import build_html, chapters, strip_file

ROOT = Path(__file__).resolve().parents[2]  # flatnb/book/runner.py -> the repository
DEFAULT_CELL_TIMEOUT = 1800  # seconds; no single cell of a quick chapter comes near it
#: seconds per cell in the full profile: one cell may hold most of a chapter's CPU budget (chapter 5's valley runs
#: over four models; chapter 13's atlas, an hour on one thread), longer on a busy machine; the timeout only stops a
#: hung kernel. 1800 s stopped chapter 5's full run on a shared 2-core machine (2026-12-06), and chapter 13's dry
#: run (the atlas cell trains and measures 24 toy models: 19 of them in 30 min on a busy machine).
FULL_CELL_TIMEOUT = 3 * 3600


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


def _import_path() -> dict:
    """The kernel's ``PYTHONPATH`` with this checkout first: a chapter runs in ``book/``, where Python would
    otherwise import an installed copy of flatnb (``pip install .``, possibly older than the checkout) instead
    of the package this runner belongs to, and its record would fingerprint code it did not run. Nothing
    outside a checkout (an installed runner)."""
    if not (ROOT / "_toc.yml").is_file():
        return {}
    rest = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": os.pathsep.join([str(ROOT), *([rest] if rest else [])])}


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
    kernel_env = {**_KERNEL_ENV, **_import_path(), **(env or {})}
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
    (the same name the chapters' records use: :func:`flatnb.evidence.run_records.device_slug`)."""
    # heavy and rarely used: torch (which run_records imports) takes seconds to load and only a GPU run
    # needs a device's name; building the HTML (--no-execute) never loads it
    import torch

    from flatnb.evidence.run_records import device_slug as slug

    return slug(device if device not in (None, "auto") else ("cuda" if torch.cuda.is_available() else "cpu"))


def record_paths(runs: Path, slug: str, stem: str, profile: str) -> tuple[Path, Path]:
    """The run record of one chapter: ``runs/<slug>/<stem>.<profile>.ipynb`` and its ``.json``."""
    base = Path(runs) / slug
    return base / f"{stem}.{profile}.ipynb", base / f"{stem}.{profile}.json"


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
        if parameters and parameters.get("profile") == "full" and env and "FLATNB_RUN_DIR" in env:
            if mark_complete(target.with_suffix(".json"), chapter.stem, parameters, time.time() - start, start):
                os.utime(tmp_path)  # the notebook must not be older than the record written just now
        os.replace(tmp_path, target)  # after the JSON: a current record has a notebook no older than it
        seconds = time.time() - start
        print(f" pass {seconds:7.1f} s -> {target}", flush=True)
        results.append((chapter, seconds, True))
    return results


def package_modules() -> list[str]:
    """Every module file of the ``flatnb`` package (the fingerprint of a run whose imports are unknown)."""
    return sorted(str(p) for p in Path(__file__).resolve().parents[1].rglob("*.py"))


def mark_complete(js: Path, stem: str, parameters: dict, wall_s: float, started: float) -> Path | None:
    """After a full-profile chapter ran: make sure its run record ``js`` exists.

    A chapter with verdict rows writes its own record while it runs; nothing is done then (a chapter with
    required rows that wrote none leaves no record, so the run does not count as current and runs again).
    A chapter without rows (chapter 1; chapter 12, which reads the others') saves none, so the runner writes
    one with ``rows: []``: the run's metadata and wall time, fingerprinted over **every** module of the
    package (the runner cannot see which ones the chapter's kernel imported, so any change to the package
    makes it stale). Returns the path written, or None.
    """
    from flatnb.evidence import run_records
    from flatnb.evidence.verdict_table import REQUIRED
    from flatnb.runtime import atomic_write_text

    if js.is_file() and js.stat().st_mtime >= started:
        return None  # the chapter wrote its own
    if stem in REQUIRED:
        print(f"\n  {stem} has verdict rows but wrote no run record {js.name}: its run is not counted as current",
              flush=True)
        return None
    device = parameters.get("device", "cpu")
    m = run_records.meta(stem, "full", device, int(parameters.get("seed", 0)), wall_s,
                         written_by="flatnb.book runner: the chapter saves no verdict rows")
    m["fingerprint"] = run_records.fingerprint(stem, modules=package_modules())
    js.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(js, json.dumps({"meta": m, "rows": []}, indent=1, ensure_ascii=False) + "\n")
    return js


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


#: chapters that read the other chapters' run records (they run last, and whenever another chapter ran)
READS_RECORDS = ("12_verdict",)


def record_is_current(runs: Path, slug: str, stem: str) -> bool:
    """True when ``runs/<slug>/<stem>.full.{ipynb,json}`` are a complete run (the notebook was written after its
    JSON: an interrupted run leaves a newer JSON beside an older notebook, or none) and no code the run
    depended on has changed since (:func:`flatnb.evidence.run_records.changed_files`); a chapter that reads the
    other records (:data:`READS_RECORDS`) also needs to be newer than every other record in its folder."""
    from flatnb.evidence import run_records  # loads torch: only a full run needs it

    nb, js = record_paths(runs, slug, stem, "full")
    if not (nb.is_file() and js.is_file()) or nb.stat().st_mtime < js.stat().st_mtime:
        return False
    try:
        rec = run_records.load(js)
    except ValueError:
        return False
    changed = run_records.changed_files(rec)
    if not (changed == [] or (changed is None and run_records.is_stale(rec) is False)):
        return False
    if stem in READS_RECORDS:  # a reader is current only if no record it reads is newer than it
        return all(p.stat().st_mtime <= js.stat().st_mtime for p in js.parent.glob("*.json") if p != js)
    return True


def lanes(stems: list[str], n: int, minutes: dict[str, float]) -> list[list[str]]:
    """Split ``stems`` into ``n`` lanes of about equal estimated minutes (longest first onto the lightest
    lane); each lane keeps book order."""
    if n < 1:
        raise ValueError(f"--jobs must be >= 1, got {n}")
    load, out = [0.0] * n, [[] for _ in range(n)]
    for stem in sorted(stems, key=lambda s: -minutes.get(s, 5.0)):
        i = min(range(n), key=lambda j: load[j])
        out[i].append(stem)
        load[i] += minutes.get(stem, 5.0)
    order = {s: k for k, s in enumerate(stems)}
    return [sorted(lane, key=order.get) for lane in out if lane]


def run_lanes(groups: list[list[str]], argv: list[str]) -> int:
    """Run ``python -m flatnb.book <argv> --only <lane>`` once per lane, side by side; each output line is
    prefixed with its lane. Returns the worst exit status."""
    import subprocess
    import threading

    procs = []
    for k, lane in enumerate(groups, 1):
        cmd = [sys.executable, "-m", "flatnb.book", *argv, "--jobs", "1", "--no-build", "--only", *lane]
        print(f"lane {k}: {' '.join(lane)}", flush=True)
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      bufsize=1, cwd=ROOT))

    def pump(k, proc):
        for line in proc.stdout:
            print(f"[lane {k}] {line}", end="", flush=True)

    threads = [threading.Thread(target=pump, args=(k, p), daemon=True) for k, p in enumerate(procs, 1)]
    for t in threads:
        t.start()
    try:
        codes = [p.wait() for p in procs]
    except BaseException:
        for p in procs:
            p.terminate()
        raise
    for t in threads:
        t.join()
    return max(codes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flatnb.book", description=__doc__ + "\n" + site.HTML_BUILD,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=["auto", "quick", "full"], default=None,
                        help="profile injected into every chapter (default: the chapter's own 'auto', which is "
                             "'full' on a GPU); 'full' writes to runs/<device>/<stem>.full.ipynb on any device")
    parser.add_argument("--jobs", type=int, default=1,
                        help="chapter processes side by side (default 1; 2 on a 2-core CPU)")
    parser.add_argument("--force", action="store_true",
                        help="with --profile full: run chapters whose full record is current too")
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
    parser.add_argument("--cell-timeout", type=int, default=None,
                        help=f"seconds per cell (default {DEFAULT_CELL_TIMEOUT}; {FULL_CELL_TIMEOUT} in the full profile and its dry run)")
    args = parser.parse_args(argv)
    if args.cell_timeout is None:
        args.cell_timeout = FULL_CELL_TIMEOUT if args.profile == "full" or args.dry_run else DEFAULT_CELL_TIMEOUT
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
        env, on_gpu, full = None, not (args.device or "cuda").startswith("cpu") and cuda_available(), False
        if args.profile == "full" or (args.profile in (None, "auto") and on_gpu):  # auto is full on a GPU
            full = True
            params.setdefault("device", "cuda" if on_gpu else "cpu")
            params["profile"] = "full"
            folder = args.output or args.runs / device_slug(params["device"])
            destination = lambda c: folder / f"{c.stem}.full.ipynb"  # noqa: E731
            env = {"FLATNB_RUN_DIR": str(folder.resolve())}
            if not args.force and args.output is None:
                slug = device_slug(params["device"])
                current = [c for c in paths if c.stem not in READS_RECORDS
                           and record_is_current(args.runs, slug, c.stem)]
                for c in current:
                    print(f"skip {c.stem}: its full record in {folder} is current (--force runs it again)")
                paths = [c for c in paths if c not in current]
        elif args.output is not None:  # the run records go there too: runs/ is left alone like book/
            destination = lambda c: args.output / c.name  # noqa: E731
            env = {"FLATNB_RUN_DIR": str(Path(args.output).resolve())}
        else:
            destination = lambda c: c  # noqa: E731
        readers = [c for c in paths if c.stem in READS_RECORDS]
        others = [c for c in paths if c.stem not in READS_RECORDS]
        if full and not others and not args.force:
            readers = [c for c in readers if not record_is_current(args.runs, device_slug(params["device"]), c.stem)
                       or not (folder / f"{c.stem}.full.ipynb").is_file()]
        if args.jobs > 1 and len(others) > 1:
            from flatnb.config import budgets  # the estimates that balance the lanes

            est = budgets.CPU_MINUTES["full" if full else "quick"]
            passthrough = [*(["--profile", params["profile"]] if "profile" in params else []),
                           *(["--device", params["device"]] if "device" in params else []),
                           *(["--output", str(args.output)] if args.output else []),
                           "--runs", str(args.runs), "--cell-timeout", str(args.cell_timeout),
                           *(["--force"] if args.force else []), *(["--fail-fast"] if args.fail_fast else [])]
            t0 = time.time()
            status = run_lanes(lanes([c.stem for c in others], args.jobs, est), passthrough)
            print(f"{len(others)} chapter(s) in {args.jobs} lanes: {time.time() - t0:.0f} s of wall time", flush=True)
            results = run(readers, destination, params, args.cell_timeout, args.fail_fast, env=env)
            status = max(status, 0 if all(ok for *_, ok in results) else 1)
        else:
            results = run(others + readers, destination, params, args.cell_timeout, args.fail_fast, env=env)
            status = 0 if all(ok for *_, ok in results) else 1
        if results:
            print(summary(results), flush=True)
    if not args.no_build:
        try:
            build_html(ROOT, args.path_output, args.runs)
        except RuntimeError as err:
            print(err, file=sys.stderr)
            return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
