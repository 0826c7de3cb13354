"""Stream a blob to the client while checking its digest, feeding an upload on the way."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Protocol

from .errors import AbortResponse
from .names import Digest

LOG = logging.getLogger(__name__)


class Feed(Protocol):
    """Where the tee copies the bytes: an upload that publishes only after finish()."""

    def write(self, chunk: bytes) -> None: ...
    def finish(self) -> None: ...
    def abort(self, reason: str) -> None: ...


def verified_stream(
    chunks: Iterable[bytes], digest: Digest, size: int | None, feed: Feed
) -> Iterator[bytes]:
    """Yield chunks to the client, holding back the last one until the digest is checked.

    If the bytes do not hash to digest, or do not add up to size, the last chunk is never sent
    and the response is cut (AbortResponse): the client sees a short read, never a complete wrong
    blob. The feed gets every chunk and finish() only when the blob checked out; abort()
    otherwise, also when the client goes away.
    """
    hasher, received, held, finished = digest.hasher(), 0, None, False
    try:
        for chunk in chunks:
            if held is not None:
                yield held
            hasher.update(chunk)
            received += len(chunk)
            feed.write(chunk)
            held = chunk
        problem = _mismatch(hasher.hexdigest(), received, digest, size)
        if problem:
            LOG.error(
                "upstream sent a wrong blob for %s: %s; cutting the response", digest, problem
            )
            raise AbortResponse(problem)
        feed.finish()
        finished = True
        if held is not None:
            yield held
    finally:  # also GeneratorExit: the client went away
        if not finished:
            feed.abort("the blob did not arrive whole and verified")


def _mismatch(hexdigest: str, received: int, digest: Digest, size: int | None) -> str | None:
    """What is wrong with what arrived, or None when it is the blob asked for."""
    if size is not None and received != size:
        return f"received {received} bytes of {size}"
    if hexdigest != digest.hex:
        return f"content hashes to {digest.algorithm}:{hexdigest}"
    return None
