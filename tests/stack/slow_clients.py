"""Clients that hold a server's connections and give it little in return: a reader that takes
its answer one byte a second (`SlowReader`), and crowds of connections (`Crowd`) that send one
request and then nothing (idle keep-alive), nothing at all, or a request head that never ends,
one header line every few seconds (slowloris), all driven by one thread with non-blocking
sockets.

Every connection notes when it connected, when its answer began and when the server closed
it, so that a test can say how long the server kept each one.
"""

from __future__ import annotations

import contextlib
import errno
import resource
import selectors
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

import psutil

from tests.stack.procs import LOOPBACK

IDLE_REQUEST = b"GET /livez HTTP/1.1\r\nHost: crowd\r\n\r\n"
LORIS_HEAD = b"GET /livez HTTP/1.1\r\nHost: loris\r\n"


def worker_holds(pid: int, local_port: int) -> bool:
    """Whether process `pid` still holds the TCP connection whose client end is 127.0.0.1:
    local_port (a socket the process closed with bytes still queued is the kernel's alone)."""
    return any(
        conn.raddr and conn.raddr.port == local_port
        for conn in psutil.Process(pid).net_connections(kind="tcp")
    )


def raise_open_files_limit(needed: int) -> int:
    """Raise this process's RLIMIT_NOFILE soft limit to its hard limit (child processes
    started afterwards inherit it); return the soft limit now. Raises RuntimeError when the
    hard limit is below `needed`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise RuntimeError(f"RLIMIT_NOFILE hard limit {hard} is below the {needed} needed")
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass
class Member:
    """One connection of a crowd and what happened to it (times from time.monotonic())."""

    sock: socket.socket
    opened_at: float
    connected_at: float | None = None
    answered_at: float | None = None  # the first byte of an answer
    closed_at: float | None = None  # the server closed it (end of stream or reset)
    received: bytes = b""
    error: str | None = None  # why the connection failed (e.g. the connect timed out)


class Crowd:
    """`count` connections to 127.0.0.1:port, opened `batch` at a time (each batch once the
    previous one has connected or `batch_wait` seconds passed). Each sends `request` when it
    connects; with `trickle` set, one more header line every `trickle` seconds after that
    (slowloris). Then it only reads. Use as a context manager: leaving it closes every
    connection still open."""

    def __init__(
        self,
        port: int,
        count: int,
        request: bytes = IDLE_REQUEST,
        trickle: float | None = None,
        batch: int = 500,
        batch_wait: float = 0.5,
    ) -> None:
        self.port, self.count, self.request, self.trickle = port, count, request, trickle
        self.batch, self.batch_wait = batch, batch_wait
        self.members: list[Member] = []
        self._selector = selectors.DefaultSelector()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="crowd", daemon=True)

    # --- what a test reads ---------------------------------------------------------------

    def connected(self) -> int:
        """Connections whose TCP handshake completed."""
        return sum(m.connected_at is not None for m in self.members)

    def answered(self) -> int:
        """Connections the server began to answer."""
        return sum(m.answered_at is not None for m in self.members)

    def closed_by_server(self) -> int:
        """Connections the server closed."""
        return sum(m.closed_at is not None for m in self.members)

    def failed(self) -> list[str]:
        """Why connections failed on the client's side (connect refused or timed out)."""
        return [m.error for m in self.members if m.error is not None]

    def opened(self) -> int:
        """Connections opened so far (the batches still to come are not)."""
        return len(self.members)

    # --- running ---------------------------------------------------------------------------

    def __enter__(self) -> Crowd:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the crowd and close every connection it holds."""
        self._stop.set()
        self._thread.join(timeout=60)
        for member in self.members:
            with contextlib.suppress(OSError):
                member.sock.close()
        self._selector.close()

    def _run(self) -> None:
        next_trickle = None
        line = 0
        while not self._stop.is_set():
            if self.opened() < self.count and self._batch_done():
                self._open_batch()
            for key, events in self._selector.select(timeout=0.05):
                self._on_event(key.data, events)
            if self.trickle is not None:
                now = time.monotonic()
                next_trickle = next_trickle or now + self.trickle
                if now >= next_trickle:
                    line += 1
                    self._trickle(f"X-Loris-{line}: a\r\n".encode())
                    next_trickle = now + self.trickle

    def _batch_done(self) -> bool:
        """Whether the last batch has connected (or waited long enough) for the next one."""
        last = self.members[-self.batch :]
        if not last:
            return True
        waited = time.monotonic() - last[0].opened_at >= self.batch_wait
        return waited or all(m.connected_at or m.error for m in last)

    def _open_batch(self) -> None:
        for _ in range(min(self.batch, self.count - self.opened())):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            member = Member(sock, time.monotonic())
            code = sock.connect_ex((LOOPBACK, self.port))
            if code not in (0, errno.EINPROGRESS):
                member.error = errno.errorcode.get(code, str(code))
                sock.close()
            else:
                self._selector.register(sock, selectors.EVENT_WRITE, member)
            self.members.append(member)

    def _on_event(self, member: Member, events: int) -> None:
        if member.connected_at is None:
            code = member.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                self._drop(member, error=errno.errorcode.get(code, str(code)))
                return
            member.connected_at = time.monotonic()
            with contextlib.suppress(OSError):
                member.sock.send(self.request)  # a few dozen bytes: the buffer takes them
            self._selector.modify(member.sock, selectors.EVENT_READ, member)
            return
        try:
            data = member.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""  # reset by the server
        if not data:
            self._drop(member, closed=True)
            return
        if member.answered_at is None:
            member.answered_at = time.monotonic()
        member.received += data

    def _trickle(self, header_line: bytes) -> None:
        for member in self.members:
            if member.connected_at is not None and member.closed_at is None and not member.error:
                with contextlib.suppress(OSError):
                    member.sock.send(header_line)

    def _drop(self, member: Member, closed: bool = False, error: str | None = None) -> None:
        self._selector.unregister(member.sock)
        member.sock.close()
        if closed:
            member.closed_at = time.monotonic()
        member.error = error


class SlowReader:
    """A GET of `path` from 127.0.0.1:port on a connection of its own, whose answer a thread
    reads one byte every `1 / rate` seconds through a 4 KiB receive buffer, so that the
    server's sends soon wait on it. `drain()` then reads what is left at full speed."""

    def __init__(
        self, port: int, path: str, headers: Iterable[tuple[str, str]] = (), rate: float = 1.0
    ) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect((LOOPBACK, port))
        self.local_port = self.sock.getsockname()[1]
        lines = [f"GET {path} HTTP/1.1", f"Host: {LOOPBACK}:{port}"]
        lines += [f"{name}: {value}" for name, value in headers]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        self.opened_at = time.monotonic()
        self.data = bytearray()
        self.ended = False  # the server's end of stream (or a reset) was read
        self._interval = 1 / rate
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._trickle, name="slow-reader", daemon=True)
        self._thread.start()

    def _trickle(self) -> None:
        self.sock.settimeout(self._interval)
        while not self._stop.is_set():
            try:
                byte = self.sock.recv(1)
            except TimeoutError:
                continue
            except OSError:
                byte = b""
            if not byte:
                self.ended = True
                return
            self.data += byte
            self._stop.wait(self._interval)

    @property
    def status(self) -> int | None:
        """The answer's status code, once its status line has arrived."""
        line = bytes(self.data).split(b"\r\n", 1)
        return int(line[0].split()[1]) if len(line) == 2 else None

    @property
    def content_length(self) -> int | None:
        """The answer's Content-Length, once its head has arrived."""
        head = bytes(self.data).split(b"\r\n\r\n", 1)[0].decode("latin-1")
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                return int(value)
        return None

    @property
    def body_bytes(self) -> int:
        """Body bytes received so far."""
        head, _, body = bytes(self.data).partition(b"\r\n\r\n")
        return len(body)

    def drain(self, timeout: float = 30.0) -> int:
        """Stop trickling, read the rest at full speed until the server ends the stream (or
        `timeout` passes without a byte), close, and return the body bytes received in all."""
        self._stop.set()
        self._thread.join()
        self.sock.settimeout(timeout)
        with contextlib.suppress(OSError):
            while chunk := self.sock.recv(1 << 20):
                self.data += chunk
            self.ended = True
        self.sock.close()
        return self.body_bytes
