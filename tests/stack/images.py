"""Real OCI images for tests: random layers in an OCI image layout, moved with skopeo, and big
raw blobs pushed through the registry HTTP API."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import random
import tarfile
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tests.stack.procs import run
from tests.stack.regclient import CHUNK, OCI_INDEX, OCI_MANIFEST, RegistryClient

LOG = logging.getLogger(__name__)

SKOPEO = "/usr/bin/skopeo"
# As root, skopeo keeps a blob-info cache here (no flag moves it): where it saw each blob, by
# registry host:port. Tests reuse ports, so it points at servers of earlier tests; a push then
# tries to reuse blobs from them, and two fresh-clone CI runs failed on a token request answered
# 404. Every copy starts without it.
BLOB_INFO_CACHE = Path("/var/lib/containers/cache")
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
REF_NAME = "org.opencontainers.image.ref.name"
# Random data does not compress. Level 1 deflates at ~50 MB/s here; level 0 (stored blocks,
# still valid gzip) at ~700 MB/s: pass compresslevel=0 for big layers when speed matters.
GZIP_LEVEL = 1

Creds = tuple[str, str]


@dataclass(frozen=True)
class Layer:
    """One layer blob: digest and size of the gzip'd tar, and its diff_id (sha256 of the tar)."""

    digest: str
    size: int
    diff_id: str


@dataclass(frozen=True)
class Image:
    """An image stored in an OCI layout at `dir` under `tag`."""

    dir: Path
    tag: str
    manifest_digest: str
    manifest_size: int
    config_digest: str
    layers: tuple[Layer, ...]

    @property
    def ref(self) -> str:
        """The skopeo reference of this image: oci:DIR:TAG."""
        return f"oci:{self.dir}:{self.tag}"

    @property
    def layer_digests(self) -> list[str]:
        """The digests of the layer blobs, in manifest order."""
        return [layer.digest for layer in self.layers]

    def blob_path(self, digest: str) -> Path:
        """The file holding blob `digest` in the layout."""
        return self.dir / "blobs" / digest.replace(":", "/", 1)

    def blob_bytes(self, digest: str) -> bytes:
        """The bytes of blob `digest` (keep it to small blobs)."""
        return self.blob_path(digest).read_bytes()


class _HashingWriter(io.RawIOBase):
    """A write-only stream that hashes and counts what passes through to `target`."""

    def __init__(self, target) -> None:
        self.target = target
        self.sha256 = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        self.target.write(data)
        return len(data)

    @property
    def digest(self) -> str:
        return f"sha256:{self.sha256.hexdigest()}"


class _RandomReader(io.RawIOBase):
    """`size` incompressible bytes from `rng`, readable in chunks."""

    def __init__(self, size: int, rng: random.Random | None) -> None:
        self.left = size
        self.rng = rng

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return self.rng.randbytes(n) if self.rng else os.urandom(n)


def _rng(seed: int | None) -> random.Random | None:
    return random.Random(seed) if seed is not None else None


def write_random_file(path: Path, size: int, seed: int | None = None) -> str:
    """Write `size` random bytes to `path` (streamed, never all in memory); return the digest."""
    source = _RandomReader(size, _rng(seed))
    with open(path, "wb") as raw:
        sink = _HashingWriter(raw)
        while chunk := source.read(CHUNK):
            sink.write(chunk)
    return sink.digest


def _write_blob(blobs: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return f"sha256:{digest}"


def _write_layer(
    blobs: Path, index: int, size: int, rng: random.Random | None, compresslevel: int
) -> Layer:
    """Write a gzip'd tar with one file of `size` random bytes; name it by digest."""
    partial = blobs / f"layer-{index}.partial"
    with open(partial, "wb") as raw:
        compressed = _HashingWriter(raw)
        gzipped = gzip.GzipFile(fileobj=compressed, mode="wb", compresslevel=compresslevel, mtime=0)
        with gzipped as gz:
            uncompressed = _HashingWriter(gz)
            with tarfile.open(fileobj=uncompressed, mode="w|") as tar:
                tar.copybufsize = CHUNK
                info = tarfile.TarInfo(f"bloblo/layer-{index}.bin")
                info.size, info.mode, info.mtime = size, 0o644, 0
                tar.addfile(info, _RandomReader(size, rng))
    partial.rename(blobs / compressed.sha256.hexdigest())
    return Layer(compressed.digest, compressed.size, uncompressed.digest)


def _config(layers: Iterable[Layer]) -> bytes:
    layers = list(layers)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "2024-01-01T00:00:00Z",
        "config": {"Cmd": ["/bloblo/none"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [
            {"created": "2024-01-01T00:00:00Z", "created_by": f"bloblo test layer {i}"}
            for i in range(len(layers))
        ],
    }
    return json.dumps(config, sort_keys=True).encode()


def _manifest(
    config_digest: str, config_size: int, layers: Iterable[Layer], layer_type: str = OCI_LAYER_GZIP
) -> bytes:
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
        "layers": [
            {"mediaType": layer_type, "digest": layer.digest, "size": layer.size}
            for layer in layers
        ],
    }
    return json.dumps(manifest, indent=2).encode()


def build_image(
    directory: Path,
    layer_sizes: Iterable[int],
    tag: str = "latest",
    seed: int | None = None,
    compresslevel: int = GZIP_LEVEL,
) -> Image:
    """Build an OCI image layout in `directory` with one random layer per size (bytes of the
    file inside each layer; a fresh random image unless `seed` is given) and return it."""
    blobs = Path(directory) / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    rng = _rng(seed)
    layer_sizes = list(layer_sizes)
    layers = tuple(
        _write_layer(blobs, i, size, rng, compresslevel) for i, size in enumerate(layer_sizes)
    )
    config = _config(layers)
    config_digest = _write_blob(blobs, config)
    manifest = _manifest(config_digest, len(config), layers)
    manifest_digest = _write_blob(blobs, manifest)
    _write_index(Path(directory), manifest_digest, len(manifest), tag)
    LOG.info("built image %s:%s with layers %s", directory, tag, layer_sizes)
    return Image(Path(directory), tag, manifest_digest, len(manifest), config_digest, layers)


def _write_index(directory: Path, digest: str, size: int, tag: str) -> None:
    (directory / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": digest,
                "size": size,
                "annotations": {REF_NAME: tag},
            }
        ],
    }
    (directory / "index.json").write_text(json.dumps(index))


