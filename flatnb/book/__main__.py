"""``python -m flatnb.book``: execute the chapters and build the HTML book (see :mod:`flatnb.book.runner`)."""
import sys

from flatnb.book.runner import main

if __name__ == "__main__":  # importing this module (pkgutil.walk_packages does) must not run the book
    sys.exit(main())
