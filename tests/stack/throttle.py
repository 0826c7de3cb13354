"""A slow network in front of a real server: a TCP relay on 127.0.0.1 that passes bytes on at a
fixed rate in each direction, from threads, so a test can make S3 slow without faking it."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from tests.stack.procs import LOOPBACK

BLOCK = 64 * 1024


class Throttle:
    """Listens on 127.0.0.1:free-port and relays every connection to `port`, each direction at
    most `bytes_per_second`. `.url` is its http:// address; `.sent` counts the bytes passed on
    towards the server so far; `.rate` (bytes per second) may be changed while it relays. A
    connection that was idle gains no credit: what comes after a pause is paced from then."""

    def __init__(self, port: int, bytes_per_second: float):
        self._target = (LOOPBACK, port)
        self.rate = bytes_per_second
        self._listener = socket.create_server((LOOPBACK, 0))
        self.url = f"http://{LOOPBACK}:{self._listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = []
        self.sent = 0
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed by stop()
            server = socket.create_connection(self._target)
            self._sockets += [client, server]
            for source, sink, count in ((client, server, True), (server, client, False)):
                threading.Thread(target=self._pass, args=(source, sink, count), daemon=True).start()

    def _pass(self, source: socket.socket, sink: socket.socket, count: bool) -> None:
        started, sent = time.monotonic(), 0
        with contextlib.suppress(OSError):
            while data := source.recv(BLOCK):
                if sent / self.rate < time.monotonic() - started:  # it was idle: no credit
                    started, sent = time.monotonic(), 0
                sink.sendall(data)
                sent += len(data)
                if count:
                    self.sent += len(data)
                ahead = sent / self.rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)  # pacing is the point of this relay
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def stop(self) -> None:
        """Stop listening and cut every relayed connection."""
        with contextlib.suppress(OSError):  # wakes the accepting thread (close alone does not)
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()
        self._thread.join(timeout=5)

    def __enter__(self) -> Throttle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
