"""Whole batches handed from DataLoader workers to the training loop through shared memory
a worker makes once.

Torch hands a worker's tensor to the main process as a new shared-memory file a tensor: the
worker makes it and touches its pages, sends its file descriptor over a new socket connection
(``file_descriptor`` sharing: a connection and a handshake a tensor), and the main process
maps it and touches the pages again. Once a batch's chips are cached, that is most of what
a batch costs on a few cores (``benchmarks/training_loader.py``).

A :class:`BatchRing` is a few slots of shared memory, one tensor a slot, made by a worker
and sent to the main process once, with the first batch. A batch written into a slot
travels as the slot's number; the main process's tensors are views of the slot. The slot
is the main process's until the last of those tensors (or any view of them) is freed, then
the worker's again: a loop that keeps batches keeps their slots, and a worker with no free
slot makes fresh tensors as torch would (:meth:`BatchRing.claim` is None).

Slot states, in shared memory: ``FREE`` (the worker may write it), ``SENT`` (written and
handed over, not received yet), ``HELD`` (received; freed when its tensors are). Only the
worker that made a ring writes its slots, so claiming needs no lock across processes.
"""

from __future__ import annotations

import os
import threading
import uuid
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["BatchRing", "RingSlot", "shared_memory_free", "shared_tensor"]

FREE, SENT, HELD = 0, 1, 2
SLOTS = 4  # a batch held by the loop, one being made, and the DataLoader's default 2 ahead
_ALIGN = 64

#: A batch's tensors: name -> dtype and shape of a whole batch (the batch size first).
Fields = Mapping[str, "tuple[torch.dtype, tuple[int, ...]]"]


@dataclass(frozen=True)
class _Place:
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]  # a whole batch's


