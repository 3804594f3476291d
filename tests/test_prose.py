"""Prose that cannot drift: a number a chapter's text states must be one its outputs produce.

Every number in a chapter's Markdown (outside math, code and link targets) with a decimal point or two or more
digits must appear in that chapter's stored outputs, unless it is a constant of the setup listed in
:data:`CONSTANTS` with the reason it is not a measurement (a configuration value, the paper's own figure,
arithmetic on constants). Run numbers belong in outputs (printed Markdown) and the text refers to them; and
"about nine in ten" style paraphrases of a measured share are refused outright, since no check can follow them.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

BOOK = Path(__file__).resolve().parents[1] / "book"
RUNS = BOOK.parent / "runs"
# the chapters, and the full-profile run records the site shows in their place (those with a JSON record)
CHAPTERS = sorted(BOOK.glob("[0-9][0-9]_*.ipynb")) + sorted(
    p for p in RUNS.glob("*/[0-9][0-9]_*.full.ipynb") if p.with_suffix(".json").is_file())
NUMBER = re.compile(r"(?<![\w.$\\^_{/-])(\d+\.\d+|\d{2,}(?:,\d{3})*(?:\.\d+)?)(?!\w)")
SHARE_IN_WORDS = re.compile(r"\b(?:one|two|three|four|five|six|seven|eight|nine|ten) in "
                            r"(?:two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|twenty|thirty|\d+)\b", re.I)

#: chapter number -> {number as written: why it is not a run's number}
CONSTANTS = {
    "01": {"95": "the level of the Wilson interval",
           "0.21": "arithmetic: 1 - |p|^2 at s*Delta = 2 for two classes, 2p(1 - p) with p = 1/(1 + e^-2)",
           "0.27": "arithmetic: the approximation 2 e^-2 at the same point"},
    "06": {"0.025": "the E1b attack radius (the paper's)", "0.00045": "arithmetic: 0.025 / sqrt(3 * 32 * 32)"},
    "07": {"100": "the largest head scale of the chapter's grid",
           "745": "arithmetic: float64's underflow, exp(-745) ~ 5e-324"},
    "08": {"5.8": "WideResNet-28-4's parameter count in millions (the paper's model)",
           "0.92": "the paper's figure"},
    "09": {"100": "the paper's number of epochs", "95": "the level of the Wilson and bootstrap intervals",
           "60": "the AT bar's clean accuracy (claims.adequate_at)",
           "51": "arithmetic: the E2 attack's 50 steps + 1, the width a path that never takes off is given"},
    "10": {"0.10": "chance on CIFAR-10's 10 classes", "0.05": "chance on the 20 Tiny ImageNet classes",
           "0.005": "chance on all 200 Tiny ImageNet classes (the full profile)",
           "200": "Tiny ImageNet's number of classes (the full profile)",
           "384": "DenseNet-121's feature dimension at growth rate 12 (a configuration value; test_models checks it)",
           "1024": "the same at the paper's growth rate 32 (PAPER §5; test_models checks it)"},
    "11": {"0.05": "the attack's step size", "100": "the paper's number of epochs", "1,000": "the full profile's sample size",
           "200": "the full profile's minimum of correctly classified AT images (budgets.SIZES, min_at_correct)",
           "60": "the AT bar's clean accuracy (claims.adequate_at)", "15": "the ECE's number of bins",
           "20": "the attack direction's number of PGD steps"},
    "12": {"25": "the worked example of the interval rule: 25 successes ...", "30": "... of 30 trials",
           "0.83": "arithmetic: 25 / 30", "0.66": "arithmetic: the Wilson 95 % interval of 25 of 30, lower end",
           "0.93": "arithmetic: the same interval's upper end"},
    "13": {"20,000": "the quick zoo's training images (flatnb.config.recipes)"},
}


def _strip(text: str) -> str:
    text = re.sub(r"\$\$.*?\$\$", "", text, flags=re.S)
    text = re.sub(r"\$[^$\n]*\$", "", text)
    text = re.sub(r"`[^`]*`", "", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    return re.sub(r"\{[a-z]+\}", "", text)


def _outputs(nb: dict) -> str:
    out = []
    for c in nb["cells"]:
        for o in c.get("outputs", []):
            if "text" in o:
                out.append("".join(o["text"]))
            for kind, v in o.get("data", {}).items():
                if kind.startswith("text/"):
                    out.append("".join(v) if isinstance(v, list) else v)
    return "\n".join(out)


def drift(nb: dict, constants: dict) -> list[str]:
    """The prose numbers of a notebook that no output produces and no constant explains, and the measured
    shares paraphrased in words."""
    outputs = _outputs(nb)
    found = []
    for i, c in enumerate(nb["cells"]):
        if c["cell_type"] != "markdown":
            continue
        text = _strip("".join(c["source"]))
        for m in NUMBER.finditer(text):
            s = m.group(1)
            if re.fullmatch(r"(19|20)\d\d", s) or s in outputs or s in constants:
                continue
            found.append(f"cell {i}: {s!r} in '…{text[max(0, m.start() - 60):m.end() + 30]}…'")
        found += [f"cell {i}: a share in words, {m.group(0)!r}: state the run's number in an output and refer to it"
                  for m in SHARE_IN_WORDS.finditer(text)]
    return found


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.relative_to(BOOK.parent).as_posix() for c in CHAPTERS])
def test_prose_numbers_come_from_the_run(chapter: Path):
    nb = json.loads(chapter.read_text())
    problems = drift(nb, CONSTANTS.get(chapter.name[:2], {}))
    assert not problems, f"{chapter.name}: the text states numbers its outputs do not produce:\n" + "\n".join(problems)


def test_the_check_catches_a_stale_number_and_a_share_in_words():
    nb = {"cells": [
        {"cell_type": "markdown", "source": ["The median peaks at 0.82 for about nine in ten paths; $x=3.5$ is math."]},
        {"cell_type": "code", "source": [""], "outputs": [{"output_type": "stream", "text": ["share 0.86 [0.74, 0.93]"]}]},
    ]}
    found = drift(nb, {})
    assert len(found) == 2 and "'0.82'" in found[0] and "nine in ten" in found[1]
    nb["cells"][0]["source"] = ["The share is 0.86 (printed above); 95 % intervals throughout."]
    assert drift(nb, {"95": "interval level"}) == []
