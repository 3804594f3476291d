"""Measurements on trained models, built from attacks and curvature: attack paths (:mod:`.trajectory`) and
their boundary crossings (:mod:`.crossing`), radii in a ball (:mod:`.radius`), the loss off the manifold
(:mod:`.walls`), temperature calibration (:mod:`.calibration`), the flatness detector (:mod:`.stump`, its
one-threshold rule, and :mod:`.detector`, its evaluation), the atlas of chapter 13 (:mod:`.atlas`) and the
theory chapters' small problems (:mod:`.toy`); it may import everything below it (runtime, stats, config,
data, models, curvature, attacks), never :mod:`flatnb.evidence`, :mod:`flatnb.training` or :mod:`flatnb.book`.
"""
