"""Repository names and digests, checked against the OCI distribution spec's grammar."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from .errors import DigestInvalid, NameInvalid

# distribution-spec "Pulling blobs": <name> components and the digest grammar of image-spec.
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
DIGEST_RE = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
MAX_NAME_LENGTH = 255  # distribution refuses longer names

# Registered algorithms (image-spec descriptor.md): name -> length of the lowercase hex encoding.
ALGORITHMS = {"sha256": 64, "sha512": 128}

# DOTALL: a name holding a (percent-encoded) line feed is a blob path too, refused by parse_name.
_BLOB_PATH = re.compile(r"(?P<name>.+)/blobs/(?P<digest>[^/]*:[^/]*)", re.DOTALL)


@dataclass(frozen=True)
class Digest:
    """A content digest of a registered algorithm, e.g. sha256:<64 hex>."""

    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    def hasher(self):
        """A fresh hashlib object for this digest's algorithm."""
        return hashlib.new(self.algorithm)


@dataclass(frozen=True)
class BlobRef:
    """A blob addressed through a repository: /v2/<name>/blobs/<digest>."""

    name: str
    digest: Digest

    @property
    def path(self) -> str:
        """The canonical request path of this blob."""
        return f"/v2/{self.name}/blobs/{self.digest}"


def parse_digest(value: str) -> Digest:
    """Check a digest string; raise DigestInvalid unless it is well-formed and registered."""
    if not DIGEST_RE.fullmatch(value):
        raise DigestInvalid(
            "digest does not match the grammar algorithm:encoded", {"digest": value}
        )
    algorithm, encoded = value.split(":", 1)
    length = ALGORITHMS.get(algorithm)
    if length is None:
        raise DigestInvalid(f"unsupported digest algorithm {algorithm!r}", {"digest": value})
    if len(encoded) != length or not re.fullmatch(r"[a-f0-9]+", encoded):
        raise DigestInvalid(
            f"{algorithm} digests are {length} lowercase hex characters", {"digest": value}
        )
    return Digest(algorithm, encoded)


def parse_name(value: str) -> str:
    """Check a repository name; raise NameInvalid unless it follows the spec's grammar."""
    if len(value) > MAX_NAME_LENGTH or not NAME_RE.fullmatch(value):
        raise NameInvalid(
            "repository names are lowercase path components of [a-z0-9] joined by '.', '_', "
            "'__' or '-', separated by '/'",
            {"name": value},
        )
    return value


def parse_blob_path(rest: str) -> BlobRef | None:
    """The blob a path below /v2/ names, or None when the path is not a blob's.

    A path shaped like a blob's whose name or digest is malformed raises NameInvalid or
    DigestInvalid, so nothing malformed reaches the upstream or S3.
    """
    match = _BLOB_PATH.fullmatch(rest)
    if match is None:
        return None
    return BlobRef(parse_name(match.group("name")), parse_digest(match.group("digest")))
