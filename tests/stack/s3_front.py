"""A front end before a real S3 (LocalStack) that relays every request byte for byte and, for
the requests a test's rules name, answers S3's error instead (`<Error><Code>SlowDown</Code>...`
503, AccessDenied 403, NoSuchBucket 404), holds them a while, or refuses every connection, as
S3 does when it throttles, denies, loses a bucket or is unreachable. It counts what it saw.

Presigned URLs sign the host: give bloblo the front's URL as its S3 endpoint (and so as the
endpoint its redirects are signed for); the Host header reaches S3 unchanged."""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from tests.stack.procs import LOOPBACK

BLOCK = 64 * 1024
REASONS = {403: "Forbidden", 404: "Not Found", 500: "Internal Server Error", 503: "Slow Down"}
MESSAGES = {
    "SlowDown": "Please reduce your request rate.",
    "AccessDenied": "Access Denied",
    "NoSuchBucket": "The specified bucket does not exist",
}


@dataclass
class Rule:
    """Which requests the front answers itself, and how.

    A request matches when its method is `method`, its query carries the key `query` (e.g.
    `partNumber` for UploadPart, `uploads` for CreateMultipartUpload), and its path ends with
    `key` (an object key), for those given. It is held `delay` seconds, then answered with S3's
    error `code` and `status`, or passed on when code is None. `times`: how many matching
    requests the rule takes (None: all of them); with `each`, how many of each value of the
    query key (e.g. the first attempt of every part)."""

    method: str
    query: str | None = None
    key: str | None = None
    code: str | None = "SlowDown"
    status: int = 503
    delay: float = 0.0
    times: int | None = None
    each: bool = False

    def __post_init__(self) -> None:
        self._taken: dict[str, int] = {}  # uses, by the query key's value ("" without each)

    def take(self, method: str, path: str, query: dict[str, list[str]]) -> bool:
        """Whether the rule applies to this request (counting it as one use)."""
        if not (
            method == self.method
            and (self.query is None or self.query in query)
            and (self.key is None or path.endswith("/" + self.key))
        ):
            return False
        value = query.get(self.query, [""])[0] if self.each else ""
        if self.times is not None and self._taken.get(value, 0) >= self.times:
            return False
        self._taken[value] = self._taken.get(value, 0) + 1
        return True


@dataclass
class SeenS3:
    """One request as the front received it, and the error it answered (None: passed on)."""

    method: str
    path: str
    query: dict[str, list[str]]
    answered: str | None


