"""Moved to :mod:`nasfcos.logs` (training and the search both log); kept while older imports remain."""

from nasfcos.logs import *  # noqa: F401,F403
from nasfcos.logs import LOG_FILE, __all__  # noqa: F401
