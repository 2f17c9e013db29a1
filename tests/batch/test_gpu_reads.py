"""The GPU reader's kvikIO reads, run on the CPU: every chunk's stored bytes land whole at
16-byte aligned starts of one buffer (what nvCOMP decodes from), checksums and host decoding
agree with the host path's reads, a short read is damage, and a shard file is opened once.

kvikIO itself needs CUDA to read; here a stand-in with its ``CuFile.pread`` contract (fill
the buffer from the file at an offset, return a future of the bytes read;
:mod:`tests.cuda_standins`) reads into host memory, so the code that plans and checks the
reads is the GPU path's own."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

import xclay
from tests.cuda_standins import Kvikio
from tests.helpers import random_cube
from xclay.datacube.chunks import (
    ArrayLayout,
    ChunkLocator,
    ChunkRef,
    _host_decoder,
    crc32c_matches,
    read_chunk,
)
from xclay.datacube.gpuchunks import aligned_starts, pread_chunks
from xclay.errors import DataIntegrityError


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> ArrayLayout:
    cube = random_cube((1, 3, 128, 128), seed=4)
    store = xclay.write_datacube(
        cube, tmp_path_factory.mktemp("cube") / "c.zarr", chip_size=32, shard_chips=2
    )
    return ArrayLayout.open(store / "pixels")


def _refs(layout: ArrayLayout) -> list[ChunkRef]:
    locator = ChunkLocator(layout)
    refs = [locator.find((0, 0, gy, gx)) for gy, gx in itertools.product(range(4), range(4))]
    assert all(ref is not None for ref in refs)
    return [ref for ref in refs if ref is not None]


def test_aligned_starts() -> None:
    np.testing.assert_array_equal(aligned_starts([5, 16, 17, 1]), [0, 16, 32, 64, 80])
    assert aligned_starts([]).tolist() == [0]


def test_encoded_chunks_land_whole_at_aligned_starts(sharded: ArrayLayout) -> None:
    refs = _refs(sharded)
    sizes = [int(ref.nbytes or 0) for ref in refs]
    starts = aligned_starts(sizes)
    buffer = np.zeros(int(starts[-1]), np.uint8)
    kvikio = Kvikio()
    pread_chunks(
        kvikio, [(r, buffer[starts[i] : starts[i] + sizes[i]]) for i, r in enumerate(refs)]
    )
    assert (starts % 16 == 0).all()
    assert len(kvikio.opened) == len(set(kvikio.opened)) == 4  # 4 shards, each opened once
    assert kvikio.closed == 4
    decoder = _host_decoder(sharded)
    for i, ref in enumerate(refs):
        stored = buffer[starts[i] : starts[i] + sizes[i]]
        assert sharded.checksum and crc32c_matches(stored[:-4], stored[-4:])
        from_buffer = np.empty(sharded.chunk_shape, sharded.dtype)
        decoder.decode(stored[:-4].data, out=from_buffer.view(np.uint8).reshape(-1))
        from_host_path = np.empty(sharded.chunk_shape, sharded.dtype)
        read_chunk(sharded, ref, from_host_path, decoder)
        np.testing.assert_array_equal(from_buffer, from_host_path)


def test_a_short_read_is_damage(sharded: ArrayLayout, tmp_path: Path) -> None:
    ref = _refs(sharded)[0]
    cut = tmp_path / "shard"
    cut.write_bytes(Path(ref.path).read_bytes()[: ref.offset + int(ref.nbytes or 0) - 3])
    short = ChunkRef(str(cut), ref.offset, ref.nbytes)
    kvikio = Kvikio()
    with pytest.raises(DataIntegrityError, match=r"chunk cut short .* the datacube is damaged"):
        pread_chunks(kvikio, [(short, np.zeros(int(ref.nbytes or 0), np.uint8))])
    assert kvikio.closed == 1  # closed on the error too
