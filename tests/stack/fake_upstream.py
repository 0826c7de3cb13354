"""A scriptable HTTP server standing in for a registry where a real one cannot misbehave on cue:
it records each request exactly as it arrived and answers what the test scripted."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.stack.procs import LOOPBACK


@dataclass
class Seen:
    """One request as the upstream received it."""

    method: str
    target: str  # the raw request target: path and query, as sent
    headers: list[tuple[str, str]]  # every header line, repeats kept, in order
    body: bytes
    peer: tuple[str, int]  # the client's address: the same for requests on one connection

    def header_values(self, name: str) -> list[str]:
        """Values of every line of header `name`."""
        return [v for n, v in self.headers if n.lower() == name.lower()]


@dataclass
class Reply:
    """What to answer: status, header lines, and a body (bytes, or chunks sent as they come and
    then the connection closed, so a test can stop half-way). hang_up: no answer at all, the
    connection closed once the request is read. reset: the connection is reset (RST, no FIN)
    once the body is sent."""

    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | Iterable[bytes] = b""
    hang_up: bool = False
    reset: bool = False


def blob_headers(digest: str, length: int) -> list[tuple[str, str]]:
    """The headers a registry sends with a blob (GET or HEAD): a HEAD answered with them is the
    positive evidence bloblo needs before it serves the blob from its cache."""
    return [
        ("Content-Length", str(length)),
        ("Content-Type", "application/octet-stream"),
        ("Docker-Content-Digest", digest),
    ]


def digest_in(target: str) -> str:
    """The digest at the end of a blob request target (/v2/<name>/blobs/<digest>?query)."""
    return target.split("?", 1)[0].rsplit("/", 1)[-1]


class FakeUpstream:
    """Serves on 127.0.0.1:port (a free one unless given) from a thread; `answer(seen) -> Reply`
    decides each reply."""

    def __init__(self, answer: Callable[[Seen], Reply], port: int = 0):
        self.answer = answer
        self.seen: list[Seen] = []
        self._server = ThreadingHTTPServer((LOOPBACK, port), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://{LOOPBACK}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and join the thread."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> FakeUpstream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _handler(upstream: FakeUpstream) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            seen = Seen(
                self.command,
                self.path,
                list(self.headers.items()),
                self._body(),
                self.client_address,
            )
            upstream.seen.append(seen)
            reply = upstream.answer(seen)
            if reply.hang_up:
                self.close_connection = True
                return
            try:
                self._send(reply)
            except OSError:  # the client left (e.g. it gave up waiting)
                self.close_connection = True
            if reply.reset:
                self.close_connection = True
                # Linger 0: close() sends RST instead of FIN, before the server's own shutdown.
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.connection.close()

        def _send(self, reply: Reply) -> None:
            self.send_response(reply.status)
            for name, value in reply.headers:
                self.send_header(name, value)
            named = {name.lower() for name, _ in reply.headers}
            if isinstance(reply.body, bytes) and "content-length" not in named:
                self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            if self.command == "HEAD":
                return
            chunks = [reply.body] if isinstance(reply.body, bytes) else reply.body
            if not isinstance(reply.body, bytes):
                self.close_connection = True  # a streamed body ends with the connection
            for chunk in chunks:
                self.wfile.write(chunk)
                self.wfile.flush()

        def _body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", ""):
                return self._chunked_body()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _chunked_body(self) -> bytes:
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()

        do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _serve  # noqa: N815

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    return Handler
