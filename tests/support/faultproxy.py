"""A small fault-injecting HTTP proxy for blob-store tests: sits between a client and a real local server.

    with FaultProxy("http://127.0.0.1:9000") as proxy:      # proxy.url -> http://127.0.0.1:<free port>
        proxy.fail_next(3, status=503)                      # the next 3 requests get a 503, not forwarded
        proxy.drop_next(2)                                  # the next 2 connections are closed with no answer
        proxy.delay_next(1, seconds=2.0)                    # the next request is forwarded after 2 s
        proxy.fail_matching("/3.json", status=503, count=5) # requests whose path contains "/3.json"

Rules are consumed in order; ``proxy.requests`` counts every request seen, ``proxy.faults`` the ones faulted.
Only loopback addresses are used.
"""

from __future__ import annotations

import http.client
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
               "transfer-encoding", "upgrade"}


@dataclass
class _Rule:
    kind: str  # "fail" | "drop" | "delay"
    count: int
    status: int = 503
    seconds: float = 0.0
    path_contains: str | None = None
    method: str | None = None


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        assert parts.hostname in ("127.0.0.1", "localhost"), "the proxy only forwards to loopback servers"
        self.upstream_host = parts.hostname
        self.upstream_port = parts.port or 80
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()
        self.requests = 0
        self.faults = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                rule = proxy._take_rule(self.command, self.path)
                if rule is not None and rule.kind == "drop":
                    self.close_connection = True
                    self.connection.close()
                    return
                if rule is not None and rule.kind == "fail":
                    payload = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>ServiceUnavailable</Code>"
                               b"<Message>injected fault</Message></Error>")
                    self.send_response(rule.status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if rule is not None and rule.kind == "delay":
                    time.sleep(rule.seconds)
                conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                conn.request(self.command, self.path, body=body if body or length else None, headers=headers)
                response = conn.getresponse()
                data = response.read()
                self.send_response_only(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _handle

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: object, client_address: object) -> None:
                # A client that gives up on a delayed or dropped request resets the connection: expected here.
                if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
                    super().handle_error(request, client_address)  # type: ignore[arg-type]

        self._server = Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _take_rule(self, method: str, path: str) -> _Rule | None:
        with self._lock:
            self.requests += 1
            for rule in self._rules:
                if rule.path_contains is not None and rule.path_contains not in path:
                    continue
                if rule.method is not None and rule.method != method:
                    continue
                rule.count -= 1
                if rule.count <= 0:
                    self._rules.remove(rule)
                self.faults += 1
                return rule
            return None

    def fail_next(self, count: int, status: int = 503, *, path_contains: str | None = None,
                  method: str | None = None) -> None:
        with self._lock:
            self._rules.append(_Rule("fail", count, status=status, path_contains=path_contains, method=method))

    def fail_matching(self, path_contains: str, status: int = 503, count: int = 1_000_000) -> None:
        self.fail_next(count, status, path_contains=path_contains)

    def drop_next(self, count: int, *, path_contains: str | None = None, method: str | None = None) -> None:
        with self._lock:
            self._rules.append(_Rule("drop", count, path_contains=path_contains, method=method))

    def delay_next(self, count: int, seconds: float, *, path_contains: str | None = None) -> None:
        with self._lock:
            self._rules.append(_Rule("delay", count, seconds=seconds, path_contains=path_contains))

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
