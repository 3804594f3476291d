"""Training the book's models: the loop, the checkpoint cache and evaluation (:mod:`.train`) and how a
configuration runs (:mod:`.optim`: precision, optimizer, schedules, weight averaging); it may import
:mod:`flatnb.runtime`, :mod:`flatnb.config`, :mod:`flatnb.data` and :mod:`flatnb.models`, and nothing
imports it but the chapters' scaffold (:mod:`flatnb.book.chapter`) and the chapters.
"""
