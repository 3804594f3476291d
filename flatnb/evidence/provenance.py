"""Where each claim of the verdict table comes from, written once: row id -> (provenance, source note).

Provenance (:data:`KINDS`), after the tags of the book's paper reference (``PAPER.md``: [A] abstract or
OpenReview record, [S] secondary summary, [D] derived, [R] reconstruction, [RF] Petzka et al. 2021, [UV] the
Uncanny Valley paper) and a referee's reading of the table:

* ``"paper"`` — the paper's own text as we have it (its abstract or OpenReview record, [A]);
* ``"secondary"`` — known only from a secondary summary of the paper ([S]; numbers and settings to confirm
  against the PDF) or from the authors' earlier Uncanny Valley paper ([UV]);
* ``"derived"`` — the book's own reconstruction, corollary or hypothesis ([D], [R]): not a claim of the
  paper, so its verdict is evidence neither for nor against it.

Chapter 12 takes each row's provenance from here by id (:func:`of`), never from a run record, so records
written before this table existed still read. A row without an entry is an error (:class:`MissingProvenance`)
and a policy problem (:func:`flatnb.evidence.verdict_table.policy_problems`).
"""
from __future__ import annotations

KINDS = ("paper", "secondary", "derived")

_S = "secondary summary [S]"
PROVENANCE: dict[str, tuple[str, str]] = {
    # theory (chapters 2-4)
    "T-lemma": ("secondary", "lemma as stated in a " + _S + "; the proof is the book's [D]"),
    "T-avg-worst": ("derived", "average case: theorem of Petzka et al. 2021 [RF]; the worst-case loss of 1/m "
                               "is the book's argument [D]"),
    "T-bound-explicit": ("derived", "the book's fully explicit bound [D]; it supports the paper's qualitative "
                                    "'flatness bounds the loss change only locally' [A]"),
    "T-bound-reported": ("secondary", "the bound's form and constants as transcribed from a " + _S +
                                      "; PDF unchecked"),
    "T-radius": ("derived", "the book's corollary (robust radius, cubic cap) [D], not the paper's statement"),
    "T-local-global": ("paper", "'ε > log k ensures a prediction flip' (submission, OpenReview) [A]; the "
                                "converse's counterexample from a review [A]; temperature [D]"),
    # the uncanny valley (chapter 5)
    "E6-rise": ("paper", "abstract [A]: sharpness rises along attack paths"),
    "E6-peak": ("paper", "abstract [A]: peaks near the label flip"),
    "E6-fall": ("paper", "abstract [A]: drops into a flat, confidently wrong valley"),
    "E6-loss": ("paper", "abstract [A] and " + _S + ": the loss stays high in the valley"),
    # temperature and masking (chapters 6-7)
    "E1-kappa": ("secondary", "E1 as reported in a " + _S),
    "E1-loss": ("secondary", "E1 as reported in a " + _S),
    "E1-early": ("secondary", "E1 as reported in a " + _S),
    "E1b": ("secondary", "90.33 % from a " + _S),
    "E3": ("secondary", "0 % → 93 % from a " + _S),
    "E4": ("secondary", "100 % transfer from a " + _S),
    "E3-masking": ("derived", "the book's expectation that margin/DLR attacks undo the scaling [R]"),
    # detector (chapter 8)
    "E5": ("secondary", "stump accuracies 0.92-0.93 from a " + _S),
    # adversarial training (chapter 9)
    "E2-basin": ("secondary", "≈ 20× wider basin from a " + _S),
    "E2-trace": ("secondary", "Tr H ≈ 0.6 vs 1.0 from a " + _S),
    "E6-AT": ("secondary", "the Uncanny Valley paper [UV] ('even for adversarially trained models')"),
    # architectures and datasets (chapter 10)
    "E6-arch-wrn28_4": ("secondary", "setup and E6 on the four CNNs from a " + _S),
    "E6-arch-vgg11_bn": ("secondary", "setup and E6 on the four CNNs from a " + _S),
    "E6-arch-densenet121": ("secondary", "setup and E6 on the four CNNs from a " + _S),
    "E6-cifar100": ("secondary", "CIFAR-100 in the setup of a " + _S),
    "E6-arch-vit": ("secondary", "ViT only in AI-generated summaries: unconfirmed"),
    "E6-tinyimagenet-resnet18": ("secondary", "'ImageNet subsets' only in AI-generated summaries: unconfirmed"),
    "E6-tinyimagenet-vit": ("secondary", "ViT and 'ImageNet subsets' only in AI-generated summaries: "
                                         "unconfirmed"),
    # walls off the manifold (chapter 11)
    "R-walls": ("paper", "abstract [A]: the loss 'needs to curve sharply away from the data manifold'; 'more so "
                         "for the more robust model' is the book's reading [R]"),
    "R-walls-std": ("derived", "the book's control (steeper along the attack direction)"),
    "R-walls-at": ("derived", "the book's control (steeper along the attack direction)"),
    # the atlas (chapter 13)
    "A-E2": ("secondary", "E2's Tr H ≈ 0.6 vs 1.0 from a " + _S),
    "A-E6AT": ("secondary", "the Uncanny Valley paper [UV]"),
    "A-suff": ("derived", "the book's hypothesis, read from the title and the abstract"),
    "A-rank": ("derived", "the book's hypothesis (κ as a confidence score)"),
    "A-temperature": ("derived", "the book's consequence of E1's head scaling [D]"),
    # untestable here
    "E6-LLM": ("secondary", "LLM trajectories in a " + _S + "; 'rarely flat' from [UV]"),
}


class MissingProvenance(KeyError):
    """A verdict row whose id has no entry in :data:`PROVENANCE`."""


def of(row_id: str) -> tuple[str, str]:
    """``(provenance, source note)`` of a verdict row; :class:`MissingProvenance` names the row and the fix."""
    try:
        return PROVENANCE[row_id]
    except KeyError:
        raise MissingProvenance(
            f"verdict row {row_id!r} has no provenance: add it to flatnb.evidence.provenance.PROVENANCE as "
            f"(one of {KINDS}, a short source note)") from None


def check(mapping: dict | None = None) -> list[str]:
    """Entries of the mapping that are malformed (an unknown provenance, an empty note); empty when all is well."""
    mapping = PROVENANCE if mapping is None else mapping
    return [f"{i}: provenance must be one of {KINDS} with a note, got {v!r}" for i, v in mapping.items()
            if not (isinstance(v, tuple) and len(v) == 2 and v[0] in KINDS and str(v[1]).strip())]
