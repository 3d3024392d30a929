"""Writing to a pipe without waiting on its reader: the engine process's outbox, and the room check behind it.

A write to a full pipe blocks until the other side reads. The engine process must not wait so
(the GPU idles meanwhile), and neither may the API server's event loop. So each message is
pickled when it is put, and written only when the pipe has room for it (the kernel's count of
unread bytes says how much is free); until then messages pile up in order and go later as one
``Batch``, which ``unbatch`` takes apart. The pipes are also made as large as Linux lets an
unprivileged process (``/proc/sys/fs/pipe-max-size``, 1 MiB by default), so a reader that
falls behind for a few steps stalls nobody.
"""

from __future__ import annotations

import array
import fcntl
import termios
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from typing import Any

PIPE_SIZE = 1 << 20  # the default pipe-max-size
PAGE = 4096
HEADER = 4  # Connection.send_bytes's length prefix (8 more for messages over 2 GiB, never these)


def enlarge(conn: Connection, size: int = PIPE_SIZE) -> int:
    """Grow the pipe behind ``conn`` to ``size`` bytes where allowed; its capacity in bytes (0: not a pipe)."""
    try:
        return fcntl.fcntl(conn.fileno(), fcntl.F_SETPIPE_SZ, size)
    except OSError:
        try:
            return fcntl.fcntl(conn.fileno(), fcntl.F_GETPIPE_SZ)
        except OSError:
            return 0


@dataclass(frozen=True, slots=True)
class Batch:
    """Pickled messages written as one, in order: what waited for room in the pipe."""

    payloads: list[bytes]


def pickled(message: object) -> bytes:
    """``message`` as the bytes a pipe carries (bytes, not the pickler's memoryview, which a batch could not pickle)."""
    return bytes(ForkingPickler.dumps(message))


def batch(payloads: list[bytes]) -> bytes:
    """Pickled messages as one write: the message itself when alone, else a ``Batch`` that ``unbatch`` takes
    apart."""
    return payloads[0] if len(payloads) == 1 else ForkingPickler.dumps(Batch(payloads))


def room(conn: Connection, capacity: int) -> int:
    """Bytes a write to ``conn`` can surely put in the pipe now without blocking. The kernel counts the bytes still
    unread (FIONREAD), but a pipe holds pages, and a write that does not fill its last page wastes the rest of it:
    at worst half of every page is used, plus one per write, so only half the capacity counts."""
    unread = array.array("i", [0])
    fcntl.ioctl(conn.fileno(), termios.FIONREAD, unread, True)
    return capacity // 2 - PAGE - unread[0]


class Outbox:
    """Messages for one pipe, sent in order and never blocking the sender unless it asks to (``flush(block=True)``)
    or more than ``max_bytes`` wait. Not thread-safe: one thread puts and flushes."""

    def __init__(self, conn: Connection, max_bytes: int = 64 << 20) -> None:
        self.conn = conn
        self.capacity = enlarge(conn)
        self.max_bytes = max_bytes
        self._waiting: list[bytes] = []
        self._bytes = 0
        self.batches = 0  # messages sent as part of a batch: how often the reader fell behind

    def put(self, message: object) -> None:
        payload = pickled(message)
        self._waiting.append(payload)
        self._bytes += len(payload)

    @property
    def pending(self) -> int:
        return len(self._waiting)

    def flush(self, block: bool = False) -> bool:
        """Send, as one message, as many of the waiting messages (oldest first) as the pipe has room for; all of
        them if ``block`` or more than ``max_bytes`` wait. True when nothing waits any more. Raises what the
        connection raises once the reader is gone."""
        if not self._waiting:
            return True
        if block or self._bytes > self.max_bytes or not self.capacity:
            self._send(len(self._waiting))
            return True
        free = room(self.conn, self.capacity)
        count, size = 0, HEADER + 64  # pickle adds at most 16 bytes an item (opcode, length, memo) and 64 a batch
        for payload in self._waiting:
            size += len(payload) + 16
            if size > free:
                break
            count += 1
        if not count and free >= self.capacity // 2 - PAGE:  # larger than an empty pipe surely holds: wait for it
            count = 1
        if count:
            self._send(count)
        return not self._waiting

    def _send(self, count: int) -> None:
        head, self._waiting = self._waiting[:count], self._waiting[count:]
        self._bytes -= sum(len(p) for p in head)
        self.conn.send_bytes(batch(head))
        if count > 1:
            self.batches += count


def unbatch(message: object) -> Iterator[Any]:
    """The messages an ``Outbox`` sent as ``message``, in order."""
    if not isinstance(message, Batch):
        yield message
        return
    for payload in message.payloads:
        yield ForkingPickler.loads(payload)
