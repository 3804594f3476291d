"""Verdict rows (placeholder moved out of analysis; the verdict policy is written next)."""
from __future__ import annotations

import numpy as np  # noqa: F401
import torch  # noqa: F401

# ----------------------------------------------------------------------------- claims and verdicts

VERDICTS = ("reproduced", "partly", "not reproduced", "not testable here")
_CLAIM_KEYS = ("id", "claim", "paper", "ours", "verdict", "reason")


def claim(id: str, claim: str, paper: str, ours: str, verdict: str, reason: str = "") -> dict:
    """One row of the verdict table: a claim of the paper, its figure, ours, and the verdict.

    ``id`` is the paper's experiment label (``"E1"``, ``"E6-rise"``, ...); ``verdict`` one of
    :data:`VERDICTS`.  Chapters decide the verdict from their own numbers and say why.
    """
    if verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
    row = dict(id=str(id), claim=str(claim), paper=str(paper), ours=str(ours), verdict=verdict, reason=str(reason))
    if not row["id"] or not row["claim"]:
        raise ValueError("a claim needs an id and a statement")
    return row


def claims_dir(root=None):
    """Folder of the chapters' claim files: ``root`` or ``<FLATNB_CACHE>/claims`` (not created here)."""
    from pathlib import Path

    from flatnb.runtime import cache_dir

    return Path(root) if root is not None else cache_dir() / "claims"


def save_claims(chapter: str, claims: list[dict], device, profile: str, root=None):
    """Write a chapter's claims (rows from :func:`claim`) as JSON, atomically.

    The verdict chapter reads them back with :func:`load_claims`; each row keeps the
    chapter, device and profile it was measured with.  Returns the file's path.
    """
    import json
    import os
    import tempfile

    from flatnb.runtime import describe_device

    if not claims:
        raise ValueError(f"chapter {chapter!r} saves no claims")
    rows = []
    for c in claims:
        missing = [k for k in _CLAIM_KEYS if k not in c]
        if missing:
            raise ValueError(f"claim {c!r} lacks {missing}; build rows with flatnb.claims.claim(...)")
        rows.append({**{k: c[k] for k in _CLAIM_KEYS}, "chapter": chapter,
                     "device": describe_device(device), "profile": profile})
    path = claims_dir(root) / f"{chapter}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_claims(root=None) -> list[dict]:
    """Every saved claim, ordered by chapter file name; a corrupt file raises naming it."""
    import json

    rows = []
    for path in sorted(claims_dir(root).glob("*.json")):  # a missing folder globs to nothing
        try:
            rows.extend(json.loads(path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"claims file {path} is corrupt ({e}); re-run its chapter to rewrite it") from e
    return rows


def claims_markdown(claims: list[dict]) -> str:
    """The claims as a Markdown table (id, claim, paper, ours, verdict, reason, device, profile)."""
    def cell(s):
        return str(s).replace("|", "\\|").replace("\n", " ")

    keys = ["id", "claim", "paper", "ours", "verdict", "reason", "chapter", "device", "profile"]
    names = ["#", "claim", "paper", "this book", "verdict", "why", "chapter", "device", "profile"]
    # rows not saved yet have no chapter/device/profile: leave out columns that are empty in every row
    keep = [i for i, k in enumerate(keys) if i < 6 or any(c.get(k) for c in claims)]
    head = "| " + " | ".join(names[i] for i in keep) + " |\n|" + "---|" * len(keep) + "\n"
    return head + "\n".join("| " + " | ".join(cell(c.get(keys[i], "")) for i in keep) + " |" for c in claims)


