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

Every :class:`PipesProtocolError` carries a machine-readable :attr:`PipesProtocolError.kind` (a
:class:`PipesProtocolErrorKind`), as does every ``PipesProtocolIssue`` the orchestrator records: classify by
the kind, never by the wording of the message, which may change.

``DagsterPipesError`` is an alias of :class:`PipesError` so code written against the ``dagster-pipes``
package keeps catching what it expects.
"""

from __future__ import annotations

from enum import Enum

TYPE_CHECKING = False  # typing is not imported at run time: start-up stays lean
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "PipesError",
    "PipesProtocolError",
    "PipesProtocolErrorKind",
    "PipesUsageError",
    "PipesTransportError",
    "PipesWarning",
    "DagsterPipesError",
    "DagsterPipesWarning",
    "install_hint",
]


def install_hint(requirement: str, extra: str, distributions: str) -> str:
    """How to install a missing optional SDK, for every way this project installs: the SDK itself from the
    package index (``pip install boto3``) or the extra of our distributions that brings it. ``distributions``
    names them as the sentence should ("pipes-ext and pipes-sdk", "pipes-sdk")."""
    return f"pip install '{requirement}' (it is the {extra!r} extra of {distributions})"


class PipesError(Exception):
    """Base class of every error this SDK raises on purpose.

    Attributes:
        invocation: when raised by a ``pipes_core`` client run, what was received before the failure (a
            ``PipesClientCompletedInvocation``); None otherwise.
    """

    invocation: Any = None


class PipesProtocolErrorKind(str, Enum):
    """What was wrong with what the other side sent: the ``kind`` of a :class:`PipesProtocolError` and of a
    ``PipesProtocolIssue``. The values are stable strings (they appear in ``pipes run --json`` output and in
    the conformance vectors); a member compares equal to its value.
    """

    # bootstrap params and documents
    NOT_BASE64 = "not_base64"  # a bootstrap value that is not standard padded base64
    NOT_ZLIB = "not_zlib"  # a bootstrap value that is not (whole) zlib data
    TOO_LARGE = "too_large"  # a bootstrap value that decompresses past its cap (or a context file over it)
    MISSING_PARAM = "missing_param"  # a bootstrap param that is not set (no env var, an argument without value)
    BAD_BOOTSTRAP = "bad_bootstrap"  # a bootstrap param that is not a string
    BAD_CONTEXT = "bad_context"  # context data or context params of the wrong shape
    BAD_MESSAGES_PARAMS = "bad_messages_params"  # messages params of the wrong shape, or naming no known channel
    # any JSON document or message line
    NOT_JSON = "not_json"  # not UTF-8 JSON (including a line of whitespace that JSON does not allow)
    NOT_OBJECT = "not_object"  # JSON, but not an object where one is required
    TOO_DEEP = "too_deep"  # JSON nested deeper than MAX_JSON_DEPTH
    # message lines as a reader cuts them
    TRUNCATED = "truncated"  # a final line without its newline (the writer died mid-write)
    LINE_TOO_LONG = "line_too_long"  # a line longer than the reader's max_line_bytes; skipped unread
    MISSING_CHUNK = "missing_chunk"  # a blob-store chunk that never appeared while later ones did
    # the message envelope and params
    NO_VERSION = "no_version"  # no "__dagster_pipes_version" field: not a Pipes message
    BAD_VERSION = "bad_version"  # a version other than "0.1" (the message is still handled)
    BAD_METHOD = "bad_method"  # "method" missing or not a string
    UNKNOWN_METHOD = "unknown_method"  # a method name this protocol version does not define
    BAD_PARAMS = "bad_params"  # params of the wrong shape for the method
    BAD_METADATA = "bad_metadata"  # a metadata entry that is not a valid {"raw_value", "type"}
    BAD_EXCEPTION = "bad_exception"  # a malformed exception in closed (its valid parts are kept)
    # the session's lifecycle and selection
    UNSELECTED_ASSET = "unselected_asset"  # an asset key outside the run's selection
    DUPLICATE_MATERIALIZATION = "duplicate_materialization"  # a second materialization of one key
    AFTER_CLOSED = "after_closed"  # a message after closed (not handled)
    SECOND_OPENED = "second_opened"  # opened more than once (the first one counts)
    # anything else
    HANDLER_ERROR = "handler_error"  # handling the line raised an unexpected exception (reading went on)
    OTHER = "other"  # not classified (a PipesProtocolError raised without a kind)

    def __str__(self) -> str:
        return self.value


class PipesProtocolError(PipesError):
    """The other side broke the protocol: bad bootstrap params, context data or messages.

    Attributes:
        kind: what was wrong, as a :class:`PipesProtocolErrorKind`.
    """

    def __init__(self, message: str, kind: PipesProtocolErrorKind = PipesProtocolErrorKind.OTHER) -> None:
        super().__init__(message)
        self.kind = kind


class PipesUsageError(PipesError):
    """The API was used in a way it does not allow; nothing was sent."""


class PipesTransportError(PipesError):
    """A channel (file, stream, blob store) failed while moving data."""


class PipesWarning(UserWarning):
    """Something worth knowing that is not an error, e.g. running outside an orchestrated run."""


DagsterPipesError = PipesError
DagsterPipesWarning = PipesWarning
