"""Test support: the engine fixtures (``engines_*``: Docker, Ray, Slurm, Prefect), the local blob servers
(``servers``), the fault-injecting proxy (``faultproxy``), the engine skip rules (``engine_skips``), the durable-run
kill matrix (``durable_kills``) and each launcher under it (``durable_launchers``), and the helpers every test
shares (``helpers``: one ``wait_until``, one ``PYTHON``, the ``pipes run --json`` parsers).

Tests and ``benchmarks/`` import them from here, never from one another; ``tests/conftest.py`` registers the
fixture modules as pytest plugins. A helper a second test file needs moves here rather than being copied.
"""
