"""Every number the book is run with, and nothing else: training configurations (:mod:`.train_config`,
:mod:`.recipes`), attack budgets and chapter sizes (:mod:`.budgets`), the smoke profile's caps
(:mod:`.smoke`); it may import only :mod:`flatnb.runtime`.

:mod:`.smoke` is loaded only by a smoke run (:func:`.recipes.lookup`, :func:`.budgets.sizes`), so that
quick and full run records never fingerprint it.
"""
