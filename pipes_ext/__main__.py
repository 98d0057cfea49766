"""``python -m pipes_ext``: the ``pipes-ext`` command (see :mod:`pipes_ext._cli`)."""

from __future__ import annotations

import sys

from ._cli import main

if __name__ == "__main__":
    sys.exit(main())
