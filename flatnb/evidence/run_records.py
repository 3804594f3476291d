"""Run records: what a chapter measured, on which device, profile, commit and date.

A chapter writes its verdict rows with the run's metadata to
``runs/<device-slug>/<chapter>.<profile>.json`` (``runs/cpu/05_uncanny_valley.quick.json``,
``runs/nvidia-h200/05_uncanny_valley.full.json``); the book runner stores the executed notebook
beside it. Records of different runs and devices accumulate in the repository; chapter 12 reads
them (:func:`load_all`, :func:`choose`) and never mixes them silently: every row shows its run, and
a record older than the code it ran is labelled stale (:func:`is_stale`).

Staleness is decided on content, not on git history: a record stores a :func:`fingerprint` of what
its numbers depend on (the chapter's code cells and every ``flatnb`` module the run had loaded, each
hashed without comments, docstrings and formatting; of ``flatnb/config/budgets.py`` only what the
chapter's run reads: its own ``SIZES`` entry and the shared tables, not the other chapters' sizes nor the
runner's ``CPU_MINUTES``). A record is stale when one of those changed since; committing the executed notebook (outputs only) or editing a docstring does not make it stale,
and the check works in a shallow clone (Colab) where the run's commit is not in the history.
Records without a fingerprint fall back to comparing commits.

``FLATNB_RUNS`` overrides the folder; by default it is ``runs/`` of the repository that holds this
package (a clone, as in Colab), else ``./runs``.
"""
from __future__ import annotations

import ast
import datetime as _dt
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

from flatnb import __version__
from flatnb.evidence.claims import check_rows
from flatnb.runtime import atomic_write_text, describe_device

REPO = Path(__file__).resolve().parents[2]  # flatnb/evidence/run_records.py -> the repository


def runs_dir(root=None) -> Path:
    """The records folder (not created here)."""
    if root is not None:
        return Path(root)
    if os.environ.get("FLATNB_RUNS"):
        return Path(os.environ["FLATNB_RUNS"]).expanduser()
    if (REPO / "_toc.yml").exists():
        return REPO / "runs"
    return Path.cwd() / "runs"


def device_slug(device) -> str:
    """``cpu``, or the GPU's name in lower case with dashes (``nvidia-h200``)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return dev.type
    name = torch.cuda.get_device_name(dev)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-").replace("-80gb-hbm3", "")


def _git(*args) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def commit() -> str | None:
    """The checked-out commit of the repository holding this package (None outside a git clone)."""
    return _git("rev-parse", "HEAD")


def code_commit(chapter: str) -> str | None:
    """The last commit that changed the chapter's notebook or the package: its code's version."""
    return _git("log", "-1", "--format=%H", "--", f"book/{chapter}.ipynb", "flatnb")


def dirty() -> bool | None:
    """Whether the package or the chapters' code differ from the checked-out commit (None outside git).

    A chapter whose only changes are its outputs (the book runner writes each executed chapter in place)
    does not count: what matters is whether the code that produced the numbers is the commit's."""
    changed = _git("diff", "--name-only", "HEAD", "--", "flatnb", "book")
    untracked = _git("ls-files", "--others", "--exclude-standard", "--", "flatnb", "book")
    if changed is None or untracked is None:
        return None
    if any(p.endswith((".py", ".ipynb")) for p in untracked.splitlines()):
        return True
    for path in changed.splitlines():
        if not path.endswith(".ipynb"):
            if path.endswith(".py"):
                return True
            continue
        head = _git("show", f"HEAD:{path}")
        if head is None or not (REPO / path).exists():
            return True
        if code_hash(head) != notebook_hash(REPO / path):
            return True
    return False


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            first = body[0] if body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def _digest(text: str) -> str:
    """The 16 hex digits of SHA-256 that every fingerprint entry stores."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _canon(node) -> str:
    """A syntax tree as text, without None or empty fields: the same on Python 3.11-3.13 (whose
    ``ast.dump`` differ in exactly those fields), so a record's fingerprint survives a Python upgrade."""
    if isinstance(node, ast.AST):
        fields = [f"{k}={_canon(v)}" for k, v in ast.iter_fields(node) if v is not None and v != []]
        return f"({type(node).__name__} {' '.join(fields)})"
    if isinstance(node, list):
        return "[" + ",".join(_canon(v) for v in node) + "]"
    return repr(node)


def source_hash(path) -> str | None:
    """SHA-256 (16 hex digits) of a Python file's code: comments, docstrings and layout do not count.

    None when the file does not exist; a file that does not parse is hashed as raw text."""
    path = Path(path)
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    try:
        text = _canon(_strip_docstrings(ast.parse(text)))
    except SyntaxError:
        pass
    return _digest(text)


#: the module of every chapter's sample sizes: a run depends on its own chapter's entry only (:func:`budgets_hash`)
BUDGETS = "flatnb/config/budgets.py"


