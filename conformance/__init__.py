"""The Pipes conformance suite (``python -m conformance``): to be built; see the project's issues."""
