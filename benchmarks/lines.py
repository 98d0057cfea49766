"""``python -m benchmarks.lines [--quick] [--json FILE]``: the orchestrator's line path, in-process.

1. handler throughput: a block of small custom messages through ``PipesMessageHandler.handle_lines`` (the
   reader's fast path), messages per second;
2. peak memory (tracemalloc) while a file reader handles one long line under ``max_line_bytes`` whose payload
   is one string, as a multiple of the line's size;
3. peak memory while a file reader skips one line over ``max_line_bytes`` (when the reader has the option).

Run it from two checkouts (``PYTHONPATH=<checkout>``) to compare them; figures on a shared machine are noisy,
so each is a median of several repetitions. Not a test: nothing here asserts on time or memory.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import statistics
import tempfile
import time
import tracemalloc
from typing import Any

from ._report import write_json


def _custom_line(payload: Any) -> bytes:
    message = {"__dagster_pipes_version": "0.1", "method": "report_custom_message", "params": {"payload": payload}}
    return json.dumps(message).encode()


def handler_throughput(n: int, repeat: int) -> list[float]:
    from pipes_core import PipesMessageHandler

    block = b"\n".join(_custom_line({"seq": i, "name": f"item-{i}", "ok": True}) for i in range(n)) + b"\n"
    rates = []
    for _ in range(repeat):
        handler = PipesMessageHandler({}, retain_messages=False, logger=logging.getLogger("bench-lines"))
        started = time.perf_counter()
        handler.handle_lines(block[:-1], "bench")
        rates.append(n / (time.perf_counter() - started))
        assert handler.message_count == n and handler.issue_count == 0
    return rates


def _read_through_file_reader(chunks: list[bytes], **reader_kwargs: Any) -> tuple[int, Any]:
    from pipes_core import PipesEnvContextInjector, PipesFileMessageReader, open_pipes_session

    with tempfile.TemporaryDirectory(prefix="bench-lines-") as tmp:
        path = os.path.join(tmp, "messages")
        tracemalloc.start()
        try:
            with open_pipes_session(None, PipesEnvContextInjector(), PipesFileMessageReader(path, **reader_kwargs),
                                    retain_messages=False) as session:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND)
                for chunk in chunks:
                    os.write(fd, chunk)
                os.close(fd)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    return peak, session


def long_line_peak(size: int) -> float:
    line = _custom_line("p" * size) + b"\n"
    chunks = [line[i:i + (1 << 20)] for i in range(0, len(line), 1 << 20)]
    peak, session = _read_through_file_reader(chunks)
    assert session.message_count == 1 and session.issue_count == 0
    return peak / len(line)


def skip_peak(size: int, limit: int) -> float | None:
    from pipes_core import PipesFileMessageReader

    if "max_line_bytes" not in inspect.signature(PipesFileMessageReader).parameters:
        return None
    piece = b"s" * (1 << 20)
    chunks = [b'{"x": "'] + [piece] * (size >> 20) + [b'"}\n']
    peak, session = _read_through_file_reader(chunks, max_line_bytes=limit)
    assert session.issue_count == 1
    return peak / size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lines", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--repeat", type=int, default=0)
    args = parser.parse_args(argv)
    logging.disable(logging.CRITICAL)  # the sessions here have no child: their warnings are noise
    repeat = args.repeat or (1 if args.quick else 7)
    n = 2_000 if args.quick else 200_000
    size = (2 if args.quick else 48) << 20  # under the default max_line_bytes (64 MiB), envelope included
    rates = handler_throughput(n, repeat)
    peak = long_line_peak(size)
    skipped = skip_peak(size, 1 << 20)
    report = {"handler_msgs_per_s": statistics.median(rates), "handler_samples": rates,
              "long_line_peak_x": peak, "skip_peak_x": skipped, "line_mib": size >> 20}
    print(f"handler throughput ({n:,} small custom messages, median of {repeat}): "
          f"{report['handler_msgs_per_s']:,.0f} msg/s [{min(rates):,.0f} .. {max(rates):,.0f}]")
    print(f"peak while handling one {size >> 20} MiB line (string payload): {peak:.2f}x the line")
    print("peak while skipping it with max_line_bytes=1 MiB: "
          + ("n/a (no max_line_bytes)" if skipped is None else f"{skipped:.3f}x the line"))
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
