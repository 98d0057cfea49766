"""The channels layer: how the context reaches the child and how its messages and logs come back.

``injectors`` deliver the context (env var, file), ``readers`` read messages (file, temp file),
``stdio`` reads them from the child's stdout/stderr, ``blob`` and ``log_readers`` from a blob store and log
files, ``files`` and ``watch`` are the shared file and inotify plumbing, and ``registry`` maps the names the
command line accepts (``--channel``, blob stores) to these classes. Channels depend on ``pipes_core.protocol``
only; the launchers in ``pipes_core.launch`` and the engine modules (``pipes_core.docker``, ``.ray``, ``.slurm``,
``.s3``, ``.gcs``, ``.azure``) choose among them.

Import the public names from ``pipes_core``; these module paths are internal and may move.
"""

__all__: list[str] = []  # an internal layer: its public names are exported by ``pipes_core``
