"""Blob downloads a test drives step by step: read some, stop reading (the socket stays open),
read on, hang up; and tell a complete download from a short read."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping

import requests
import urllib3

from tests.stack.procs import local_session

MIB = 1024 * 1024
# What a connection closed before Content-Length raises, depending on where it is noticed.
SHORT_READ = (requests.RequestException, urllib3.exceptions.HTTPError, OSError)


class Download:
    """A GET of `url` on its own connection, its body read only when the test asks.

    `received` counts body bytes, `digest` hashes them ("sha256:<hex>"), `kept` holds them when
    `keep` is true, `last_byte_at` is time.monotonic() when the last one arrived, and `ended`
    tells whether the body ended (complete, or cut: compare `received` with `length`).
    """

    def __init__(
        self,
        url: str,
        headers: Mapping[str, str] | None = None,
        keep: bool = False,
        hash_bytes: bool = True,
        chunk: int = MIB,
        timeout: float = 120,
    ) -> None:
        self.session = local_session()
        self.response = self.session.get(
            url, headers=dict(headers or {}), stream=True, allow_redirects=False, timeout=timeout
        )
        self.status = self.response.status_code
        length = self.response.headers.get("Content-Length")
        self.length = int(length) if length is not None else None
        self.received = 0
        self.kept = bytearray() if keep else None
        self.ended = False
        self.short_read = False
        self.last_byte_at: float | None = None
        self._hasher = hashlib.sha256() if hash_bytes else None
        self._chunks = self.response.iter_content(chunk)

    @property
    def digest(self) -> str:
        """sha256 of the body bytes read so far."""
        assert self._hasher is not None, "started with hash_bytes=False"
        return f"sha256:{self._hasher.hexdigest()}"

    @property
    def complete(self) -> bool:
        """The body ended, with as many bytes as announced."""
        return self.ended and not self.short_read and self.received == self.length

    def read(self, at_least: float = float("inf")) -> int:
        """Read on until `at_least` body bytes in all, or the end of the body; return the count.
        A connection cut before the announced length ends the body as a short read."""
        try:
            while self.received < at_least and not self.ended:
                data = next(self._chunks, None)
                if data is None:
                    self.ended = True
                    break
                self.last_byte_at = time.monotonic()
                self.received += len(data)
                if self._hasher is not None:
                    self._hasher.update(data)
                if self.kept is not None:
                    self.kept += data
        except SHORT_READ:
            self.ended = self.short_read = True
        if self.ended and self.length is not None and self.received < self.length:
            self.short_read = True
        return self.received

    def read_to_end(self) -> Download:
        """Read the whole body (or what comes of it before the connection is cut)."""
        self.read()
        return self

    def close(self) -> None:
        """Hang up: close the response and its connection."""
        self.response.close()
        self.session.close()

    def __enter__(self) -> Download:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def fetch(url: str, headers: Mapping[str, str] | None = None, keep: bool = True) -> Download:
    """GET url to the end of its body (no redirect followed) and hang up."""
    with Download(url, headers, keep=keep) as download:
        return download.read_to_end()
