"""What the book concludes and from which run: claim rows and the verdict policy (:mod:`.claims`), run records
on disk with their fingerprints (:mod:`.run_records`), where each claim comes from (:mod:`.provenance`: the
paper, a secondary source or the book's own derivation, by row id) and chapter 12's verdict table built from
them (:mod:`.verdict_table`); it may import only :mod:`flatnb.runtime` and :mod:`flatnb.stats`.
"""
