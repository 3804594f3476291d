"""The HTML book: which chapters there are (``_toc.yml``), which run each page shows, and the strict build.

The HTML build assembles a staging tree ``_build/site/`` (``_config.yml``, ``_toc.yml``, ``intro.md``,
``references.bib``, ``_static/``, ``book/``) in which each chapter is the newest full-profile run record
``runs/*/<stem>.full.ipynb`` (with its ``<stem>.full.json``) if there is one, else ``book/<stem>.ipynb``;
a quick run therefore never replaces a full-profile page. A full-profile page's banner is restamped from its
record: it names that record, its wall time and whether the code changed since. The HTML is written to
``_build/html/index.html`` (``--path-output P`` puts the staging tree and the HTML under ``P/_build/``).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from flatnb.book.chapter import FULL_RUN_PREFIX
from flatnb.evidence import run_records as records
from flatnb.runtime import atomic_write_text

SITE_FILES = ("_config.yml", "_toc.yml", "intro.md", "references.bib")
SITE_DIRS = ("_static",)
#: what the HTML build does (also in ``python -m flatnb.book --help``)
HTML_BUILD = __doc__.split("\n\n", 1)[1]


def chapters(root: Path | None = None) -> list[Path]:
    """The notebooks listed in ``_toc.yml``, in book order."""
    import yaml

    root = Path(root) if root is not None else Path(__file__).resolve().parents[2]

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
    atomic_write_text(Path(path), new)
    return True


# --------------------------------------------------------------------------- pages


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


#: the banner's last line as chapter.py writes it when the chapter runs (prefix kept, the rest restamped here)
_BANNER_FULL_RUN = re.compile(f"({re.escape(FULL_RUN_PREFIX)}).*?(\\.</div>)", flags=re.S)


def full_run_note(record_json: Path, root: Path | None = None) -> str:
    """The banner's full-run line for a page that IS the full-profile run of ``record_json``.

    A chapter writes its banner before its record exists, so the line it wrote names an earlier record (or
    none); and whether a record is current can only be told later, when the code may have changed since.
    Both are known at build time, from the record itself. The record's path is shown relative to ``root`` (the
    book's repository; default: this checkout)."""
    rec = records.mark_stale(records.load(record_json))
    wall = rec["meta"].get("wall_s")
    took = f", {wall:,.0f} s of wall time" if isinstance(wall, (int, float)) else ""
    where, root = Path(record_json).resolve(), Path(root or records.REPO).resolve()
    shown = where.relative_to(root) if where.is_relative_to(root) else where
    return f"this page is that run ({records.label(rec)}{took}), recorded in <code>{shown.as_posix()}</code>"


def restamp_banner(nb: dict, note: str) -> int:
    """Replace the full-run line of every chapter banner in ``nb``'s HTML outputs by ``note``, in place; return
    how many banners were changed (the banner is the chapter's own display, class ``flatnb-banner``)."""
    changed = 0
    for cell in nb.get("cells", []):
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            html_out = data.get("text/html")
            if html_out is None:
                continue
            text = "".join(html_out) if isinstance(html_out, list) else html_out
            if "flatnb-banner" not in text:
                continue
            new, n = _BANNER_FULL_RUN.subn(lambda m: m.group(1) + note + m.group(2), text)
            if n:
                data["text/html"] = new
                changed += n
    return changed


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
        if source != chapter:  # a full-profile run record: its banner names the run it is (see full_run_note)
            restamp_banner(nb, full_run_note(source.with_suffix(".json"), root))
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
