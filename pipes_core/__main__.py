"""``python -m pipes_core``: the same as the ``pipes`` command."""

import sys

from ._cli import main

sys.exit(main())
