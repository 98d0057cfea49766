"""The observation layer: what a run tells its observers, beside the run and never changing it.

``observer`` is the interface (:class:`RunObserver`: started, phase, message, event, finished, child_env) and
the attribute names; ``fanout`` calls several observers as one and keeps what one raises from the run; ``otel``
is the OpenTelemetry observer (spans and metrics through the API) and ``trace_file`` the Chrome trace-event file
of ``pipes run --trace``. The drivers in ``pipes_core.launch`` and the handler in ``pipes_core.protocol`` call
it; it depends on them only for the types it is told.

Import the public names from ``pipes_core``; these module paths are internal and may move.
"""

__all__: list[str] = []  # an internal layer: its public names are exported by ``pipes_core``