def read_image(directory: Path, tag: str) -> Image:
    """Describe the image tagged `tag` in the OCI layout at `directory` (e.g. after a pull)."""
    directory = Path(directory)
    index = json.loads((directory / "index.json").read_text())
    entry = next(m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) == tag)
    blobs = directory / "blobs"
    manifest = json.loads((blobs / entry["digest"].replace(":", "/", 1)).read_bytes())
    config = json.loads((blobs / manifest["config"]["digest"].replace(":", "/", 1)).read_bytes())
    diff_ids = config.get("rootfs", {}).get("diff_ids", [None] * len(manifest["layers"]))
    layers = tuple(
        Layer(layer["digest"], layer["size"], diff_id)
        for layer, diff_id in zip(manifest["layers"], diff_ids, strict=True)
    )
    return Image(
        directory, tag, entry["digest"], entry["size"], manifest["config"]["digest"], layers
    )


def unique_tag() -> str:
    """A tag no test used before, so session-wide registries never mix tests' images."""
    return f"t{uuid.uuid4().hex[:12]}"


def assert_same_image(got: Image, expected: Image) -> None:
    """Assert two layouts hold the same image: manifest, config and layer blobs byte-equal."""
    assert got.manifest_digest == expected.manifest_digest
    assert got.config_digest == expected.config_digest
    assert got.layers == expected.layers
    for digest in expected.layer_digests:
        assert got.blob_path(digest).read_bytes() == expected.blob_path(digest).read_bytes()


def skopeo_copy(src: str, dest: str, creds: Creds | None = None, timeout: float = 600.0) -> None:
    """Copy an image with `skopeo copy` between any two transports, plain HTTP allowed;
    `creds` (user, password) are used for each docker:// side. Raise CommandError on failure."""
    argv = [
        SKOPEO,
        "--insecure-policy",
        "copy",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
    ]
    if creds and src.startswith("docker://"):
        argv.append(f"--src-creds={creds[0]}:{creds[1]}")
    if creds and dest.startswith("docker://"):
        argv.append(f"--dest-creds={creds[0]}:{creds[1]}")
    for cache in BLOB_INFO_CACHE.glob("blob-info-cache-*"):
        cache.unlink(missing_ok=True)
    run([*argv, src, dest], timeout=timeout)


def push(
    image: Image, registry_host: str, repo: str, tag: str | None = None, creds: Creds | None = None
) -> str:
    """Push `image` to registry_host/repo:tag (default: the image's tag); return the ref."""
    ref = f"docker://{registry_host}/{repo}:{tag or image.tag}"
    skopeo_copy(image.ref, ref, creds)
    return ref


def pull(
    registry_host: str, repo: str, tag: str, dest_dir: Path, creds: Creds | None = None
) -> Image:
    """Pull registry_host/repo:tag into the OCI layout `dest_dir` and describe what arrived."""
    skopeo_copy(f"docker://{registry_host}/{repo}:{tag}", f"oci:{dest_dir}:{tag}", creds)
    return read_image(dest_dir, tag)


@dataclass(frozen=True)
class BigBlob:
    """A raw blob pushed with a manifest referencing it."""

    path: Path
    digest: str
    size: int
    manifest_digest: str


def push_big_blob(
    client: RegistryClient,
    repo: str,
    tag: str,
    size: int,
    workdir: Path,
    seed: int | None = None,
) -> BigBlob:
    """Write `size` random bytes to a file in `workdir`, push it as one blob (streamed from
    the file) and push an OCI manifest `repo:tag` whose single layer is that blob."""
    path = Path(workdir) / f"blob-{size}.bin"
    digest = write_random_file(path, size, seed)
    client.push_blob(repo, path, digest)
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [digest]}}
    ).encode()
    config_path = Path(workdir) / "config.json"
    config_path.write_bytes(config)
    config_digest = client.push_blob(repo, config_path)
    manifest = _manifest(config_digest, len(config), [Layer(digest, size, digest)], OCI_LAYER_TAR)
    manifest_digest = client.push_manifest(repo, tag, manifest, OCI_MANIFEST)
    return BigBlob(path, digest, size, manifest_digest)


def push_index(
    client: RegistryClient, repo: str, tag: str, images: Iterable[tuple[Image, str]]
) -> str:
    """Push each image by digest to repo, then an OCI index `repo:tag` listing them, each with
    its platform ("os/arch[/variant]"); return the index's digest."""
    manifests = []
    for image, platform in images:
        push(image, client.base_url.split("://", 1)[1], repo, creds=client.creds)
        os_, arch, *variant = platform.split("/")
        entry = {"os": os_, "architecture": arch, **({"variant": variant[0]} if variant else {})}
        manifests.append(
            {
                "mediaType": OCI_MANIFEST,
                "digest": image.manifest_digest,
                "size": image.manifest_size,
                "platform": entry,
            }
        )
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
    return client.push_manifest(repo, tag, json.dumps(index).encode(), OCI_INDEX)
