"""flatnb: flatness and adversarial robustness, after Walter et al. (ICLR 2026).

One module per concept: ``flatness`` (closed forms and curvature), ``bounds``,
``attacks``, ``data``, ``models``, ``train``; ``runtime`` holds profile,
device and provenance helpers for the chapters.
"""
__version__ = "0.1.0"
