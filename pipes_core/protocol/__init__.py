"""The protocol layer: what the wire says and what one message means, with no I/O.

A newcomer starts here. ``results`` holds the events a run yields (opened, log, results, closed, issues),
``errors`` the exceptions and their kinds, ``handler`` turns one decoded message into events, ``lines`` cuts a
byte stream into messages, ``json_events`` is the JSON form ``pipes run --json`` prints, ``failures`` words the
failure messages and ``run_context`` is the context sent to the child. Nothing here opens a file, a socket or a
process; the layers above (``pipes_core.channels``, ``pipes_core.launch``) do.

Import the public names from ``pipes_core``; these module paths are internal and may move.
"""

__all__: list[str] = []  # an internal layer: its public names are exported by ``pipes_core``