def budgets_hash(path, chapter: str) -> str | None:
    """:func:`source_hash` of ``flatnb/config/budgets.py`` as one chapter's run depends on it: every statement
    except ``CPU_MINUTES`` (the book runner's time estimates, which balance its lanes and change no number) and
    the ``SIZES`` entries of the other chapters. Resizing chapter 3 leaves chapter 5's record current; changing
    an attack budget, a model list or a function of the module makes every record stale."""
    path = Path(path)
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    try:
        tree = _strip_docstrings(ast.parse(text))
    except SyntaxError:
        return _digest(f"{chapter}\n{text}")
    body = []
    for node in tree.body:
        names = {t.id for t in getattr(node, "targets", [getattr(node, "target", None)]) if isinstance(t, ast.Name)}
        if "CPU_MINUTES" in names:
            continue
        if "SIZES" in names and isinstance(node.value, ast.Dict):
            pairs = [(k, v) for k, v in zip(node.value.keys, node.value.values)
                     if k is None or (isinstance(k, ast.Constant) and k.value == chapter)]  # None: **other
            node.value = ast.Dict(keys=[k for k, _ in pairs], values=[v for _, v in pairs])
        body.append(node)
    tree.body = body
    return _digest(_canon(tree))


def file_hash(repo: Path, rel: str, chapter: str) -> str | None:
    """The hash a fingerprint stores for ``rel`` in a run of ``chapter``: :func:`notebook_hash` of a notebook,
    :func:`budgets_hash` of the budgets module, else :func:`source_hash`."""
    if rel.endswith(".ipynb"):
        return notebook_hash(repo / rel)
    return budgets_hash(repo / rel, chapter) if rel == BUDGETS else source_hash(repo / rel)


def notebook_hash(path) -> str | None:
    """SHA-256 (16 hex digits) of a notebook's code cells (papermill's injected cell excluded), so that
    outputs, markdown and execution counts do not count. None when the notebook does not exist."""
    path = Path(path)
    return code_hash(path.read_text(encoding="utf-8")) if path.is_file() else None


def code_hash(notebook_text: str) -> str:
    """:func:`notebook_hash` of a notebook given as its JSON text."""
    nb = json.loads(notebook_text)
    code = ["".join(c.get("source", "")).rstrip() for c in nb.get("cells", [])
            if c.get("cell_type") == "code"
            and "injected-parameters" not in c.get("metadata", {}).get("tags", [])]
    return _digest("\n\x00\n".join(code))


def fingerprint(chapter: str, repo=None, modules=None) -> dict:
    """What a run's numbers depend on: ``{"files": {relative path: hash}}`` for the chapter's notebook
    ``book/<chapter>.ipynb`` and every ``flatnb`` module in ``modules`` (default: those loaded now in
    ``sys.modules``), paths relative to ``repo`` (default: the repository holding this package); the budgets
    module counts with this chapter's sizes only (:func:`budgets_hash`)."""
    repo = Path(repo) if repo is not None else REPO
    files = {}
    nb = repo / "book" / f"{chapter}.ipynb"
    if nb.is_file():
        files[f"book/{chapter}.ipynb"] = notebook_hash(nb)
    if modules is None:
        modules = [getattr(m, "__file__", None) for name, m in list(sys.modules.items())
                   if name == "flatnb" or name.startswith("flatnb.")]
    for f in modules:
        if not f:
            continue
        f = Path(f).resolve()
        try:
            rel = f.relative_to(repo.resolve()).as_posix()
        except ValueError:  # a module outside this repository (an installed copy): not tracked
            continue
        files[rel] = file_hash(repo, rel, chapter)
    return {"files": dict(sorted(files.items()))}


def changed_files(rec: dict, repo=None, memo: dict | None = None) -> list[str] | None:
    """The files of a record's fingerprint whose code differs now (or that are gone); None when the
    record has no fingerprint. ``memo`` (a dict the caller keeps for one pass) saves re-hashing."""
    fp = rec["meta"].get("fingerprint")
    if not fp or "files" not in fp:
        return None
    repo = Path(repo) if repo is not None else REPO
    memo = {} if memo is None else memo
    chapter = rec["meta"].get("chapter", "")
    out = []
    for rel, old in fp["files"].items():
        key = (rel, chapter) if rel == BUDGETS else rel
        if key not in memo:
            memo[key] = file_hash(repo, rel, chapter)
        new = memo[key]
        if new != old:
            out.append(rel + (" (gone)" if new is None else ""))
    return out


