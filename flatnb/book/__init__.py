"""The executable book: the scaffold every chapter stands on (:mod:`.chapter`), the uncanny-valley and atlas
figures (:mod:`.figures`), and the papermill runner and HTML build (:mod:`.runner`, :mod:`.site`,
``python -m flatnb.book``); it may import every other part of flatnb, and nothing in flatnb imports it.
"""