class S3Front:
    """Listens on 127.0.0.1:free-port and relays each connection to S3 on 127.0.0.1:`port`,
    request by request, applying `rules` (first match wins). `.seen` records every request;
    down() refuses connections (and cuts the open ones) until up()."""

    def __init__(self, port: int):
        self._target = (LOOPBACK, port)
        self.rules: list[Rule] = []
        self.seen: list[SeenS3] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._listener = socket.create_server((LOOPBACK, 0))
        self._listening = True
        self.port = self._listener.getsockname()[1]
        self.url = f"http://{LOOPBACK}:{self.port}"
        self._start_accepting()

    def count(self, method: str, query: str | None = None, value: str | None = None) -> int:
        """How many requests of method the front saw (with query key `query`, equal to value)."""
        return sum(
            seen.method == method
            and (query is None or query in seen.query)
            and (value is None or seen.query.get(query) == [value])
            for seen in list(self.seen)
        )

    def clear(self) -> None:
        """No rules and nothing seen: every request passes again."""
        with self._lock:
            self.rules.clear()
            self.seen.clear()

    def down(self) -> None:
        """Refuse connections, as an S3 that cannot be reached: stop listening and cut every
        relayed connection (pooled ones too)."""
        self._listening = False
        with contextlib.suppress(OSError):  # wakes the accept() under way (close alone does not)
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._accepting.join(timeout=10)
        for sock in list(self._sockets):
            _close(sock)

    def up(self) -> None:
        """Listen again, on the same port (nothing to do if it listens)."""
        if self._listening:
            return
        self._listening = True
        self._listener = socket.create_server((LOOPBACK, self.port))
        self._start_accepting()

    def stop(self) -> None:
        """Stop listening, end every hold, cut every connection."""
        self._stopping.set()
        self.down()

    def __enter__(self) -> S3Front:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- relaying ----------------------------------------------------------------------------

    def _start_accepting(self) -> None:
        self._accepting = threading.Thread(target=self._accept, args=(self._listener,), daemon=True)
        self._accepting.start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            self._sockets.add(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        """Relay client's requests one by one to S3 (answers flow back as they come), until a
        rule answers one itself: that answer closes the connection."""
        server, buffer = None, b""
        try:
            while True:
                head, buffer = _read_head(client, buffer)
                if head is None:
                    return
                method, target, length, expects = _parse(head)
                parts = urlsplit(target)
                query = parse_qs(parts.query, keep_blank_values=True)
                rule = self._take(method, parts.path, query)
                if rule is not None and rule.delay:
                    self._stopping.wait(rule.delay)
                if rule is not None and rule.code is not None:
                    self._answer(client, method, rule, buffer, length, expects)
                    return
                if server is None:
                    server = socket.create_connection(self._target)
                    self._sockets.add(server)
                    threading.Thread(target=_pump, args=(server, client), daemon=True).start()
                server.sendall(head)
                buffer = _relay_body(client, server, buffer, length)
        except OSError:
            return
        finally:
            for sock in (client, server):
                if sock is not None:
                    _close(sock)
                    self._sockets.discard(sock)

    def _take(self, method: str, path: str, query: dict[str, list[str]]) -> Rule | None:
        """The first rule that takes the request, recorded in seen."""
        with self._lock:
            rule = next((r for r in self.rules if r.take(method, path, query)), None)
            answered = rule.code if rule is not None else None
            self.seen.append(SeenS3(method, path, query, answered))
            return rule

    def _answer(
        self,
        client: socket.socket,
        method: str,
        rule: Rule,
        buffer: bytes,
        length: int,
        expects: bool,
    ) -> None:
        """S3's error for rule, then the connection closed. A body the client sends anyway is
        read first (one waiting for 100-continue is never sent), so that the close is clean."""
        if not expects:
            _read_body(client, buffer, length)
        body = b"" if method == "HEAD" else _error_xml(rule.code)
        reason = REASONS.get(rule.status, "Error")
        head = (
            f"HTTP/1.1 {rule.status} {reason}\r\n"
            "Content-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\n"
            "x-amz-request-id: s3-front\r\n"
            "Connection: close\r\n\r\n"
        )
        client.sendall(head.encode() + body)
        with contextlib.suppress(OSError):
            client.shutdown(socket.SHUT_WR)
            client.settimeout(5)
            while client.recv(BLOCK):  # whatever still comes, until the client closes
                pass


def _error_xml(code: str) -> bytes:
    message = MESSAGES.get(code, code)
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        "<RequestId>s3-front</RequestId></Error>"
    ).encode()


def _read_head(sock: socket.socket, buffer: bytes) -> tuple[bytes | None, bytes]:
    """The next request's head (through the blank line) and what follows it; None at EOF."""
    while b"\r\n\r\n" not in buffer:
        data = sock.recv(BLOCK)
        if not data:
            return None, b""
        buffer += data
    end = buffer.index(b"\r\n\r\n") + 4
    return buffer[:end], buffer[end:]


def _parse(head: bytes) -> tuple[str, str, int, bool]:
    """(method, target, body length, whether it waits for 100-continue) of a request head.
    Only Content-Length bodies: boto3 sends S3 nothing else here."""
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise OSError("chunked request bodies are not relayed")
    expects = headers.get("expect", "").lower() == "100-continue"
    return method, target, int(headers.get("content-length", "0")), expects


def _relay_body(client: socket.socket, server: socket.socket, buffer: bytes, length: int) -> bytes:
    """Pass length body bytes from client (buffer first) to server; return what follows."""
    now, buffer = buffer[:length], buffer[length:]
    server.sendall(now)
    left = length - len(now)
    while left > 0:
        data = client.recv(min(BLOCK, left))
        if not data:
            raise OSError("the client closed mid-body")
        server.sendall(data)
        left -= len(data)
    return buffer


def _read_body(sock: socket.socket, buffer: bytes, length: int) -> None:
    """Read and drop the rest of a body of length bytes, of which buffer holds the first."""
    left = length - len(buffer)
    while left > 0:
        data = sock.recv(min(BLOCK, left))
        if not data:
            return
        left -= len(data)


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """S3's answers back to the client, as they come."""
    with contextlib.suppress(OSError):
        while data := source.recv(BLOCK):
            sink.sendall(data)
    _close(sink)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
