"""``python -m pipes_core``: the same as the ``pipes`` command."""

import sys

from pipes_core.cli.main import main

sys.exit(main())
