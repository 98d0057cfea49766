"""The Pipes conformance suite: ``python -m conformance run ... -- COMMAND`` drives an implementation's harness
program over every channel it declares, with ``pipes_core`` as the orchestrator; see ``conformance/README.md``."""
