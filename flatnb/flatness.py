"""Old name of :mod:`flatnb.curvature`, kept for one release (0.2): import from ``flatnb.curvature``."""
import warnings as _warnings

from flatnb.curvature import *  # noqa: F401,F403
from flatnb.curvature import __all__  # noqa: F401

_warnings.warn("flatnb.flatness is deprecated; import flatnb.curvature instead", DeprecationWarning, stacklevel=2)
