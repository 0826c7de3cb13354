"""What the upstream's answer to a client's blob HEAD proves: that the client may read the blob,
which digest the registry named for it, and how long the blob is (issues #6 and #13 §6)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import DigestInvalid
from .names import Digest, parse_digest


@dataclass(frozen=True)
class Evidence:
    """A 200 to the client's HEAD of a blob that describes the blob.

    `canonical` is None when the registry named the very digest asked for; otherwise it is the
    digest of another registered algorithm the registry named instead (distribution names a
    sha512 blob by its sha256): the blob's bytes must hash to both before they are cached, and
    a cached object is redirected to only for a HEAD naming the same one. `size` is the HEAD's
    Content-Length in bytes, None when unknown (no HEAD sent, or none given).
    """

    canonical: Digest | None = None
    size: int | None = None


def evidence_of(requested: Digest, named: str | None, length: str | None) -> Evidence | None:
    """The evidence in a 200 to a HEAD of `requested` whose Docker-Content-Digest is `named`
    and Content-Length `length`; None when it does not describe the blob: no digest, a
    malformed one, one of an unregistered algorithm, or another digest of the same algorithm
    (another blob)."""
    if named is None:
        return None
    try:
        digest = parse_digest(named)
    except DigestInvalid:
        return None
    if digest != requested and digest.algorithm == requested.algorithm:
        return None
    size = int(length) if length is not None and length.isascii() and length.isdigit() else None
    return Evidence(None if digest == requested else digest, size)


def vouches_for_cached(evidence: Evidence, cached_canonical: str | None) -> bool:
    """Whether this evidence lets its client be sent to the cached object, which was published
    with `cached_canonical` (its S3 metadata; None when it has none): always when the registry
    named the requested digest itself, else only when it named that same canonical digest."""
    return evidence.canonical is None or str(evidence.canonical) == cached_canonical
