"""CPU stand-ins for CuPy, kvikIO and nvCOMP: enough of each library's contract to run
xclay's own GPU code on a machine without CUDA, the order of its work included.

What they model is what makes GPU code silently wrong when it is missed: work queued on a
CUDA stream (a kernel writing an array, an async ``set`` copy from host memory, an nvCOMP
decode) runs *later*, in the order of its stream, not when it is queued. It has run once
its stream, or an event recorded after it, has been synchronised, or once a stream that
waits on that event runs. A read on the host (``get``, ``asnumpy``) waits for the current
stream of the thread that reads, as CuPy's do, and for no other stream. kvikIO's reads are
not stream work: they land at once. Code that hands data from one stream to another
without a wait, or that refills a buffer a queued copy still reads, sees stale or wrong
values here, as it may on a GPU.

Device arrays are NumPy arrays (a subclass): their memory is host memory, and everything
but writes runs at once. nvCOMP refuses the null stream (``cuda_stream=0``), as nvCOMP 6
does. :func:`install` puts them in ``sys.modules`` for one test.
"""

from __future__ import annotations

import importlib.machinery
import itertools
import os
import threading
import types
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# --------------------------------------------------------------------------- streams

_handles = itertools.count(0x7F00)
_local = threading.local()


class Stream:
    """A CUDA stream: work queued in order, run when someone waits for it."""

    def __init__(self, non_blocking: bool = False, *, null: bool = False) -> None:
        self.ptr = 0 if null else next(_handles)
        self.non_blocking = non_blocking
        self._work: deque[Callable[[], None]] = deque()
        self.queued = 0  # how much work was ever queued
        self.done = 0  # how much of it has run
        self._lock = threading.RLock()
        _by_handle[self.ptr] = self

    def launch(self, work: Callable[[], None]) -> None:
        with self._lock:
            self._work.append(work)
            self.queued += 1

    def run_until(self, position: int) -> None:
        with self._lock:
            while self.done < position:
                self._work.popleft()()
                self.done += 1

    def synchronize(self) -> None:
        self.run_until(self.queued)

    def record(self, event: Event | None = None) -> Event:
        event = event if event is not None else Event()
        event.record(self)
        return event

    def wait_event(self, event: Event) -> None:
        self.launch(event.synchronize)

    def __enter__(self) -> Stream:
        _stack().append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _stack().pop()


class Event:
    """A CUDA event: a position in a stream's queue."""

    def __init__(
        self, block: bool = False, disable_timing: bool = False, interprocess: bool = False
    ) -> None:
        self._stream: Stream | None = None
        self._at = 0

    def record(self, stream: Stream | None = None) -> None:
        self._stream = stream if stream is not None else get_current_stream()
        self._at = self._stream.queued

    def synchronize(self) -> None:
        if self._stream is not None:
            self._stream.run_until(self._at)

    @property
    def done(self) -> bool:
        return self._stream is None or self._stream.done >= self._at


_by_handle: dict[int, Stream] = {}
NULL = Stream(null=True)  # the legacy default stream: one per device, shared by threads


def _stack() -> list[Stream]:
    stack: list[Stream] | None = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def get_current_stream() -> Stream:
    stack = _stack()
    return stack[-1] if stack else NULL


def pending() -> int:
    """Work queued on any stream that has not run."""
    return sum(s.queued - s.done for s in _by_handle.values())


# --------------------------------------------------------------------------- arrays


class DeviceArray(np.ndarray):
    """A CuPy array: NumPy memory whose writes (``[...] =``, ``fill``, ``set``) are work
    queued on a stream; ``get`` waits for the current stream."""

    def __setitem__(self, key: Any, value: Any) -> None:
        target = np.asarray(self)
        get_current_stream().launch(lambda: target.__setitem__(key, value))

    def fill(self, value: Any) -> None:
        target = np.asarray(self)
        get_current_stream().launch(lambda: target.fill(value))

    def set(self, arr: np.ndarray, stream: Stream | None = None) -> None:
        """Copy host memory up: read when the copy runs, not when it is queued."""
        target, host = np.asarray(self), np.asarray(arr)
        if host.shape != target.shape or host.dtype != target.dtype:
            raise ValueError(f"set: {host.shape} {host.dtype} into {target.shape} {target.dtype}")
        on = stream if stream is not None else get_current_stream()
        on.launch(lambda: np.copyto(target, host))
        if stream is None:  # CuPy: without a stream, the copy is synchronous
            on.synchronize()

    def get(self, stream: Stream | None = None, order: str = "C", out: Any = None) -> np.ndarray:
        (stream if stream is not None else get_current_stream()).synchronize()
        return np.array(self, copy=True)

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "typestr": self.dtype.str,
            "data": (self.ctypes.data, False),
            "strides": None if self.flags.c_contiguous else self.strides,
            "version": 3,
            "stream": get_current_stream().ptr or 1,
        }


