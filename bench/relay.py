"""A bare TCP relay in Python and gevent, as a baseline: what one extra hop costs on this
machine when the bytes pass through a Python process, before any HTTP, hashing or S3.

Each connection gets one to the target and two greenlets copying with 1 MiB recv_into/sendall,
the same read size bloblo uses. `python -m bench.relay LISTEN_PORT TARGET_HOST TARGET_PORT`
serves on 127.0.0.1; RelayServer runs it as a child process of the stack.
"""

from __future__ import annotations

import contextlib
import socket
import sys
from pathlib import Path

import gevent
from gevent.server import StreamServer
from gevent.socket import create_connection

from tests.stack.procs import LOOPBACK, Process, ProcessServer, free_port

CHUNK = 1 << 20
REPO = Path(__file__).resolve().parents[1]


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """Copy source to sink until EOF, then half-close sink so its reader sees the end."""
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with contextlib.suppress(OSError):
        while received := source.recv_into(buffer):
            sink.sendall(view[:received])
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


def _handler(target: tuple[str, int]):
    def handle(client: socket.socket, _address: object) -> None:
        upstream = create_connection(target)
        try:
            gevent.joinall(
                [gevent.spawn(_pump, client, upstream), gevent.spawn(_pump, upstream, client)]
            )
        finally:
            upstream.close()
            client.close()

    return handle


class RelayServer(ProcessServer):
    """The relay as a child process on 127.0.0.1:free-port, forwarding every connection to
    target_host:target_port."""

    def __init__(self, workdir: Path, target_host: str, target_port: int) -> None:
        self.port = free_port()
        self.host = f"{LOOPBACK}:{self.port}"
        self.url = f"http://{self.host}"
        self.process = Process(
            [sys.executable, "-m", "bench.relay", str(self.port), target_host, str(target_port)],
            Path(workdir) / "relay.log",
            cwd=REPO,
            name=f"relay:{self.port}",
        )
        self._ready_or_stop(lambda: self.process.wait_port(self.port))


def main(argv: list[str]) -> None:
    """Serve until killed: LISTEN_PORT TARGET_HOST TARGET_PORT."""
    listen_port, target_host, target_port = int(argv[0]), argv[1], int(argv[2])
    server = StreamServer((LOOPBACK, listen_port), _handler((target_host, target_port)))
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
