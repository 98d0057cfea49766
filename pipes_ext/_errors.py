"""Errors shared by both sides of the Pipes SDK pair.

Every error raised on purpose by ``pipes_ext`` or ``pipes_core`` is a :class:`PipesError`, split by who is
at fault::

    PipesError
    ├── PipesProtocolError      the peer sent something the protocol does not allow
    │                           (bad bootstrap value, malformed message, unknown method, ...)
    ├── PipesUsageError         the caller used the API wrongly (asset key out of scope, payload not
    │                           JSON-serialisable, write after close, ...)
    ├── PipesTransportError     the channel itself failed (file cannot be opened, store unreachable, ...)
    └── PipesExecutionError     the external process failed (non-zero exit, killed, never opened, timed out);
                                defined in ``pipes_core``

``DagsterPipesError`` is an alias of :class:`PipesError` so code written against the ``dagster-pipes``
package keeps catching what it expects.
"""

from __future__ import annotations

__all__ = [
    "PipesError",
    "PipesProtocolError",
    "PipesUsageError",
    "PipesTransportError",
    "PipesWarning",
    "DagsterPipesError",
    "DagsterPipesWarning",
]


class PipesError(Exception):
    """Base class of every error this SDK raises on purpose.

    Attributes:
        invocation: when raised by a ``pipes_core`` client run, what was received before the failure (a
            ``PipesClientCompletedInvocation``); None otherwise.
    """

    invocation: object = None


class PipesProtocolError(PipesError):
    """The other side broke the protocol: bad bootstrap params, context data or messages."""


class PipesUsageError(PipesError):
    """The API was used in a way it does not allow; nothing was sent."""


class PipesTransportError(PipesError):
    """A channel (file, stream, blob store) failed while moving data."""


class PipesWarning(UserWarning):
    """Something worth knowing that is not an error, e.g. running outside an orchestrated run."""


DagsterPipesError = PipesError
DagsterPipesWarning = PipesWarning