def _on_device(value: Any) -> Any:
    if isinstance(value, np.ndarray) and not isinstance(value, DeviceArray):
        return value.view(DeviceArray)
    if isinstance(value, tuple):
        return tuple(_on_device(v) for v in value)
    return value


class _CupyModule(types.ModuleType):
    """``cupy``: NumPy's functions, their array results on the "device"."""

    ndarray = DeviceArray

    def __init__(self) -> None:
        super().__init__("cupy")
        self.__spec__ = importlib.machinery.ModuleSpec("cupy", None)
        self.cuda = types.SimpleNamespace(
            Stream=Stream, Event=Event, get_current_stream=get_current_stream
        )
        self.cuda.Stream.null = NULL

    def __getattr__(self, name: str) -> Any:
        value = getattr(np, name)
        if callable(value) and not isinstance(value, type):

            def on_device(*args: Any, **kwargs: Any) -> Any:
                return _on_device(value(*args, **kwargs))

            return on_device
        return value

    @staticmethod
    def asarray(a: Any, dtype: Any = None) -> DeviceArray:
        if isinstance(a, DeviceArray) and (dtype is None or a.dtype == dtype):
            return a
        return np.array(a, dtype=dtype, copy=True).view(DeviceArray)

    @staticmethod
    def asnumpy(a: Any, stream: Stream | None = None) -> np.ndarray:
        if isinstance(a, DeviceArray):
            return a.get(stream)
        return np.asarray(a)


# --------------------------------------------------------------------------- kvikIO


class _Done:
    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes

    def get(self) -> int:
        return self.nbytes


class Kvikio(types.ModuleType):
    """``kvikio``: ``CuFile(path, mode).pread(buf, size, file_offset)`` fills ``buf`` (host
    or "device" memory) at once, outside any stream, and returns a future of the bytes read.
    Counts the files it opens and closes; ``kvikio.zarr.GDSStore`` is its Zarr store;
    ``kvikio.RemoteFile`` reads S3 objects and HTTP URLs with real HTTP requests
    (:func:`_remote_file_class`), and :attr:`requests` lists them."""

    def __init__(self) -> None:
        super().__init__("kvikio")
        self.__spec__ = importlib.machinery.ModuleSpec("kvikio", None)
        self.opened: list[str] = []
        self.closed = 0
        self.requests: list[tuple[str, str, str]] = []  # (method, url, Range header)
        self._requests_lock = threading.Lock()
        self.RemoteFile = _remote_file_class(self)
        self.zarr = types.ModuleType("kvikio.zarr")
        self.zarr.__spec__ = importlib.machinery.ModuleSpec("kvikio.zarr", None)
        self.zarr.GDSStore = _gds_store(self)  # type: ignore[attr-defined]

    def CuFile(self, path: str | os.PathLike[str], flags: str = "r") -> Any:
        assert flags == "r"
        self.opened.append(str(path))
        return _File(self, str(path))