def _layout(fields: Fields) -> tuple[dict[str, _Place], int]:
    import torch

    places, at = {}, 0
    for name, (dtype, shape) in fields.items():
        size = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
        places[name] = _Place(at, size, dtype, tuple(shape))
        at += -(-size // _ALIGN) * _ALIGN
    return places, at


def shared_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor in shared memory from the start (no copy into it, no page touched).

    Parameters
    ----------
    shape, dtype
        The tensor's.
    """
    import torch

    empty = torch.empty(0, dtype=dtype)
    nbytes = int(np.prod(shape)) * empty.element_size()
    storage = empty.untyped_storage()._new_shared(nbytes)  # type: ignore[no-untyped-call]
    return empty.set_(storage).view(shape)


def _views(buffer: torch.Tensor, places: Mapping[str, _Place], n: int) -> dict[str, torch.Tensor]:
    """The first ``n`` rows of each field of a slot."""
    out = {}
    for name, place in places.items():
        field = buffer[place.offset : place.offset + place.nbytes].view(place.dtype)
        field = field.view(place.shape)
        out[name] = field[:n]
    return out


def shared_memory_free() -> int | None:
    """Bytes free in ``/dev/shm`` (None: no such file system, as on macOS)."""
    try:
        shm = os.statvfs("/dev/shm")
    except OSError:
        return None
    return int(shm.f_bavail * shm.f_frsize)


class BatchRing:
    """Slots of shared memory for a worker's batches of ``fields``.

    Parameters
    ----------
    fields
        Each tensor of a batch: name -> dtype and shape of a whole batch.
    slots
        How many batches may be out at once before the worker makes fresh tensors.
    """

    def __init__(self, fields: Fields, slots: int = SLOTS) -> None:
        import torch

        self.places, self.slot_bytes = _layout(fields)
        self.batch = min(place.shape[0] for place in self.places.values())
        self.token = uuid.uuid4().hex
        self.pid = os.getpid()
        self.buffers = [shared_tensor((self.slot_bytes,), torch.uint8) for _ in range(slots)]
        self.state = shared_tensor((slots,), torch.uint8)
        self.state.fill_(FREE)
        self._sent = False

    @classmethod
    def fitting(cls, fields: Fields, slots: int = SLOTS) -> BatchRing | None:
        """A ring of up to ``slots`` slots that takes at most a quarter of the shared memory
        free now and 1 GiB; None if not two slots fit (writing past a full ``/dev/shm`` is a
        bus error, not a clean failure), or off POSIX systems."""
        if os.name != "posix":  # the main process tells a worker gone by its pid (os.kill)
            return None
        _, per_slot = _layout(fields)
        room = 1 << 30
        free = shared_memory_free()
        if free is not None:
            room = min(room, free // 4)
        fit = min(slots, room // max(per_slot, 1))
        return cls(fields, fit) if fit >= 2 else None

    def claim(self) -> int | None:
        """A free slot, now the worker's to write (None: every slot is out)."""
        state = self.state.numpy()
        free = np.flatnonzero(state == FREE)
        if not len(free):
            return None
        slot = int(free[0])
        state[slot] = SENT
        return slot

    def claim_batch(self, n: int) -> RingSlot | None:
        """A free slot for a batch of ``n``, now the worker's to write (None: every slot is
        out, or ``n`` is more than a slot holds)."""
        slot = self.claim() if n <= self.batch else None
        return None if slot is None else RingSlot(self, slot, n)

    def unclaim(self, slot: int) -> None:
        """Give back a slot the worker claimed and did not send (its batch failed)."""
        self.state.numpy()[slot] = FREE

    def views(self, slot: int, n: int) -> dict[str, torch.Tensor]:
        """The tensors of a batch of ``n`` in ``slot``, to write into."""
        if n > self.batch:
            raise ValueError(f"a batch of {n} does not fit a slot of {self.batch}")
        return _views(self.buffers[slot], self.places, n)

    def _payload(self) -> tuple[Any, ...] | None:
        """The ring itself, with the first batch sent (its shared memory goes once)."""
        if self._sent:
            return None
        self._sent = True
        return (self.places, self.buffers, self.state)


class RingSlot:
    """A batch in a worker's ring; unpickled in the main process, it is the batch's tensors
    (views of the slot, a dict by field name).

    Parameters
    ----------
    ring
        The worker's ring.
    slot
        The slot the batch is in.
    n
        Chips in the batch.
    """

    def __init__(self, ring: BatchRing, slot: int, n: int) -> None:
        self.ring, self.slot, self.n = ring, slot, n

    def views(self) -> dict[str, torch.Tensor]:
        """The batch's tensors in the slot, to write into (in the worker)."""
        return self.ring.views(self.slot, self.n)

    def unclaim(self) -> None:
        """Give the slot back unsent (the batch failed)."""
        self.ring.unclaim(self.slot)

    def __reduce__(self) -> tuple[Any, ...]:
        ring = self.ring
        return (_receive, (ring.token, ring.pid, self.slot, self.n, ring._payload()))


@dataclass
class _Received:
    """A worker's ring as the main process maps it."""

    pid: int
    places: dict[str, _Place]
    buffers: list[torch.Tensor]
    state: torch.Tensor

    def release(self, slot: int) -> None:
        self.state.numpy()[slot] = FREE


_received: dict[str, _Received] = {}
_received_lock = threading.Lock()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _receive(
    token: str, pid: int, slot: int, n: int, payload: tuple[Any, ...] | None
) -> dict[str, torch.Tensor]:
    """The batch in ``slot`` of a worker's ring, as tensors that hold the slot until freed."""
    import torch

    with _received_lock:
        if payload is not None:
            # Rings of workers gone are forgotten (their batches still alive keep their own
            # memory); DataLoader workers live as long as their iterator.
            for gone in [t for t, r in _received.items() if not _alive(r.pid)]:
                del _received[gone]
            places, buffers, state = payload
            _received[token] = _Received(pid, places, buffers, state)
        ring = _received.get(token)
    if ring is None:
        raise RuntimeError(
            "a batch from a DataLoader worker's shared memory arrived where the worker's "
            "first batch did not: batches of xclay.training are for the DataLoader that "
            "made them"
        )
    ring.state.numpy()[slot] = HELD
    # A new array object over the slot, held by the tensors made from it: when the last of
    # them (or of their views) is freed, so is it, and the slot goes back to the worker.
    memory = ring.buffers[slot].numpy()[...]
    weakref.finalize(memory, ring.release, slot)
    return _views(torch.from_numpy(memory), ring.places, n)
