"""The launch layer: one run from start to verdict.

``session`` opens a Pipes session (sync) and ``async_session`` its asyncio twin; ``options`` declares the
per-run options once; ``lifecycle`` is the I/O-free run core (launched -> running -> stopping -> draining ->
verdict); ``client`` is the sync driver every launcher builds on and ``async_client`` the async one;
``subprocess`` is the local launcher and ``run_store`` keeps durable runs. The other launchers are the public
engine modules ``pipes_core.docker``, ``pipes_core.ray`` and ``pipes_core.slurm``. This layer uses
``pipes_core.channels`` and ``pipes_core.protocol``, never the command line.

Import the public names from ``pipes_core``; these module paths are internal and may move.
"""

__all__: list[str] = []  # an internal layer: its public names are exported by ``pipes_core``