class _File:
    def __init__(self, kvikio: Kvikio, path: str) -> None:
        self._kvikio = kvikio
        self.fd = os.open(path, os.O_RDONLY)

    def pread(self, buf: np.ndarray, size: int | None = None, file_offset: int = 0) -> _Done:
        size = buf.nbytes if size is None else size
        data = os.pread(self.fd, size, file_offset)
        np.asarray(buf).view(np.uint8).reshape(-1)[: len(data)] = np.frombuffer(data, np.uint8)
        return _Done(len(data))

    def close(self) -> None:
        os.close(self.fd)
        self._kvikio.closed += 1

    def __enter__(self) -> _File:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _remote_file_class(kvikio: Kvikio) -> type:
    """``kvikio.RemoteFile`` as kvikIO 26.10 has it (python/kvikio/kvikio/remote_file.py and
    cpp/src/remote_handle.cpp): ``open_s3_url`` (``s3://bucket/object``; the endpoint from
    ``aws_endpoint_url`` or ``AWS_ENDPOINT_URL``, path-style; the region, keys and token
    from the arguments or ``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``: without a region or keys it fails, as kvikIO does) and
    ``open_http``; without ``nbytes`` the size comes from a HEAD request. ``pread`` is a
    ranged GET into the buffer, refused past ``nbytes`` (``ValueError``, kvikIO's
    ``std::invalid_argument``); it returns the size asked for, as kvikIO does, whatever the
    server sent. HTTP errors are ``RuntimeError`` naming the status, as libcurl's are.
    Requests are real (urllib), S3 ones signed with AWS Signature Version 4 (botocore's
    signer, as libcurl's ``CURLOPT_AWS_SIGV4`` signs kvikIO's)."""
    import urllib.error
    import urllib.request

    def request(
        method: str, url: str, headers: dict[str, str], sign: tuple[str, ...] | None = None
    ) -> tuple[bytes, dict[str, str]]:
        with kvikio._requests_lock:
            kvikio.requests.append((method, url, headers.get("Range", "")))
        if sign is not None:
            from botocore.auth import S3SigV4Auth  # type: ignore[import-untyped]
            from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped]
            from botocore.credentials import Credentials  # type: ignore[import-untyped]

            region, key, secret, token = sign
            signed = AWSRequest(method=method, url=url, headers=headers)
            S3SigV4Auth(Credentials(key, secret, token or None), "s3", region).add_auth(signed)
            headers = dict(signed.headers.items())
        try:
            req = urllib.request.Request(url, method=method, headers=headers)
            with urllib.request.urlopen(req, timeout=60) as response:
                return response.read(), dict(response.headers)
        except urllib.error.HTTPError as err:
            raise RuntimeError(
                f"curl_easy_perform() error (The requested URL returned error: {err.code})"
            ) from None

    def setting(value: str | None, variable: str, what: str) -> str:
        value = value if value is not None else os.environ.get(variable)
        if not value:
            raise RuntimeError(f"S3: must provide `{what}` if {variable} isn't set.")
        return value

    class RemoteFile:
        def __init__(
            self, url: str, nbytes: int | None, sign: tuple[str, ...] | None = None
        ) -> None:
            self.url, self._sign = url, sign
            if nbytes is None:
                _, headers = request("HEAD", url, {}, sign)
                nbytes = int(headers["Content-Length"])
            self._nbytes = int(nbytes)
            kvikio.opened.append(url)

        @classmethod
        def open_http(cls, url: str, nbytes: int | None = None) -> RemoteFile:
            return cls(url, nbytes)

        @classmethod
        def open_s3_url(
            cls,
            url: str,
            nbytes: int | None = None,
            aws_region_name: str | None = None,
            aws_access_key_id: str | None = None,
            aws_secret_access_key: str | None = None,
            aws_endpoint_url: str | None = None,
            aws_session_token: str | None = None,
        ) -> RemoteFile:
            assert url.startswith("s3://"), url
            bucket, _, key = url.removeprefix("s3://").partition("/")
            sign = (
                setting(aws_region_name, "AWS_DEFAULT_REGION", "aws_region"),
                setting(aws_access_key_id, "AWS_ACCESS_KEY_ID", "aws_access_key"),
                setting(aws_secret_access_key, "AWS_SECRET_ACCESS_KEY", "aws_secret_access_key"),
                aws_session_token or os.environ.get("AWS_SESSION_TOKEN") or "",
            )
            endpoint = aws_endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
            if endpoint:
                return cls(f"{endpoint}/{bucket}/{key}", nbytes, sign)
            return cls(f"https://{bucket}.s3.{sign[0]}.amazonaws.com/{key}", nbytes, sign)

        def nbytes(self) -> int:
            return self._nbytes

        def pread(self, buf: Any, size: int | None = None, file_offset: int = 0) -> _Done:
            size = np.asarray(buf).nbytes if size is None else size
            if file_offset + size > self._nbytes:
                raise ValueError(
                    f"cannot read {file_offset}+{size} bytes into a {self._nbytes} bytes file "
                    f"({self.url})"
                )
            if size:
                data, _ = request(
                    "GET",
                    self.url,
                    {"Range": f"bytes={file_offset}-{file_offset + size - 1}"},
                    self._sign,
                )
                target = np.asarray(buf).view(np.uint8).reshape(-1)
                got = np.frombuffer(data[:size], np.uint8)
                target[: got.size] = got
            return _Done(size)

        def close(self) -> None:
            kvikio.closed += 1

    return RemoteFile


