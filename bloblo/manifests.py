"""Image references and manifests: what `bloblo warm` names, and the blobs a manifest lists.

Pure parsing, no I/O: references as docker writes them, OCI image manifests and indexes (OCI
image-spec manifest.md, image-index.md) and Docker's image manifest v2 schema 2 and manifest list.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from .errors import RegistryError
from .names import Digest, parse_digest, parse_name

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
IMAGE_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
# The Accept header of a manifest GET: every type warm can read (distribution spec "Pulling
# manifests": the registry answers with one of them, or 404 if it holds none it may serve).
ACCEPT = ", ".join((*INDEX_TYPES, *IMAGE_TYPES))

# distribution spec: <reference> as a tag.
_TAG = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
DEFAULT_TAG = "latest"  # as docker pull: a reference without tag or digest


class ManifestError(Exception):
    """A reference or manifest warm cannot use; the message says why, for a person."""


@dataclass(frozen=True)
class Ref:
    """A manifest at the upstream: repository name and tag or digest."""

    name: str
    reference: str  # a tag, or a digest string

    @property
    def digest(self) -> Digest | None:
        """The digest the reference pins, if it is one."""
        return parse_digest(self.reference) if ":" in self.reference else None

    def __str__(self) -> str:
        separator = "@" if ":" in self.reference else ":"
        return f"{self.name}{separator}{self.reference}"


@dataclass(frozen=True)
class Blob:
    """A blob a manifest of repository name lists: digest and size in bytes (its descriptor)."""

    name: str
    digest: Digest
    size: int


@dataclass(frozen=True)
class Platform:
    """os/architecture[/variant] as in an index entry's platform."""

    os: str
    architecture: str
    variant: str | None = None

    def matches(self, platform: dict | None) -> bool:
        """Whether an index entry's platform object is this one (an entry without one is)."""
        if platform is None:
            return True
        return (
            platform.get("os") == self.os
            and platform.get("architecture") == self.architecture
            and (self.variant is None or platform.get("variant") == self.variant)
        )

    def __str__(self) -> str:
        return "/".join(part for part in (self.os, self.architecture, self.variant) if part)


@dataclass(frozen=True)
class Parsed:
    """A manifest read: an image's blobs (config first) or an index's child manifests."""

    media_type: str
    blobs: tuple[Blob, ...] = ()  # an image manifest's config and layers
    foreign: tuple[Digest, ...] = ()  # layers with `urls`: fetched from elsewhere, not cached
    children: tuple[Ref, ...] = ()  # an index's manifests, by digest


def parse_ref(text: str, upstream_host: str) -> Ref:
    """Parse `repo:tag`, `repo@digest` or `repo` (tag `latest`), as docker writes them.

    A leading registry host (a first component with a '.' or ':', or `localhost`) is allowed
    only when it is upstream_host (host[:port] of BLOBLO_UPSTREAM_URL). `repo:tag@digest` means
    the digest. Raises ManifestError saying what is wrong.
    """
    rest = text
    first, slash, remainder = rest.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        if first.lower() != upstream_host.lower():
            raise ManifestError(
                f"{text!r} names the registry {first}, but bloblo's upstream is {upstream_host} "
                "(BLOBLO_UPSTREAM_URL): give the repository at the upstream, e.g. team/app:1.0"
            )
        rest = remainder
    rest, at, digest = rest.partition("@")
    name, colon, tag = rest.partition(":")
    try:
        parse_name(name)
        if at:
            return Ref(name, str(parse_digest(digest)))
    except RegistryError as exc:
        raise ManifestError(f"{text!r}: {exc.message}") from None
    if colon and not _TAG.fullmatch(tag):
        raise ManifestError(f"{text!r}: a tag is up to 128 of [A-Za-z0-9_.-], not starting . or -")
    return Ref(name, tag if colon else DEFAULT_TAG)


def parse_platform(text: str) -> Platform:
    """Parse `os/arch` or `os/arch/variant` (e.g. linux/arm64/v8); raise ManifestError."""
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ManifestError(f"{text!r}: a platform is os/arch or os/arch/variant, e.g. linux/amd64")
    return Platform(*parts)


def check_digest(body: bytes, digest: Digest) -> None:
    """Raise ManifestError unless body hashes to digest (a manifest fetched by digest)."""
    actual = hashlib.new(digest.algorithm, body).hexdigest()
    if actual != digest.hex:
        raise ManifestError(f"the registry's manifest hashes to {digest.algorithm}:{actual}")


def parse_manifest(
    body: bytes, content_type: str | None, name: str, platforms: tuple[Platform, ...] = ()
) -> Parsed:
    """Read a manifest of repository name as served with content_type.

    An image manifest gives its config and layers; an index or manifest list gives its child
    manifests, those matching one of platforms if any are given (an entry without a platform is
    kept). Schema 1, unknown media types and malformed JSON raise ManifestError.
    """
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ManifestError("the manifest is not JSON") from None
    if not isinstance(document, dict):
        raise ManifestError("the manifest is not a JSON object")
    media_type = (content_type or "").split(";")[0].strip() or document.get("mediaType", "")
    if media_type in ("application/json", "") and "mediaType" in document:
        media_type = document["mediaType"]
    if media_type in DOCKER_SCHEMA1 or document.get("schemaVersion") == 1:
        raise ManifestError(
            "a Docker schema 1 manifest: deprecated, and its layers cannot be warmed; "
            "push the image again with a current client"
        )
    try:
        if media_type in INDEX_TYPES:
            return _index(media_type, document, name, platforms)
        if media_type in IMAGE_TYPES:
            return _image(media_type, document, name)
    except (KeyError, TypeError, AttributeError, RegistryError) as exc:  # a wrong shape
        raise ManifestError(f"a malformed {media_type}: {exc}") from None
    raise ManifestError(f"unsupported manifest type {media_type!r}")


def _index(media_type: str, document: dict, name: str, platforms: tuple[Platform, ...]) -> Parsed:
    entries = document["manifests"]
    children = tuple(
        Ref(name, str(parse_digest(entry["digest"])))
        for entry in entries
        if not platforms or any(p.matches(entry.get("platform")) for p in platforms)
    )
    if platforms and entries and not children:  # as `docker pull --platform`: nothing is wrong
        offered = sorted({_platform_text(entry.get("platform")) for entry in entries})
        asked = ", ".join(map(str, platforms))
        raise ManifestError(f"no manifest for {asked} in this index (it has {', '.join(offered)})")
    return Parsed(media_type, children=children)


def _platform_text(platform: dict) -> str:
    parts = (platform.get("os"), platform.get("architecture"), platform.get("variant"))
    return "/".join(str(part) for part in parts if part)


def _image(media_type: str, document: dict, name: str) -> Parsed:
    blobs, foreign = [_blob(name, document["config"])], []
    for layer in document["layers"]:
        if layer.get("urls"):  # a foreign layer: clients fetch it from those URLs
            foreign.append(parse_digest(layer["digest"]))
        else:
            blobs.append(_blob(name, layer))
    return Parsed(media_type, blobs=tuple(blobs), foreign=tuple(foreign))


def _blob(name: str, descriptor: dict) -> Blob:
    size = descriptor["size"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise TypeError(f"size {size!r} of {descriptor.get('digest')}")
    return Blob(name, parse_digest(descriptor["digest"]), size)
