"""A front end before a real registry that passes every request on, streaming both ways, and
spoils blob requests on cue: a 5xx to the blob HEAD, a delay before the status line of the blob
GET, a body that stalls, is reset or ends short of its Content-Length, or carries other bytes.
The registry, bloblo and S3 stay the real ones; only the wire between them misbehaves."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

from tests.stack.fake_upstream import FakeUpstream, Reply, Seen
from tests.stack.procs import local_session

# Not passed on: the hop-by-hop headers and what the front's server sets itself.
_OWN = frozenset({"transfer-encoding", "connection", "keep-alive", "date", "server"})
CHUNK = 64 * 1024
SERVICE_UNAVAILABLE = b'{"errors":[{"code":"UNAVAILABLE","message":"the registry is overloaded"}]}'


@dataclass
class Spoil:
    """How the front spoils the next blob request of one kind.

    method "HEAD": answered with status (a 5xx) and a JSON error instead of the registry's answer.
    method "GET" (a whole blob, without Range): delay seconds before the status line; then, after
    `after` bytes of the body, `cut` it: "stall" (nothing more for `stall` seconds, then a close),
    "reset" (RST) or "close" (a clean close short of Content-Length); or `wrong`: every byte
    passed, one of them changed."""

    method: str = "GET"
    status: int | None = None
    delay: float = 0.0
    after: int = 0
    cut: str | None = None
    stall: float = 0.0
    wrong: bool = False


class RegistryFront(FakeUpstream):
    """Serves on 127.0.0.1:port (a free one unless given) from threads, in front of registry_url.

    spoil(Spoil(...), times=n) spoils the next n blob requests of its kind; every other request
    passes untouched (bodies streamed, headers as the registry sent them). `.spoiled` counts the
    requests spoiled; `.seen` records every request (FakeUpstream)."""

    def __init__(self, registry_url: str, port: int = 0):
        self.registry_url = registry_url.rstrip("/")
        self.spoiled = 0
        self._spoils: list[Spoil] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._session = local_session()
        super().__init__(self._forward, port=port)

    def spoil(self, spoil: Spoil, times: int = 1) -> None:
        """Spoil the next `times` blob requests of spoil.method as spoil says."""
        with self._lock:
            self._spoils += [spoil] * times

    def clear(self) -> None:
        """Spoil nothing more (every request passes), and count spoiled requests from 0."""
        with self._lock:
            self._spoils.clear()
            self.spoiled = 0

    def _take(self, seen: Seen) -> Spoil | None:
        """The spoil for this request, if one is waiting for its kind (and it is used up)."""
        if "/blobs/" not in seen.target or seen.header_values("Range"):
            return None
        with self._lock:
            for spoil in self._spoils:
                if spoil.method == seen.method:
                    self._spoils.remove(spoil)
                    self.spoiled += 1
                    return spoil
        return None

    def _forward(self, seen: Seen) -> Reply:
        spoil = self._take(seen)
        if spoil is not None and spoil.status is not None:
            headers = [("Content-Type", "application/json")]
            return Reply(spoil.status, headers, SERVICE_UNAVAILABLE)
        if spoil is not None and spoil.delay:
            self._stopping.wait(spoil.delay)  # the status line comes this late
        answer = self._session.request(
            seen.method,
            self.registry_url + seen.target,
            headers={n: v for n, v in seen.headers if n.lower() not in ("host", *_OWN)},
            data=seen.body or None,
            allow_redirects=False,
            stream=True,
            timeout=60,
        )
        headers = [(n, v) for n, v in answer.raw.headers.items() if n.lower() not in _OWN]
        if seen.method == "HEAD" or answer.raw.headers.get("Content-Length") == "0":
            answer.close()
            return Reply(answer.status_code, headers, b"")
        body = self._streamed(answer)
        if spoil is not None and answer.status_code == 200:
            body = self._spoiled_body(body, spoil)
        return Reply(
            answer.status_code, headers, body, reset=spoil is not None and spoil.cut == "reset"
        )

    @staticmethod
    def _streamed(answer) -> Iterator[bytes]:
        try:
            yield from answer.raw.stream(CHUNK, decode_content=False)
        finally:
            answer.close()

    def _spoiled_body(self, body: Iterator[bytes], spoil: Spoil) -> Iterator[bytes]:
        """body, cut after spoil.after bytes as spoil.cut says, or with one byte changed."""
        sent = 0
        try:
            for chunk in body:
                if spoil.cut is not None and sent + len(chunk) >= spoil.after:
                    yield chunk[: spoil.after - sent]
                    if spoil.cut == "stall":
                        self._stopping.wait(spoil.stall)
                    return  # "close": a clean close; "reset": the server resets the connection
                if spoil.wrong and sent == 0:
                    chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
                sent += len(chunk)
                yield chunk
        finally:
            body.close()

    def stop(self) -> None:
        """End every delay and stall, stop serving, close the connections to the registry."""
        self._stopping.set()
        super().stop()
        self._session.close()
