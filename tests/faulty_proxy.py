"""An HTTP proxy in front of the test S3 server that injects the faults object storage has:
errors (HTTP 500, 503), slow responses and dropped connections, for requests matching a
pattern, a given number of times. xclay talks to it as to any S3 endpoint."""

from __future__ import annotations

import http.client
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import pytest

from tests.s3 import S3Server


@dataclass
class Fault:
    """What to do to requests whose ``METHOD path`` matches ``pattern``: answer with
    ``status`` (0: drop the connection), or (``delay``) answer late, ``times`` times
    (``None``: always)."""

    pattern: str
    status: int = 503
    delay: float = 0.0
    times: int | None = 1
    hits: int = 0

    def matches(self, line: str) -> bool:
        return (self.times is None or self.hits < self.times) and bool(
            re.search(self.pattern, line)
        )


@dataclass
class FaultyProxy:
    """The proxy's endpoint, its faults, and a log of what it did."""

    endpoint: str
    faults: list[Fault] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, fault: Fault) -> Fault:
        with self.lock:
            self.faults.append(fault)
        return fault

    def env(self, server: S3Server) -> dict[str, str]:
        return {**server.env, "AWS_ENDPOINT_URL": self.endpoint}

    def take(self, line: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.matches(line):
                    fault.hits += 1
                    self.log.append(f"{fault.status or 'drop'} {line}")
                    return fault
        return None


def _handler(proxy: FaultyProxy, upstream: str) -> type[BaseHTTPRequestHandler]:
    target = urlparse(upstream)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                body = self._read_chunked()
            fault = proxy.take(f"{self.command} {self.path}")
            if fault is not None and fault.delay:
                time.sleep(fault.delay)
            if fault is not None and fault.status == 0:
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            if fault is not None and not fault.delay:
                message = b"<Error><Code>ServiceUnavailable</Code></Error>"
                self.send_response(fault.status)
                self.send_header("Content-Length", str(len(message)))
                self.end_headers()
                self.wfile.write(message)
                return
            conn = http.client.HTTPConnection(str(target.hostname), target.port, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
            headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
            self.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in ("transfer-encoding", "content-length", "connection"):
                    self.send_header(key, value)
            upstream = response.getheader("Content-Length") if self.command == "HEAD" else None
            self.send_header("Content-Length", upstream or str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            conn.close()

        def _read_chunked(self) -> bytes:
            out = b""
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

    return Handler


@pytest.fixture
def faulty_proxy(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultyProxy]:
    """A fault-injecting proxy in front of the S3 server, with this process's environment
    pointing at it."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    proxy = FaultyProxy(f"http://127.0.0.1:{server.server_address[1]}")
    server.RequestHandlerClass = _handler(proxy, s3.endpoint)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    try:
        yield proxy
    finally:
        server.shutdown()
        server.server_close()
