"""Servers for reads by GDAL, each in a process of its own: a static HTTP server with byte
ranges, and the S3 server of tests/s3.py.

GDAL (rasterio) holds the GIL while it waits for some of its HTTP reads, so a server in a
thread of the test process would never answer them: these run as subprocesses. Each
prints its port on its first line and stops when its stdin closes (with the test process
that started it, whatever happens to that).

``python -m tests.servers http FOLDER LOG``: serve FOLDER's files over HTTP/1.1 with
``Range: bytes=A-B`` (206 Partial Content; what GDAL's /vsicurl/ needs: Python's
SimpleHTTPRequestHandler answers every GET with the whole file), one line per request
(``METHOD PATH RANGE``) appended to LOG. ``python -m tests.servers slow-http FOLDER LOG
SECONDS``: the same, each request answered SECONDS late (as object storage answers), its
line ending with how many requests were in flight when it came (itself included).
``python -m tests.servers s3``: moto's S3 server.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


class RangeRequestHandler(SimpleHTTPRequestHandler):
    """Files of a folder, whole or a byte range at a time (no folder listings); each
    request logged to ``log_path``."""

    def __init__(self, *args: Any, directory: str, log_path: Path, **kwargs: Any) -> None:
        self.log_path = log_path  # before the base class's __init__, which answers
        super().__init__(*args, directory=directory, **kwargs)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, *, body: bool) -> None:
        header = self.headers.get("Range", "")
        with self.log_path.open("a") as log:
            log.write(f"{self.command} {self.path} {header}\n")
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        data = path.read_bytes()
        start, end = 0, len(data) - 1
        status = HTTPStatus.OK
        if header:
            match = _RANGE.match(header.strip())
            if match is None or (match.group(1) == "" and match.group(2) == ""):
                self.send_error(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                return
            first, last = match.groups()
            if first == "":  # the last N bytes
                start = max(0, len(data) - int(last))
            else:
                start, end = int(first), min(int(last), end) if last else end
            if start >= len(data) or start > end:
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            status = HTTPStatus.PARTIAL_CONTENT
        stat = path.stat()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{stat.st_mtime_ns:x}-{stat.st_size:x}"')
        self.send_header("Last-Modified", self.date_time_string(int(stat.st_mtime)))
        self.send_header("Content-Length", str(end - start + 1))
        if status == HTTPStatus.PARTIAL_CONTENT:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.end_headers()
        if body:
            self.wfile.write(data[start : end + 1])

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the request log is the file


class SlowRequestHandler(RangeRequestHandler):
    """A :class:`RangeRequestHandler` that answers each request ``delay`` seconds late; its
    log line (``METHOD PATH RANGE IN_FLIGHT``) says how many requests were in flight when it
    came, itself included."""

    in_flight = 0
    counting = threading.Lock()

    def __init__(self, *args: Any, delay: float, slow_log: Path, **kwargs: Any) -> None:
        self.delay, self.slow_log = delay, slow_log
        super().__init__(*args, log_path=Path(os.devnull), **kwargs)

    def _answer(self, *, body: bool) -> None:
        with SlowRequestHandler.counting:
            SlowRequestHandler.in_flight += 1
            now = SlowRequestHandler.in_flight
        try:
            with self.slow_log.open("a") as log:
                log.write(f"{self.command} {self.path} {self.headers.get('Range', '')} {now}\n")
            time.sleep(self.delay)
            super()._answer(body=body)
        finally:
            with SlowRequestHandler.counting:
                SlowRequestHandler.in_flight -= 1


def _serve_http(folder: str, log: str, delay: float | None = None) -> None:
    handler: Any = functools.partial(RangeRequestHandler, directory=folder, log_path=Path(log))
    if delay is not None:
        handler = functools.partial(
            SlowRequestHandler, directory=folder, slow_log=Path(log), delay=delay
        )
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(server.server_address[1], flush=True)
    sys.stdin.read()  # until the test process closes it
    server.shutdown()


def _serve_s3() -> None:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    print(server.get_host_and_port()[1], flush=True)
    sys.stdin.read()
    server.stop()


@contextmanager
def serving(*args: str) -> Iterator[int]:
    """Run ``python -m tests.servers ARGS`` from the repository root; its port."""
    root = Path(__file__).resolve().parents[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.servers", *args],
        cwd=root,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(root)},
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError(f"the {args[0]} server did not start (it said {line!r})")
        yield int(line)
    finally:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()


if __name__ == "__main__":
    if sys.argv[1] == "http":
        _serve_http(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "slow-http":
        _serve_http(sys.argv[2], sys.argv[3], float(sys.argv[4]))
    else:
        _serve_s3()
