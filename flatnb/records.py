"""Run records: what a chapter measured, on which device, profile, commit and date.

A chapter writes its verdict rows with the run's metadata to
``runs/<device-slug>/<chapter>.<profile>.json`` (``runs/cpu/05_uncanny_valley.quick.json``,
``runs/nvidia-h200/05_uncanny_valley.full.json``); the book runner stores the executed notebook
beside it. Records of different runs and devices accumulate in the repository; chapter 12 reads
them (:func:`load_all`, :func:`choose`) and never mixes them silently: every row shows its run, and
a record older than the code it ran is labelled stale (:func:`is_stale`).

``FLATNB_RUNS`` overrides the folder; by default it is ``runs/`` of the repository that holds this
package (a clone, as in Colab), else ``./runs``.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
import tempfile
from pathlib import Path

import torch

from flatnb.claims import check_rows

REPO = Path(__file__).resolve().parent.parent


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


def code_fingerprint(chapter: str) -> str | None:
    """A hash of the code a chapter runs: its notebook's code cells and every module of flatnb.

    Outputs do not count (committing an executed chapter does not make its record stale), and no git
    history is needed (a shallow clone, as in Colab, can tell a stale record). None when the chapter's
    notebook is not found.
    """
    import hashlib

    nb = REPO / "book" / f"{chapter}.ipynb"
    if not nb.exists():
        return None
    h = hashlib.sha256()
    cells = json.loads(nb.read_text())["cells"]
    for c in cells:
        if c["cell_type"] == "code" and "injected-parameters" not in c.get("metadata", {}).get("tags", []):
            h.update("".join(c["source"]).encode())
    for path in sorted((REPO / "flatnb").rglob("*.py")):
        h.update(str(path.relative_to(REPO)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def dirty() -> bool | None:
    """Whether the package or the chapters have uncommitted changes (None outside git)."""
    out = _git("status", "--porcelain", "--", "flatnb", "book")
    return None if out is None else bool(out)


def meta(chapter: str, profile: str, device, seed: int, wall_s: float, **extra) -> dict:
    """The metadata of one run (JSON-ready)."""
    from flatnb import __version__
    from flatnb.runtime import describe_device

    return {"chapter": chapter, "profile": profile, "device": describe_device(device),
            "slug": device_slug(device), "commit": commit(), "dirty": dirty(), "code": code_fingerprint(chapter),
            "seed": int(seed),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "wall_s": round(float(wall_s), 1), "threads": torch.get_num_threads(),
            "versions": {"python": platform.python_version(), "torch": torch.__version__, "flatnb": __version__},
            **extra}


def record_path(chapter: str, profile: str, slug: str, root=None) -> Path:
    return runs_dir(root) / slug / f"{chapter}.{profile}.json"


def save(rows: list[dict], run_meta: dict, root=None) -> Path:
    """Write ``{"meta": ..., "rows": ...}`` atomically; returns the path."""
    rows = check_rows(rows)
    if not rows:
        raise ValueError(f"chapter {run_meta.get('chapter')!r} saves no rows")
    path = record_path(run_meta["chapter"], run_meta["profile"], run_meta["slug"], root)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"meta": run_meta, "rows": rows}, f, indent=1, ensure_ascii=False)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
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
    out = []
    for path in sorted(runs_dir(root).glob("*/*.json")):
        if path.name.count(".") != 2:  # <chapter>.<profile>.json only
            continue
        rec = load(path)
        rec["stale"] = is_stale(rec)
        out.append(rec)
    return out


def is_stale(rec: dict) -> bool | None:
    """True when the code the chapter runs (its code cells and the package, :func:`code_fingerprint`)
    changed after the run; None when the record or this checkout cannot tell."""
    then, now = rec["meta"].get("code"), code_fingerprint(rec["meta"]["chapter"])
    if not then or not now:
        return None
    return then != now


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
    return s
