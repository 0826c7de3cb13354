"""A front end before a real registry that sends blob GET bodies chunked, without
Content-Length, as some registries do (containerd#5124); every other answer, blob HEADs
included, passes unchanged. It can also change the blob on the way, to stand for a front end
that sends wrong bytes."""

from __future__ import annotations

from collections.abc import Callable

from tests.stack.fake_upstream import FakeUpstream, Reply, Seen
from tests.stack.procs import local_session

# Not passed on: what the front end sets itself, and the hop-by-hop headers.
_OWN = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive", "date"})
CHUNK = 64 * 1024


def unchanged(body: bytes) -> bytes:
    """The blob as the registry sent it."""
    return body


class ChunkedFront(FakeUpstream):
    """Serves on 127.0.0.1:free-port from a thread, in front of `upstream_url` (GET and HEAD).

    A GET answered 200 on a `/blobs/` path reaches the client as `mangle(body)` in 64 KiB
    chunks (Transfer-Encoding: chunked, no Content-Length), then the connection closes; the
    whole blob is held in memory on the way, so keep blobs test-sized. `.blob_gets` counts
    those GETs; `.seen` records every request (FakeUpstream)."""

    def __init__(self, upstream_url: str, mangle: Callable[[bytes], bytes] = unchanged):
        self.upstream_url = upstream_url.rstrip("/")
        self.mangle = mangle
        self.blob_gets = 0
        self._session = local_session()
        super().__init__(self._forward)

    def _forward(self, seen: Seen) -> Reply:
        answer = self._session.request(
            seen.method,
            self.upstream_url + seen.target,
            headers={n: v for n, v in seen.headers if n.lower() not in ("host", *_OWN)},
            allow_redirects=False,
            timeout=60,
        )
        if seen.method == "HEAD":  # untouched, its Content-Length included
            kept = _OWN - {"content-length"}
            headers = [(n, v) for n, v in answer.headers.items() if n.lower() not in kept]
            return Reply(answer.status_code, headers)
        headers = [(n, v) for n, v in answer.headers.items() if n.lower() not in _OWN]
        if answer.status_code != 200 or "/blobs/" not in seen.target:
            return Reply(answer.status_code, headers, answer.content)
        self.blob_gets += 1
        body = self.mangle(answer.content)
        chunks = [body[i : i + CHUNK] for i in range(0, len(body), CHUNK)]
        framed = [b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks]
        return Reply(200, [*headers, ("Transfer-Encoding", "chunked")], [*framed, b"0\r\n\r\n"])

    def stop(self) -> None:
        """Stop serving and close the connections to the registry."""
        super().stop()
        self._session.close()
