"""The command-line layer: the ``pipes`` command (``python -m pipes_core``), on top of every other layer.

``main`` parses the arguments and picks a launcher and a channel from their registries; it is the only layer
that prints for a human.
"""

__all__: list[str] = []  # an internal layer: the command's entry point is ``pipes_core.cli.main.main``
