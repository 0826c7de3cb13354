"""A TCP relay in front of a server, standing in for an upstream (or a balancer before it) that
closes keep-alive connections left idle: the close and the client's next request cross on the
wire, so the request meets a connection closed before any byte of an answer (issue #13)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from tests.stack.procs import LOOPBACK


class IdleClosingRelay:
    """Listens on 127.0.0.1:free-port and relays each connection to (host, port).

    The first bytes a client sends on a connection that was quiet for idle_seconds (nothing in
    either direction) are not relayed: the relay closes the connection instead, as a server
    whose idle timer fired just as the request arrived. `dropped` counts those closes.
    """

    def __init__(self, host: str, port: int, idle_seconds: float = 1.0):
        self._target = (host, port)
        self._idle = idle_seconds
        self.dropped = 0
        self._listener = socket.create_server((LOOPBACK, 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://{LOOPBACK}:{self.port}"
        self._stopping = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stopping:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        server = socket.create_connection(self._target)
        last = [time.monotonic()]  # the last byte either way, shared by both directions

        def pump(source: socket.socket, sink: socket.socket, from_client: bool) -> None:
            try:
                while data := source.recv(65536):
                    if from_client and time.monotonic() - last[0] > self._idle:
                        self.dropped += 1
                        return  # the idle close, crossing this request
                    last[0] = time.monotonic()
                    sink.sendall(data)
            except OSError:
                pass
            finally:
                for sock in (client, server):
                    _close(sock)

        threading.Thread(target=pump, args=(server, client, False), daemon=True).start()
        pump(client, server, True)

    def stop(self) -> None:
        """Stop accepting (relayed connections end with their peers)."""
        self._stopping = True
        _close(self._listener)
        self._thread.join(timeout=10)

    def __enter__(self) -> IdleClosingRelay:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