def _gds_store(kvikio: Kvikio) -> type:
    """kvikIO's ``GDSStore``: zarr's LocalStore whose reads land, through ``CuFile``, in a
    buffer made by the prototype asked for (GPU buffers under ``zarr.config.enable_gpu``)."""
    import asyncio

    import zarr.storage
    from zarr.core.buffer import default_buffer_prototype

    class GDSStore(zarr.storage.LocalStore):
        async def get(self, key: str, prototype: Any = None, byte_range: Any = None) -> Any:
            assert byte_range is None, "a datacube's chunks are read whole"
            prototype = prototype if prototype is not None else default_buffer_prototype()
            if not self._is_open:
                await self._open()
            path = Path(self.root) / key

            def read() -> Any:
                nbytes = path.stat().st_size
                raw = prototype.nd_buffer.create(shape=(nbytes,), dtype="B").as_ndarray_like()
                buffer = prototype.buffer.from_array_like(raw)
                with kvikio.CuFile(path, "r") as f:
                    f.pread(raw, nbytes, 0).get()
                return buffer

            try:
                return await asyncio.to_thread(read)
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                return None

    return GDSStore


# --------------------------------------------------------------------------- nvCOMP


class _Decoded:
    def __init__(self, stream: Stream, sizes: list[int]) -> None:
        self._stream, self._sizes = stream, sizes

    @property
    def buffer_sizes(self) -> list[int]:
        self._stream.synchronize()  # the sizes live on the device, written by the decode
        return self._sizes


class _Codec:
    def __init__(self, stream: Stream) -> None:
        self._stream = stream

    def decode(self, encoded: Iterable[Any], out: Iterable[Any]) -> _Decoded:
        import numcodecs

        pairs = list(zip(encoded, out, strict=True))
        sizes: list[int] = [0] * len(pairs)

        def run() -> None:  # reads the encoded bytes when it runs, as the GPU does
            for i, (src, dst) in enumerate(pairs):
                raw = np.frombuffer(numcodecs.Zstd().decode(np.asarray(src).tobytes()), np.uint8)
                target = np.asarray(dst).view(np.uint8).reshape(-1)
                target[: raw.size] = raw[: target.size]
                sizes[i] = raw.size

        self._stream.launch(run)
        return _Decoded(self._stream, sizes)


def _refuse_null(cuda_stream: int) -> Stream:
    if cuda_stream == 0:
        raise RuntimeError("Invalid for stream to be 0")
    return _by_handle[cuda_stream]


class Nvcomp(types.ModuleType):
    """``nvidia.nvcomp``: zstd batch decodes queued on the codec's stream."""

    BitstreamKind = types.SimpleNamespace(RAW="RAW", NVCOMP_NATIVE="NVCOMP_NATIVE")

    def __init__(self) -> None:
        super().__init__("nvidia.nvcomp")
        self.__spec__ = importlib.machinery.ModuleSpec("nvidia.nvcomp", None)
        self.__version__ = "stand-in"

    @staticmethod
    def Codec(*, algorithm: str, bitstream_kind: str, cuda_stream: int) -> _Codec:
        assert algorithm == "Zstd" and bitstream_kind == "RAW"
        return _Codec(_refuse_null(cuda_stream))

    @staticmethod
    def as_arrays(arrays: Iterable[Any], cuda_stream: int) -> list[Any]:
        _refuse_null(cuda_stream)
        return list(arrays)


# --------------------------------------------------------------------------- installing


class Installed(types.SimpleNamespace):
    cupy: _CupyModule
    kvikio: Kvikio
    nvcomp: Nvcomp


def install(monkeypatch: pytest.MonkeyPatch, *, nvcomp: bool = True) -> Installed:
    """Put the stand-ins in ``sys.modules`` for one test, with what torch must say on a
    machine with a GPU: CUDA is available, and host memory can be pinned (here it stays
    ordinary memory; pinning changes how fast copies are, not what they copy)."""
    import sys

    import torch

    cupy, kvikio, nv = _CupyModule(), Kvikio(), Nvcomp()
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "kvikio", kvikio)
    monkeypatch.setitem(sys.modules, "kvikio.zarr", kvikio.zarr)
    if nvcomp:
        nvidia = types.ModuleType("nvidia")
        nvidia.__spec__ = importlib.machinery.ModuleSpec("nvidia", None, is_package=True)
        nvidia.__path__ = []
        nvidia.nvcomp = nv  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "nvidia", nvidia)
        monkeypatch.setitem(sys.modules, "nvidia.nvcomp", nv)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    empty = torch.empty

    def unpinned(*args: Any, pin_memory: bool = False, **kwargs: Any) -> torch.Tensor:
        return empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", unpinned)
    return Installed(cupy=cupy, kvikio=kvikio, nvcomp=nv)