def meta(chapter: str, profile: str, device, seed: int, wall_s: float, **extra) -> dict:
    """The metadata of one run (JSON-ready), with the :func:`fingerprint` of the code it ran."""
    return {"chapter": chapter, "profile": profile, "device": describe_device(device),
            "slug": device_slug(device), "commit": commit(), "dirty": dirty(), "seed": int(seed),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "wall_s": round(float(wall_s), 1), "threads": torch.get_num_threads(),
            "versions": {"python": platform.python_version(), "torch": torch.__version__, "flatnb": __version__},
            "fingerprint": fingerprint(chapter), **extra}


def record_path(chapter: str, profile: str, slug: str, root=None) -> Path:
    """``runs/<slug>/<chapter>.<profile>.json``; ``FLATNB_RUN_DIR`` (set by the book runner for a
    full-profile run, the folder of the executed notebook) overrides the folder."""
    if root is None and os.environ.get("FLATNB_RUN_DIR"):
        return Path(os.environ["FLATNB_RUN_DIR"]) / f"{chapter}.{profile}.json"
    return runs_dir(root) / slug / f"{chapter}.{profile}.json"


def save(rows: list[dict], run_meta: dict, root=None) -> Path:
    """Write ``{"meta": ..., "rows": ...}`` atomically; returns the path."""
    rows = check_rows(rows)
    if not rows:
        raise ValueError(f"chapter {run_meta.get('chapter')!r} saves no rows")
    path = record_path(run_meta["chapter"], run_meta["profile"], run_meta["slug"], root)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"meta": run_meta, "rows": rows}, indent=1, ensure_ascii=False) + "\n")
    return path


def load(path: Path) -> dict:
    """One record; a corrupt file raises naming it and the fix."""
    path = Path(path)
    try:
        rec = json.loads(path.read_text())
        rec["rows"] = check_rows(rec["rows"])
        rec["meta"]["chapter"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"run record {path} is unreadable ({type(e).__name__}: {e}); delete it and re-run "
                         "its chapter to write it again") from e
    rec["path"] = str(path)
    return rec


def load_all(root=None) -> list[dict]:
    """Every record under the runs folder, each with ``stale`` set (see :func:`is_stale`)."""
    out, memo = [], {}
    for path in sorted(runs_dir(root).glob("*/*.json")):
        if path.name.count(".") != 2 or path.name.split(".")[1] not in ("quick", "full"):
            continue  # <chapter>.<quick|full>.json only (a smoke run's record is no evidence)
        out.append(mark_stale(load(path), memo=memo))
    return out


def mark_stale(rec: dict, repo=None, memo: dict | None = None) -> dict:
    """``rec`` with ``stale`` (:func:`is_stale`, from the fingerprint when it has one) and ``stale_why`` (the
    changed files, or why git says so) set, in place; returned for chaining."""
    changed = changed_files(rec, repo, memo)
    rec["stale"] = bool(changed) if changed is not None else is_stale(rec, repo)
    rec["stale_why"] = (f"changed since: {', '.join(changed)}" if changed else
                        "the code changed after this run" if rec["stale"] else "")
    return rec


def is_stale(rec: dict, repo=None) -> bool | None:
    """True when code the run depended on changed since (see :func:`fingerprint`), else False.

    A record without a fingerprint falls back to git: True when the chapter's notebook or the package
    changed after the run's commit (or the run had uncommitted changes), False when the run's commit
    contains the code's last change, None when git history cannot tell (no clone, a shallow one)."""
    changed = changed_files(rec, repo)
    if changed is not None:
        return bool(changed)
    m = rec["meta"]
    last = code_commit(m["chapter"])
    run = m.get("commit")
    if not last or not run:
        return None
    if m.get("dirty"):
        return True
    if run == last:
        return False
    ancestor = subprocess.run(["git", "merge-base", "--is-ancestor", last, run], cwd=REPO,
                              capture_output=True).returncode if _git("cat-file", "-e", run) is not None else None
    if ancestor is None:
        return None
    return ancestor != 0  # the code's last change is not contained in the run's commit


def choose(records: list[dict], chapter: str) -> dict | None:
    """The record a page and the verdict table should show for ``chapter``: the newest non-stale
    full-profile record, else the newest quick one (stale ones last, never silently: the caller
    shows ``stale``)."""
    mine = [r for r in records if r["meta"]["chapter"] == chapter]
    if not mine:
        return None

    def rank(r):
        return (r.get("stale") is not True, r["meta"]["profile"] == "full", r["meta"]["date"])

    return max(mine, key=rank)


def label(rec: dict) -> str:
    """``quick, cpu (x86_64, 2 threads), 2026-11-30, commit 1a2b3c4`` (+ ``, STALE``)."""
    m = rec["meta"]
    s = f"{m['profile']}, {m['device']}, {m['date'][:10]}, commit {(m.get('commit') or '?')[:7]}"
    if rec.get("stale"):
        s += ", STALE (the code changed after this run)"
    elif rec.get("stale") is None and "stale" in rec:
        s += ", age unknown (no fingerprint and no git history to compare)"
    return s
