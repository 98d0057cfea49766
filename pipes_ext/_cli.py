"""``pipes-ext`` (``python -m pipes_ext``): Pipes for any program, with no SDK.

``pipes-ext exec [--capture-stdio] [--blob-store STORE] -- CMD [ARG]...`` opens the Pipes session from the
bootstrap (the environment, or ``--dagster-pipes-context`` / ``--dagster-pipes-messages`` anywhere on the command
line, where an orchestrator's CLI bootstrap appends them), sends ``opened``, runs CMD, relays what CMD reports,
sends ``closed`` and exits with CMD's status. CMD (and every process it starts) reports by writing one JSON object
per line, a method and its params without the envelope::

    {"method": "report_asset_materialization", "params": {"asset_key": "orders", "metadata": {"rows": 42}}}

either to the inherited descriptor ``$PIPES_MESSAGES_FD`` or to the named pipe ``$PIPES_MESSAGES_FILE`` (the two
are the same pipe), or through the subcommands below, which validate before they write. ``exec`` checks each line
against the run (the method, its params, the asset keys in scope, each asset materialized once) and adds the
envelope; a line it cannot send is a *reported issue* (a WARNING ``log`` message to the orchestrator and a line on
stderr), never the end of the run. The context document is at ``$PIPES_CONTEXT_FILE``.

Subcommands, for programs running under ``exec``: ``log``, ``materialize``, ``check``, ``message``, ``extra``,
``context``, and ``sync`` (wait until exec has handed everything written so far to the messages channel). Bad
input is a one-line error on stderr and exit status 2; nothing is written then.

Standard library only, like the rest of ``pipes_ext``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import selectors
import shutil
import signal
import stat
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

from ._context import PipesContext, open_pipes
from ._context_loaders import PipesContextLoader
from ._errors import PipesError, PipesProtocolError, PipesUsageError
from ._errors import PipesProtocolErrorKind as _Kind
from ._params import PipesCliArgsParamsLoader, PipesEnvVarParamsLoader, PipesParamsLoader
from ._protocol import (
    _STRING_METADATA_TYPES,
    CONTEXT_EXTRAS,
    DAGSTER_PIPES_CONTEXT_CLI_ARGUMENT,
    DAGSTER_PIPES_CONTEXT_ENV_VAR,
    DAGSTER_PIPES_MESSAGES_CLI_ARGUMENT,
    DAGSTER_PIPES_MESSAGES_ENV_VAR,
    DEFAULT_LOG_LEVEL,
    MESSAGE_METHOD_FIELD,
    MESSAGE_PARAMS_FIELD,
    METADATA_TYPE_INFER,
    METADATA_TYPES,
    METHOD_CLOSED,
    METHOD_LOG,
    METHOD_LOG_EXTERNAL_STREAM,
    METHOD_OPENED,
    METHOD_REPORT_ASSET_CHECK,
    METHOD_REPORT_ASSET_MATERIALIZATION,
    METHOD_REPORT_CUSTOM_MESSAGE,
    METHOD_SPECS,
    PARAM_ASSET_KEY,
    PARAM_BUCKET,
    PARAM_CHECK_NAME,
    PARAM_DATA_VERSION,
    PARAM_EXTRAS,
    PARAM_INCLUDE_STDIO_IN_MESSAGES,
    PARAM_LEVEL,
    PARAM_MESSAGE,
    PARAM_METADATA,
    PARAM_PASSED,
    PARAM_PAYLOAD,
    PARAM_SEVERITY,
    PARAM_STREAM,
    PARAM_TEXT,
    PIPES_PROTOCOL_VERSION,
    PIPES_PROTOCOL_VERSION_FIELD,
    SEVERITIES,
    SEVERITY_ERROR,
    load_message_line,
    loads_json_document,
    normalize_log_level,
    validate_context_data,
)
from ._writers import PipesFileMessageWriterChannel, PipesMessageWriter, PipesStreamMessageWriterChannel

__all__ = [
    "ENV_MESSAGES_FD",
    "ENV_MESSAGES_FILE",
    "ENV_CONTEXT_FILE",
    "ENV_BLOB_STORE",
    "BLOB_STORES",
    "RELAYED_METHODS",
    "main",
]

PROG = "pipes-ext"

# What CMD gets in its environment under `exec` (the bootstrap variables are taken out: the session is exec's).
ENV_MESSAGES_FD = "PIPES_MESSAGES_FD"  # the write end of the messages pipe, inherited
ENV_MESSAGES_FILE = "PIPES_MESSAGES_FILE"  # the same pipe by name (a FIFO), for programs that cannot use a descriptor
ENV_CONTEXT_FILE = "PIPES_CONTEXT_FILE"  # the context document, JSON
# Which blob store the bootstrap's {"bucket", "key_prefix"} params name (they have the same shape for all three).
ENV_BLOB_STORE = "PIPES_EXT_BLOB_STORE"
BLOB_STORES = ("s3", "gcs", "azure")

# The methods a program may send through exec; exec sends opened and closed itself.
RELAYED_METHODS = (METHOD_LOG, METHOD_REPORT_ASSET_MATERIALIZATION, METHOD_REPORT_ASSET_CHECK,
                   METHOD_REPORT_CUSTOM_MESSAGE, METHOD_LOG_EXTERNAL_STREAM)
# A line for exec itself, not relayed (`pipes-ext sync`): exec writes one byte to the named pipe PARAM_REPLY once
# it has handed every line before this one to the messages channel.
METHOD_SYNC = "pipes_ext.sync"
PARAM_REPLY = "reply"
# How long `pipes-ext sync` waits for exec's answer by default: exec answers at once unless the channel is slow.
DEFAULT_SYNC_TIMEOUT = 60.0

EXIT_OK = 0
EXIT_ERROR = 1  # the environment: not under exec, the session cannot be opened
EXIT_USAGE = 2  # bad input: nothing was sent
EXIT_CANNOT_EXECUTE = 126  # the shell's statuses for a command that cannot be run
EXIT_NOT_FOUND = 127

# Signals exec passes on to CMD's process group (CMD runs in a group of its own, so that a signal sent to exec's
# group is not delivered twice). SIGKILL cannot be caught: CMD then gets SIGKILL from the kernel (PR_SET_PDEATHSIG).
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
# The end of CMD's stderr kept for the failure report: a few lines say what went wrong; bounded whatever CMD writes.
STDERR_TAIL_BYTES = 8 * 1024
STDERR_TAIL_LINES = 10
# The longest line exec takes from CMD: the orchestrator's own default line limit (pipes_core's
# DEFAULT_MAX_LINE_BYTES), so exec never relays a line the orchestrator would refuse; the rest of a longer line is
# skipped, not kept.
MAX_LINE_BYTES = 64 * 1024 * 1024
# Issues reported one by one before exec only counts them: a program writing garbage in a loop cannot flood the
# orchestrator's log.
MAX_REPORTED_ISSUES = 100
READ_BYTES = 64 * 1024
# A forwarded output stream shared with the stdio messages channel is passed on by whole lines (a message line
# must not land in the middle of CMD's); a line with no newline in this many bytes is passed on as it is.
MAX_FORWARDED_PARTIAL_BYTES = 64 * 1024
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

# Metadata types whose command-line value is the string as given; the others are parsed (see _metadata_value).
_JSON_TYPES = frozenset({METADATA_TYPE_INFER, "json", "table", "table_schema", "table_column_lineage"})
_BOOL_VALUES = {"true": True, "false": False}
_NULL_VALUES = ("", "null")


class CliError(Exception):
    """Bad input to a subcommand: printed as one line, exit status :data:`EXIT_USAGE`."""


class EnvironmentProblem(Exception):
    """Not under ``exec``, or the session cannot be opened: printed as one line, exit status :data:`EXIT_ERROR`."""


class CommandFailed(Exception):
    """What ``closed`` carries when CMD exits non-zero or is killed (its name is the exception's name)."""


# ----------------------------------------------------------------------------------------------------------------
# The lines a program writes
# ----------------------------------------------------------------------------------------------------------------


def parse_program_line(line: bytes) -> tuple[str, dict[str, Any]]:
    """A program's line: ``{"method": M, "params": {...}}`` (the envelope's version field may be there, as
    ``"0.1"``). Returns the method and its params.

    Raises:
        PipesProtocolError: the line is not JSON, not an object, names no method exec relays, or has a param
            the method does not have.
    """
    obj = load_message_line(line)
    if not isinstance(obj, dict):
        raise PipesProtocolError(f'expected a JSON object {{"method": ..., "params": {{...}}}}, got {_what(obj)}',
                                 _Kind.NOT_OBJECT)
    unknown = sorted(set(obj) - {MESSAGE_METHOD_FIELD, MESSAGE_PARAMS_FIELD, PIPES_PROTOCOL_VERSION_FIELD})
    if unknown:
        raise PipesProtocolError(f'unknown key(s) {unknown}: a line has "method" and "params"', _Kind.BAD_PARAMS)
    version = obj.get(PIPES_PROTOCOL_VERSION_FIELD, PIPES_PROTOCOL_VERSION)
    if version != PIPES_PROTOCOL_VERSION:
        raise PipesProtocolError(f'"{PIPES_PROTOCOL_VERSION_FIELD}" is {version!r}; only "0.1" is spoken here',
                                 _Kind.BAD_VERSION)
    method = obj.get(MESSAGE_METHOD_FIELD)
    if method == METHOD_SYNC:
        params = obj.get(MESSAGE_PARAMS_FIELD)
        if not (isinstance(params, dict) and isinstance(params.get(PARAM_REPLY), str)):
            raise PipesProtocolError(f'{METHOD_SYNC}: params must be {{"{PARAM_REPLY}": PATH}}', _Kind.BAD_PARAMS)
        return method, params
    if method in (METHOD_OPENED, METHOD_CLOSED):
        raise PipesProtocolError(f'"{method}" is sent by pipes-ext exec itself; a program sends one of '
                                 f"{', '.join(RELAYED_METHODS)}", _Kind.BAD_METHOD)
    if method not in RELAYED_METHODS:
        raise PipesProtocolError(f'"method" must be one of {", ".join(RELAYED_METHODS)}, got {_short(method)}',
                                 _Kind.UNKNOWN_METHOD)
    params = obj.get(MESSAGE_PARAMS_FIELD)
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise PipesProtocolError(f'{method}: "params" must be an object, got {_what(params)}', _Kind.BAD_PARAMS)
    known = [spec.name for spec in METHOD_SPECS[method].params]
    extra = sorted(set(params) - set(known))
    if extra:
        raise PipesProtocolError(f"{method}: unknown param(s) {extra} (known: {', '.join(known)})", _Kind.BAD_PARAMS)
    return method, params


def _what(value: object) -> str:
    return "an array" if isinstance(value, list) else type(value).__name__ if value is not None else "null"


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def relay(context: PipesContext, method: str, params: Mapping[str, Any]) -> None:
    """Send one program message through ``context``, validated as the context validates its own calls.

    Raises:
        PipesUsageError: a param of the wrong type or value, an asset outside the run, a second
            materialization of an asset.
    """
    if method == METHOD_SYNC:
        _answer_sync(params[PARAM_REPLY])
    elif method == METHOD_REPORT_CUSTOM_MESSAGE:
        if PARAM_PAYLOAD not in params:
            raise PipesUsageError(f'{method}: missing param "{PARAM_PAYLOAD}" (any JSON value)')
        context.report_custom_message(params[PARAM_PAYLOAD])
    elif method == METHOD_LOG:
        message = params.get(PARAM_MESSAGE)
        if not isinstance(message, str):
            raise PipesUsageError(f'{method}: "{PARAM_MESSAGE}" must be a string')
        given = params.get(PARAM_LEVEL)
        level = normalize_log_level(DEFAULT_LOG_LEVEL if given is None else given)
        if level is None:
            raise PipesUsageError(f'{method}: unknown "{PARAM_LEVEL}" {_short(params.get(PARAM_LEVEL))} '
                                  "(DEBUG, INFO, WARNING, ERROR or CRITICAL)")
        context._log(level, message)
    elif method == METHOD_REPORT_ASSET_MATERIALIZATION:
        context.report_asset_materialization(params.get(PARAM_METADATA), params.get(PARAM_DATA_VERSION),
                                             params.get(PARAM_ASSET_KEY))
    elif method == METHOD_REPORT_ASSET_CHECK:
        if PARAM_CHECK_NAME not in params or PARAM_PASSED not in params:
            raise PipesUsageError(f'{method}: "{PARAM_CHECK_NAME}" and "{PARAM_PASSED}" are required')
        severity = params.get(PARAM_SEVERITY)
        context.report_asset_check(params[PARAM_CHECK_NAME], params[PARAM_PASSED],
                                   SEVERITY_ERROR if severity is None else severity, params.get(PARAM_METADATA),
                                   params.get(PARAM_ASSET_KEY))
    else:  # METHOD_LOG_EXTERNAL_STREAM
        extras = params.get(PARAM_EXTRAS)
        if extras is not None and not isinstance(extras, dict):
            raise PipesUsageError(f'{method}: "{PARAM_EXTRAS}" must be an object')
        context.log_external_stream(params.get(PARAM_STREAM), params.get(PARAM_TEXT), extras)  # type: ignore[arg-type]


def _answer_sync(path: str) -> None:
    """Tell a waiting ``pipes-ext sync`` that the lines before its own were sent (a pipe with no reader: it gave
    up waiting, nothing to do)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise PipesUsageError(f"{METHOD_SYNC}: cannot answer at {path!r}: {exc.strerror}") from exc
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            raise PipesUsageError(f"{METHOD_SYNC}: {path!r} is not a named pipe")
        os.write(fd, b"\n")
    finally:
        os.close(fd)


class _Relay:
    """Takes CMD's message lines (from the I/O thread) and sends them, or reports why not."""

    def __init__(self, context: PipesContext, err: Callable[[str], None]) -> None:
        self.context = context
        self.err = err
        self.lines = 0
        self.issues = 0

    def line(self, data: bytes) -> None:
        self.lines += 1
        if not data.strip(b" \t\r"):
            return  # a blank line is not an issue
        try:
            method, params = parse_program_line(data)
            relay(self.context, method, params)
        except (PipesProtocolError, PipesUsageError) as exc:
            self.issue(f"line {self.lines} ignored: {exc}")
        except PipesError as exc:  # the channel itself failed: said here, the run goes on
            self.err(f"pipes-ext exec: line {self.lines} could not be sent: {exc}")

    def too_long(self) -> None:
        self.lines += 1
        self.issue(f"line {self.lines} ignored: longer than {MAX_LINE_BYTES} bytes (the orchestrator's line limit)")

    def issue(self, text: str) -> None:
        self.issues += 1
        if self.issues <= MAX_REPORTED_ISSUES:
            self._report(text)

    def _report(self, text: str) -> None:
        text = (f"pipes-ext exec: {text} (each line written to ${ENV_MESSAGES_FD} or ${ENV_MESSAGES_FILE} is one "
                'JSON object {"method": ..., "params": {...}}; see pipes-ext --help)')
        self.err(text)
        try:
            self.context._log("WARNING", text)
        except PipesError as exc:
            self.err(f"pipes-ext exec: cannot report it to the orchestrator: {exc}")

    def finish(self) -> None:
        if self.issues > MAX_REPORTED_ISSUES:
            self._report(f"{self.issues} lines were ignored in all; only the first {MAX_REPORTED_ISSUES} were "
                         "reported one by one")


class _Lines:
    """Splits a byte stream into lines, keeping at most ``limit`` bytes of an unfinished one."""

    def __init__(self, on_line: Callable[[bytes], None], on_too_long: Callable[[], None], limit: int) -> None:
        self.on_line = on_line
        self.on_too_long = on_too_long
        self.limit = limit
        self.pending = bytearray()
        self.skipping = False

    def feed(self, data: bytes) -> None:
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                break
            if self.skipping:
                self.skipping = False
            elif len(self.pending) + end - start > self.limit:
                self.on_too_long()
            else:
                self.pending += data[start:end]
                self.on_line(bytes(self.pending))
            self.pending.clear()
            start = end + 1
        if not self.skipping:
            self.pending += data[start:]
            if len(self.pending) > self.limit:
                self.pending.clear()
                self.skipping = True
                self.on_too_long()

    def end(self) -> None:
        if self.pending:
            self.on_line(bytes(self.pending))
            self.pending.clear()


class _Output:
    """Passes CMD's output on to one of exec's own streams: at once, or by whole lines under the channel's lock
    when the stdio messages channel writes to that stream too (a message must not land inside CMD's line)."""

    def __init__(self, stream: Any, lock: Any | None) -> None:
        self.stream = stream
        self.lock = lock
        self.pending = bytearray()

    def feed(self, data: bytes) -> None:
        if self.lock is None:
            self._raw(data)
            return
        self.pending += data
        cut = self.pending.rfind(b"\n") + 1
        if not cut:
            if len(self.pending) <= MAX_FORWARDED_PARTIAL_BYTES:
                return
            cut = len(self.pending)  # a partial line past the bound: passed on as it is
        chunk = bytes(self.pending[:cut])
        del self.pending[:cut]
        with self.lock:
            self._raw(chunk)

    def _raw(self, data: bytes) -> None:
        try:
            self.stream.flush()
            self.stream.buffer.write(data)
            self.stream.buffer.flush()
        except (OSError, ValueError):
            pass  # our own stream is gone: CMD's output has nowhere to go, the run goes on

    def end(self) -> None:
        if self.pending:
            chunk = bytes(self.pending)
            self.pending.clear()
            if self.lock is None:
                self._raw(chunk)
            else:
                with self.lock:
                    self._raw(chunk)


class _Tail:
    """The last :data:`STDERR_TAIL_BYTES` of a stream."""

    def __init__(self) -> None:
        self.data = bytearray()

    def feed(self, data: bytes) -> None:
        self.data += data[-STDERR_TAIL_BYTES:]
        del self.data[:-STDERR_TAIL_BYTES]

    def last_lines(self) -> list[str]:
        text = self.data.decode("utf-8", "replace")
        return [line for line in text.splitlines() if line.strip()][-STDERR_TAIL_LINES:]


class _Pump(threading.Thread):
    """One thread reading every pipe from CMD until told CMD has exited, then draining what they hold."""

    def __init__(self, sources: dict[int, tuple[Callable[[bytes], None], Callable[[], None]]]) -> None:
        super().__init__(name="pipes-ext-exec", daemon=True)
        self.sources = sources
        self.wake_r, self.wake_w = os.pipe()
        self.error: BaseException | None = None

    def stop(self) -> None:
        os.write(self.wake_w, b"x")

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by exec after the join
            self.error = exc

    def _run(self) -> None:
        with selectors.DefaultSelector() as selector:
            for fd in self.sources:
                selector.register(fd, selectors.EVENT_READ)
            selector.register(self.wake_r, selectors.EVENT_READ)
            stopping = False
            while selector.get_map() and not stopping:
                for key, _ in selector.select():
                    if key.fd == self.wake_r:
                        stopping = True
                    elif not self._read(key.fd):
                        selector.unregister(key.fd)
            # CMD has exited: what it wrote is in the pipes; a process it left behind may still hold them open.
            registered = selector.get_map()
            for fd in [fd for fd in self.sources if fd in registered]:
                os.set_blocking(fd, False)
                while self._read(fd):
                    pass
        for _feed, end in self.sources.values():
            end()

    def _read(self, fd: int) -> bool:
        try:
            data = os.read(fd, READ_BYTES)
        except BlockingIOError:
            return False
        if not data:
            return False
        try:
            self.sources[fd][0](data)
        except Exception as exc:  # never stop reading: CMD would block on a full pipe
            if self.error is None:
                self.error = exc
        return True

    def close(self) -> None:
        for fd in (self.wake_r, self.wake_w):
            os.close(fd)


# ----------------------------------------------------------------------------------------------------------------
# exec
# ----------------------------------------------------------------------------------------------------------------


def _split_bootstrap_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the arguments without the CLI bootstrap flags, the flags with their values), wherever they are."""
    flags = (DAGSTER_PIPES_CONTEXT_CLI_ARGUMENT, DAGSTER_PIPES_MESSAGES_CLI_ARGUMENT)
    rest: list[str] = []
    found: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg in flags and index + 1 < len(argv):
            found += argv[index:index + 2]
            index += 2
            continue
        if any(arg.startswith(flag + "=") for flag in flags):
            found.append(arg)
        else:
            rest.append(arg)
        index += 1
    return rest, found


class _CaptureStdioParams(PipesParamsLoader):
    """The bootstrap params with ``include_stdio_in_messages`` set (``exec --capture-stdio``)."""

    def __init__(self, inner: PipesParamsLoader) -> None:
        self.inner = inner

    def get_raw(self, name: str) -> str | None:
        return self.inner.get_raw(name)

    def describe(self, name: str) -> str:
        return self.inner.describe(name)

    def load_messages_params(self) -> dict[str, Any]:
        return {**self.inner.load_messages_params(), PARAM_INCLUDE_STDIO_IN_MESSAGES: True}


def _blob_channels(loader: PipesParamsLoader, store: str | None
                   ) -> tuple[PipesContextLoader | None, PipesMessageWriter | None]:
    """A blob-store context loader / message writer where the params name a bucket; None: the defaults."""
    if not loader.is_pipes_process():
        return None, None
    on_context = PARAM_BUCKET in loader.load_context_params()
    on_messages = PARAM_BUCKET in loader.load_messages_params()
    if not (on_context or on_messages):
        return None, None
    if store is None:
        raise EnvironmentProblem(f"the bootstrap names a bucket, but not its store: pass --blob-store "
                                 f"{'|'.join(BLOB_STORES)} (or set ${ENV_BLOB_STORE})")
    if store == "s3":
        from .s3 import PipesS3ContextLoader as Loader
        from .s3 import PipesS3MessageWriter as Writer
    elif store == "gcs":
        from .gcs import PipesGCSContextLoader as Loader  # type: ignore[assignment]
        from .gcs import PipesGCSMessageWriter as Writer  # type: ignore[assignment]
    else:
        from .azure import PipesAzureBlobStorageContextLoader as Loader  # type: ignore[assignment]
        from .azure import PipesAzureBlobStorageMessageWriter as Writer  # type: ignore[assignment]
    return (Loader() if on_context else None), (Writer() if on_messages else None)


def _open_session(bootstrap: list[str], capture_stdio: bool, store: str | None) -> PipesContext:
    loader: PipesParamsLoader = PipesCliArgsParamsLoader(bootstrap) if bootstrap else PipesEnvVarParamsLoader()
    if capture_stdio:
        loader = _CaptureStdioParams(loader)
    context_loader, message_writer = _blob_channels(loader, store)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        context = open_pipes(context_loader=context_loader, message_writer=message_writer, params_loader=loader)
    for warning in caught:
        print(f"pipes-ext exec: warning: {warning.message}", file=sys.stderr, flush=True)
    return context


def _child_setup(libc: Any, parent: int) -> Callable[[], None]:
    def setup() -> None:
        os.setpgid(0, 0)
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent:  # exec died before prctl took effect
                os._exit(EXIT_ERROR)
    return setup


def _load_libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True)
    except (ImportError, OSError):  # pragma: no cover - a Linux without a loadable libc
        return None


def _describe_command(command: Sequence[str]) -> str:
    import shlex

    return shlex.join(command)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def run_exec(command: list[str], bootstrap: list[str], capture_stdio: bool, store: str | None) -> int:
    """``pipes-ext exec``: returns the exit status, or ends this process with CMD's signal."""
    try:
        context = _open_session(bootstrap, capture_stdio, store)
    except (PipesError, OSError) as exc:
        raise EnvironmentProblem(f"cannot open the Pipes session: {exc}") from exc
    workdir = tempfile.mkdtemp(prefix="pipes-ext-")
    try:
        status = _run_in_session(context, command, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if status < 0:
        _die_like(-status)
    return status


def _run_in_session(context: PipesContext, command: list[str], workdir: str) -> int:
    import subprocess

    context_file = os.path.join(workdir, "context.json")
    with open(context_file, "w", encoding="utf-8") as f:
        json.dump(context.context_data, f)
    fifo = os.path.join(workdir, "messages")
    os.mkfifo(fifo, 0o600)
    read_fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    keep_fd = os.open(fifo, os.O_WRONLY | os.O_CLOEXEC)  # held, so the pipe never reads as ended
    child_fd = os.open(fifo, os.O_WRONLY)
    os.set_inheritable(child_fd, True)

    channel = context._channel
    lock = getattr(channel, "_lock", None) if isinstance(channel, PipesStreamMessageWriterChannel) else None
    stdout_lock = lock if lock is not None and getattr(channel, "_stream", None) is sys.stdout else None
    stderr_lock = lock if lock is not None and getattr(channel, "_stream", None) is sys.stderr else None

    def err(text: str) -> None:
        out = _Output(sys.stderr, stderr_lock)
        out.feed((text + "\n").encode("utf-8", "backslashreplace"))

    env = {k: v for k, v in os.environ.items() if k not in (DAGSTER_PIPES_CONTEXT_ENV_VAR,
                                                             DAGSTER_PIPES_MESSAGES_ENV_VAR)}
    env.update({ENV_MESSAGES_FD: str(child_fd), ENV_MESSAGES_FILE: fifo, ENV_CONTEXT_FILE: context_file})
    parent = os.getpid()
    started: list[int] = []  # CMD's pid (its process group's id), once started
    pending: list[int] = []  # signals that came before: passed on as soon as CMD runs

    def forward(signum: int, frame: object) -> None:
        if not started:
            pending.append(signum)
            return
        try:
            os.killpg(started[0], signum)
        except (ProcessLookupError, PermissionError):
            pass

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        proc = subprocess.Popen(command, env=env, pass_fds=(child_fd,), stderr=subprocess.PIPE,
                                stdout=subprocess.PIPE if stdout_lock is not None else None,
                                preexec_fn=_child_setup(_load_libc(), parent))
    except OSError as exc:
        _restore(previous)
        for fd in (read_fd, keep_fd, child_fd):
            os.close(fd)
        status = EXIT_NOT_FOUND if isinstance(exc, FileNotFoundError) else EXIT_CANNOT_EXECUTE
        not_started = CommandFailed(f"command {_describe_command(command)!r} could not be started: "
                                    f"{exc.strerror or exc}")
        err(f"pipes-ext exec: {not_started}")
        context.close(not_started)
        for signum in pending:
            _die_like(signum)
        return status
    started.append(proc.pid)
    for signum in pending:
        forward(signum, None)
    os.close(child_fd)
    relay_lines = _Relay(context, err)
    tail = _Tail()
    stderr_out = _Output(sys.stderr, stderr_lock)

    def on_stderr(data: bytes) -> None:
        tail.feed(data)
        stderr_out.feed(data)

    assert proc.stderr is not None
    program_lines = _Lines(relay_lines.line, relay_lines.too_long, MAX_LINE_BYTES)
    sources: dict[int, tuple[Callable[[bytes], None], Callable[[], None]]] = {
        read_fd: (program_lines.feed, program_lines.end),  # end: a last line without its newline
        proc.stderr.fileno(): (on_stderr, stderr_out.end),
    }
    if proc.stdout is not None:
        stdout_out = _Output(sys.stdout, stdout_lock)
        sources[proc.stdout.fileno()] = (stdout_out.feed, stdout_out.end)
    pump = _Pump(sources)
    pump.start()
    try:
        returncode = proc.wait()
    finally:
        pump.stop()
        pump.join()
        _restore(previous)
        pump.close()
        for fd in (read_fd, keep_fd):
            os.close(fd)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    if pump.error is not None:
        err(f"pipes-ext exec: error: handling the command's output failed: {pump.error!r}; what could not be "
            "handled was dropped, the rest was sent")
    relay_lines.finish()
    failure: CommandFailed | None = None
    if returncode != 0:
        how = (f"was killed by {_signal_name(-returncode)}" if returncode < 0
               else f"exited with status {returncode}")
        lines = tail.last_lines()
        detail = "; last stderr lines:\n" + "\n".join(lines) if lines else "; it wrote nothing to stderr"
        failure = CommandFailed(f"command {_describe_command(command)!r} {how}{detail}")
    try:
        context.close(failure)
    except PipesError as exc:  # e.g. the last blob-store upload failed
        err(f"pipes-ext exec: error: could not close the Pipes session ({exc}); what was not sent is lost and the "
            "orchestrator may report the session as unclosed")
        return returncode or EXIT_ERROR
    return returncode


def _restore(handlers: Mapping[signal.Signals, Any]) -> None:
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


def _die_like(signum: int) -> NoReturn:
    """End this process with ``signum``, as CMD ended (an uncatchable or ignored signal: 128 + its number)."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        if signum not in (signal.SIGKILL, signal.SIGSTOP):  # those two have no handler to reset
            signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    except (OSError, ValueError):
        pass
    os._exit(128 + signum)


# ----------------------------------------------------------------------------------------------------------------
# Subcommands (for programs under exec)
# ----------------------------------------------------------------------------------------------------------------


def _under_exec_context() -> dict[str, Any]:
    path = os.environ.get(ENV_CONTEXT_FILE)
    if not path:
        raise EnvironmentProblem(f"${ENV_CONTEXT_FILE} is not set: run this inside `pipes-ext exec -- COMMAND`")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        return validate_context_data(loads_json_document(text, f"context file {path!r}"))
    except (OSError, PipesError) as exc:
        raise EnvironmentProblem(f"cannot read ${ENV_CONTEXT_FILE}: {exc}") from exc


def _open_program_channel() -> PipesFileMessageWriterChannel:
    """The messages pipe of the enclosing exec: the inherited descriptor when it is still that pipe, else the
    named pipe."""
    path = os.environ.get(ENV_MESSAGES_FILE)
    if not path:
        raise EnvironmentProblem(f"${ENV_MESSAGES_FILE} is not set: run this inside `pipes-ext exec -- COMMAND`")
    try:
        named = os.stat(path)
    except OSError as exc:
        raise EnvironmentProblem(f"${ENV_MESSAGES_FILE} ({path}) is gone: the pipes-ext exec that set it has "
                                 f"ended ({exc.strerror})") from exc
    fd_text = os.environ.get(ENV_MESSAGES_FD, "")
    if fd_text.isdigit():
        try:
            inherited = os.fstat(int(fd_text))
        except OSError:
            pass
        else:
            if (inherited.st_ino, inherited.st_dev) == (named.st_ino, named.st_dev):
                return PipesFileMessageWriterChannel(os.dup(int(fd_text)), path)
    if not stat.S_ISFIFO(named.st_mode):
        raise EnvironmentProblem(f"${ENV_MESSAGES_FILE} ({path}) is not the pipe pipes-ext exec made")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        os.set_blocking(fd, True)
    except OSError as exc:
        raise EnvironmentProblem(f"cannot open ${ENV_MESSAGES_FILE} ({path}): {exc.strerror}; the pipes-ext exec "
                                 "that set it has ended") from exc
    return PipesFileMessageWriterChannel(fd, path)


def _send(report: Callable[[PipesContext], None]) -> int:
    """Validate and send one message as a program under exec: ``report`` calls a method of a context that is
    never opened or closed (exec does that)."""
    data = _under_exec_context()
    channel = _open_program_channel()
    try:
        report(PipesContext(data, channel))
    except PipesUsageError as exc:
        raise CliError(str(exc)) from exc
    except PipesError as exc:
        raise EnvironmentProblem(str(exc)) from exc
    finally:
        channel.close()
    return EXIT_OK


def _metadata_value(spec: str) -> tuple[str, Any]:
    """``KEY=VALUE`` (text) or ``KEY:TYPE=VALUE`` -> (label, wire entry)."""
    left, equals, value = spec.partition("=")
    if not equals or not left:
        raise CliError(f"--metadata {spec!r}: expected KEY=VALUE or KEY:TYPE=VALUE")
    label, colon, kind = left.rpartition(":")
    if not colon or kind not in METADATA_TYPES:
        if colon and label:
            raise CliError(f"--metadata {spec!r}: unknown type {kind!r} (known: {', '.join(METADATA_TYPES)}); "
                           "for a key with a colon and a text value, write KEY:text=VALUE")
        return left, {"raw_value": value, "type": "text"}
    raw: Any
    if kind in _STRING_METADATA_TYPES:
        raw = value
    elif kind == "int":
        try:
            raw = int(value)
        except ValueError:
            raise CliError(f"--metadata {spec!r}: {value!r} is not an integer") from None
    elif kind in ("float", "timestamp"):
        try:
            raw = float(value)
        except ValueError:
            raise CliError(f"--metadata {spec!r}: {value!r} is not a number") from None
        if not math.isfinite(raw):
            raise CliError(f"--metadata {spec!r}: {value!r} is not a finite number (JSON has no {value})")
    elif kind == "bool":
        if value.lower() not in _BOOL_VALUES:
            raise CliError(f"--metadata {spec!r}: a bool is true or false, got {value!r}")
        raw = _BOOL_VALUES[value.lower()]
    elif kind == "null":
        if value not in _NULL_VALUES:
            raise CliError(f"--metadata {spec!r}: a null entry has no value (KEY:null= or KEY:null=null)")
        raw = None
    else:  # _JSON_TYPES
        raw = _json_arg(value, f"--metadata {label}:{kind}")
    return label, {"raw_value": raw, "type": kind}


def _json_arg(text: str, what: str) -> Any:
    try:
        return loads_json_document(text, what)
    except PipesProtocolError as exc:
        raise CliError(f"{exc} (quote it for the shell, e.g. '{{\"a\": 1}}')") from exc


def _metadata(specs: Sequence[str]) -> dict[str, Any] | None:
    out: dict[str, Any] = {}
    for spec in specs:
        label, entry = _metadata_value(spec)
        if label in out:
            raise CliError(f"--metadata: {label!r} is given twice")
        out[label] = entry
    return out or None


def _cmd_log(args: argparse.Namespace) -> int:
    level = normalize_log_level(args.level)
    if level is None:
        raise CliError(f"--level {args.level!r}: expected DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return _send(lambda c: c._log(level, args.message))


def _cmd_materialize(args: argparse.Namespace) -> int:
    metadata = _metadata(args.metadata)
    return _send(lambda c: c.report_asset_materialization(metadata, args.data_version, args.asset))


def _cmd_check(args: argparse.Namespace) -> int:
    metadata = _metadata(args.metadata)
    return _send(lambda c: c.report_asset_check(args.name, args.passed, args.severity, metadata, args.asset))


def _cmd_message(args: argparse.Namespace) -> int:
    payload = _json_arg(args.json, "the message")
    return _send(lambda c: c.report_custom_message(payload))


def _cmd_sync(args: argparse.Namespace) -> int:
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise CliError("--timeout must be a positive number of seconds")
    _under_exec_context()
    channel = _open_program_channel()
    workdir = tempfile.mkdtemp(prefix="pipes-ext-sync-")
    try:
        reply = os.path.join(workdir, "reply")
        os.mkfifo(reply, 0o600)
        fd = os.open(reply, os.O_RDWR | os.O_CLOEXEC)  # read-write: the pipe never reads as ended while we wait
        try:
            channel.write_line(json.dumps({MESSAGE_METHOD_FIELD: METHOD_SYNC,
                                           MESSAGE_PARAMS_FIELD: {PARAM_REPLY: reply}}))
            with selectors.DefaultSelector() as selector:
                selector.register(fd, selectors.EVENT_READ)
                if not selector.select(args.timeout):
                    raise EnvironmentProblem(f"pipes-ext exec did not answer within {args.timeout:g} s; is it "
                                             "still running? (--timeout SECONDS waits longer)")
        finally:
            os.close(fd)
    except PipesError as exc:
        raise EnvironmentProblem(str(exc)) from exc
    finally:
        channel.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return EXIT_OK


def _cmd_extra(args: argparse.Namespace) -> int:
    extras = _under_exec_context()[CONTEXT_EXTRAS]
    if args.key not in extras:
        raise CliError(f"no extra {args.key!r} in this run (extras: {', '.join(sorted(extras)) or 'none'})")
    print(json.dumps(extras[args.key]))
    return EXIT_OK


def _cmd_context(args: argparse.Namespace) -> int:
    print(json.dumps(_under_exec_context()))
    return EXIT_OK


# ----------------------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------------------

_EPILOG = f"""\
under exec, CMD reports by writing one JSON object per line to ${ENV_MESSAGES_FD} (a descriptor) or
${ENV_MESSAGES_FILE} (a path), e.g.
  echo '{{"method": "report_asset_materialization", "params": {{"metadata": {{"rows": 42}}}}}}' >&"${ENV_MESSAGES_FD}"
or through the subcommands, e.g.
  pipes-ext materialize --asset orders --metadata rows:int=42
methods: {', '.join(RELAYED_METHODS)}; the context document is at ${ENV_CONTEXT_FILE}.
exit status: exec, CMD's; the subcommands, 0, 1 (not under exec) or 2 (bad input, nothing sent)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Pipes for any program: run a command in a Pipes "
                                     "session and report from it without an SDK.", epilog=_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    run = sub.add_parser("exec", help="run CMD in the Pipes session: exec [--capture-stdio] -- CMD [ARG]...",
                         usage=f"{PROG} exec [-h] [--capture-stdio] [--blob-store STORE] -- CMD [ARG]...",
                         description="Open the Pipes session from the bootstrap (the environment, or the "
                                     "--dagster-pipes-* arguments wherever they are), run CMD, relay what it "
                                     "reports, forward signals to it, close the session and exit with CMD's status.",
                         epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--capture-stdio", action="store_true",
                     help="also send CMD's stdout and stderr as log_external_stream messages")
    run.add_argument("--blob-store", choices=BLOB_STORES, default=os.environ.get(ENV_BLOB_STORE) or None,
                     help=f"the store of a bootstrap that names a bucket (default: ${ENV_BLOB_STORE})")
    run.add_argument("command", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    log = sub.add_parser("log", help="send a log message")
    log.add_argument("--level", default=DEFAULT_LOG_LEVEL, help="DEBUG, INFO (default), WARNING, ERROR, CRITICAL")
    log.add_argument("message")
    log.set_defaults(handler=_cmd_log)

    metadata_help = "KEY=VALUE (text) or KEY:TYPE=VALUE (int, float, bool, json, url, path, md, timestamp, ...)"
    materialize = sub.add_parser("materialize", help="report an asset materialization")
    materialize.add_argument("--asset", metavar="KEY", help="the asset key (default: the run's only asset)")
    materialize.add_argument("--data-version", metavar="V")
    materialize.add_argument("--metadata", metavar="ENTRY", action="append", default=[], help=metadata_help)
    materialize.set_defaults(handler=_cmd_materialize)

    check = sub.add_parser("check", help="report an asset check result")
    check.add_argument("name")
    outcome = check.add_mutually_exclusive_group(required=True)
    outcome.add_argument("--passed", dest="passed", action="store_true")
    outcome.add_argument("--failed", dest="passed", action="store_false")
    check.add_argument("--severity", choices=SEVERITIES, default=SEVERITY_ERROR)
    check.add_argument("--asset", metavar="KEY", help="the asset key (default: the run's only asset)")
    check.add_argument("--metadata", metavar="ENTRY", action="append", default=[], help=metadata_help)
    check.set_defaults(handler=_cmd_check)

    message = sub.add_parser("message", help="send a custom message whose payload is JSON")
    message.add_argument("json", metavar="JSON")
    message.set_defaults(handler=_cmd_message)

    sync = sub.add_parser("sync", help="wait until exec has sent everything written before (e.g. before a step "
                                       "that may kill exec)")
    sync.add_argument("--timeout", type=float, default=DEFAULT_SYNC_TIMEOUT, metavar="SECONDS",
                      help="give up after this long (default %(default)g), exit status 1")
    sync.set_defaults(handler=_cmd_sync)

    extra = sub.add_parser("extra", help="print one extra of the run, as JSON")
    extra.add_argument("key", metavar="KEY")
    extra.set_defaults(handler=_cmd_extra)

    context = sub.add_parser("context", help="print the context document, as JSON")
    context.set_defaults(handler=_cmd_context)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    try:
        if args_list[:1] == ["exec"]:
            return _main_exec(args_list[1:])
        args = _parser().parse_args(args_list)
        return int(args.handler(args))
    except CliError as exc:
        print(f"{PROG} {args_list[0]}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except EnvironmentProblem as exc:
        print(f"{PROG} {args_list[0] if args_list else ''}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 128 + signal.SIGINT


def _main_exec(argv: list[str]) -> int:
    argv, bootstrap = _split_bootstrap_args(argv)
    command: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1:]
    parser = _parser()
    args = parser.parse_args(["exec", *argv])
    command = command or list(args.command)
    if not command:
        raise CliError("no command to run; usage: pipes-ext exec [--capture-stdio] -- CMD [ARG]...")
    return run_exec(command, bootstrap, args.capture_stdio, args.blob_store)
