"""Benchmark 2 (issue #3): bloblo against the peer that does the same job, distribution's
pull-through cache on S3.

Upstream: a token-auth docker-registry. S3: LocalStack. Peer: docker-registry in `proxy:` mode
authenticating upstream as a user the issuer grants, storing on S3 (own bucket) and redirecting
blob GETs to it. bloblo: in front of the upstream, own bucket; a second bloblo with caching off
shows what the S3 upload costs a cold pull. Each round pushes a fresh image of the same size per
path, so that no side profits from another's cache, and pulls them with skopeo: cold through
bloblo, cold through the peer, directly from the upstream, cold through the uncaching bloblo;
then each cached one again (warm). The order of the paths rotates from round to round. A small
image pulled through every path first, unmeasured, warms up connections, clients and code paths.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from boto3.s3.transfer import TransferConfig

from bench import latency
from bench.measure import (
    GIB,
    MB,
    MIB,
    WorkerWatch,
    rotated,
    seconds_until_stored,
    settle_disk,
    worker_rows,
)
from bench.relay import RelayServer
from bench.report import Row, Section, Target
from tests.stack.bloblo import BlobloServer
from tests.stack.images import Image, build_image, push, read_image, skopeo_copy, unique_tag
from tests.stack.procs import LOOPBACK
from tests.stack.registry import PullThrough, Registry, S3Storage
from tests.stack.s3 import S3Server
from tests.stack.tokens import TokenIssuer

LOG = logging.getLogger(__name__)

REPO = "bench/app"
USER = ("alice", "bench-password")
USERS = {USER[0]: {"password": USER[1], "grants": {REPO: ["pull", "push"]}}}
WORKERS = 2  # bloblo's default on this machine: one per core
STORE_TIMEOUT = 120.0  # how long to wait for a cache to hold every layer after a cold pull
# "uncached" is a second bloblo with BLOBLO_MAX_FILLS=0: a cold pull without the S3 upload.
PATHS = ("bloblo", "peer", "direct", "uncached")
CACHES = ("bloblo", "peer")


@dataclass(frozen=True)
class Plan:
    """Image shape, rounds, and warm GETs per round for the latency probe."""

    layer_size: int
    layers: int
    rounds: int
    latency_requests: int


FULL = Plan(layer_size=128 * MIB, layers=4, rounds=5, latency_requests=300)
QUICK = Plan(layer_size=16 * MIB, layers=4, rounds=2, latency_requests=60)


@dataclass
class Stack:
    """The running processes and the buckets of the two caches."""

    s3: S3Server
    issuer: TokenIssuer
    upstream: Registry
    peer: Registry
    bloblo: BlobloServer
    uncached: BlobloServer
    relay: RelayServer  # a bare TCP relay to the upstream, for the latency baseline
    bloblo_bucket: str
    peer_bucket: str
    scratch_bucket: str
    s3_client: object  # boto3 S3 client, made once: making one takes tens of milliseconds

    def endpoint(self, path: str) -> tuple[str, tuple[str, str] | None]:
        """Where a pull through `path` goes (host:port) and with which credentials."""
        return {
            "bloblo": (self.bloblo.host, USER),
            "peer": (self.peer.host, None),  # the peer has no auth of its own
            "direct": (self.upstream.host, USER),
            "uncached": (self.uncached.host, USER),
        }[path]

    def cache_keys(self, path: str, image: Image) -> tuple[str, list[str]]:
        """The bucket of cache `path` and the keys its copies of the image's layers get."""
        if path == "bloblo":  # blobs/<algorithm>/<hex>
            return self.bloblo_bucket, [
                "blobs/" + d.replace(":", "/", 1) for d in image.layer_digests
            ]
        # distribution's S3 driver: docker/registry/v2/blobs/<algorithm>/<hex[:2]>/<hex>/data
        keys = []
        for digest in image.layer_digests:
            algorithm, hex_digest = digest.split(":", 1)
            keys.append(f"docker/registry/v2/blobs/{algorithm}/{hex_digest[:2]}/{hex_digest}/data")
        return self.peer_bucket, keys


@dataclass
class RoundResult:
    """One round's figures: pull seconds, seconds until each cache held every layer (inf: not
    within STORE_TIMEOUT), bloblo's CPU and RSS on the miss, S3 upload speed, latencies."""

    image_bytes: int
    pulls: dict[str, float]
    stored_after: dict[str, float]
    bloblo_cpu: float
    bloblo_rss: int
    s3_upload: float
    latencies: dict[str, list[float]]


@contextlib.contextmanager
def running_stack(workdir: Path) -> Iterator[Stack]:
    """Start LocalStack, the token issuer, the upstream, the peer, both bloblos and the relay;
    stop them all."""
    with contextlib.ExitStack() as stack:
        s3 = stack.enter_context(S3Server(workdir / "s3"))
        names = ("bloblo", "peer", "scratch", "uncached")
        buckets = {name: s3.create_bucket(f"bench-{name}") for name in names}
        issuer = stack.enter_context(TokenIssuer(workdir / "issuer", USERS))
        upstream = stack.enter_context(Registry(workdir / "upstream", token=issuer))
        peer = stack.enter_context(
            Registry(
                workdir / "peer",
                proxy=PullThrough(upstream.url, *USER),
                s3=S3Storage(s3.endpoint_url, buckets["peer"]),
            )
        )
        bloblo = stack.enter_context(
            BlobloServer(
                workdir / "bloblo", upstream.url, s3.endpoint_url, buckets["bloblo"], WORKERS
            )
        )
        uncached = stack.enter_context(
            BlobloServer(
                workdir / "uncached",
                upstream.url,
                s3.endpoint_url,
                buckets["uncached"],  # stays empty
                WORKERS,
                env={"BLOBLO_MAX_FILLS": "0"},
            )
        )
        relay = stack.enter_context(RelayServer(workdir / "relay", LOOPBACK, upstream.port))
        yield Stack(
            s3,
            issuer,
            upstream,
            peer,
            bloblo,
            uncached,
            relay,
            bloblo_bucket=buckets["bloblo"],
            peer_bucket=buckets["peer"],
            scratch_bucket=buckets["scratch"],
            s3_client=s3.client(),
        )


def run(workdir: Path, quick: bool = False) -> Section:
    """Run the rounds against a fresh stack under `workdir`."""
    plan = QUICK if quick else FULL
    with running_stack(workdir) as stack:
        _warm_up(stack, workdir / "warm-up")
        results = [_round(stack, plan, workdir / f"round{i}", i) for i in range(plan.rounds)]
    return _section(plan, results)


def _round(stack: Stack, plan: Plan, workdir: Path, index: int) -> RoundResult:
    """Push a fresh image per path, pull each cold through its path, then the cached ones warm."""
    sizes = [plan.layer_size] * plan.layers
    images = {
        path: build_image(workdir / path, sizes, tag=unique_tag(), compresslevel=0)
        for path in PATHS
    }
    for image in images.values():
        push(image, stack.upstream.host, REPO, creds=USER)
    pulls, stored_after = {}, {}
    watch = WorkerWatch(stack.bloblo.worker_pids())
    for path in rotated(PATHS, index):
        with watch if path == "bloblo" else contextlib.nullcontext():
            pulls[path], stored_after[path] = _cold_pull(stack, path, images[path], workdir)
    for path in rotated(CACHES, index):
        pulls[f"{path} warm"] = _timed_pull(stack, path, images[path], workdir / "warm")[0]
    result = RoundResult(
        image_bytes=sum(layer.size for layer in images["bloblo"].layers),
        pulls=pulls,
        stored_after=stored_after,
        bloblo_cpu=watch.cpu_seconds,
        bloblo_rss=watch.rss_growth,
        s3_upload=_s3_upload_speed(stack, images["bloblo"]),
        latencies=_latencies(stack, images["bloblo"], plan.latency_requests),
    )
    shutil.rmtree(workdir)
    LOG.info("offload round %d: pulls %s, stored after %s", index + 1, pulls, stored_after)
    return result


def _warm_up(stack: Stack, workdir: Path) -> None:
    """Pull a small fresh image through every path, cold then warm; measure nothing."""
    image = build_image(workdir / "image", [MIB, MIB], tag=unique_tag(), compresslevel=0)
    push(image, stack.upstream.host, REPO, creds=USER)
    for path in (*PATHS, *CACHES):
        _timed_pull(stack, path, image, workdir / "pull")
    shutil.rmtree(workdir)


def _cold_pull(stack: Stack, path: str, image: Image, workdir: Path) -> tuple[float, float]:
    """Pull through `path`; return its seconds and, for a cache, the seconds from the pull's
    return until its bucket held every layer (0 for the paths that cache nothing)."""
    seconds, returned = _timed_pull(stack, path, image, workdir / "cold")
    if path not in CACHES:
        return seconds, 0.0
    bucket, keys = stack.cache_keys(path, image)
    lag = seconds_until_stored(stack.s3_client, bucket, keys, returned, STORE_TIMEOUT)
    return seconds, float("inf") if lag is None else lag


def _timed_pull(stack: Stack, path: str, image: Image, dest: Path) -> tuple[float, float]:
    """skopeo copy the image into a fresh OCI layout through `path`; return (seconds taken,
    monotonic time it returned). Raises RuntimeError if other layers arrived."""
    host, creds = stack.endpoint(path)
    settle_disk()
    started = time.monotonic()
    skopeo_copy(f"docker://{host}/{REPO}:{image.tag}", f"oci:{dest}:{image.tag}", creds)
    returned = time.monotonic()
    if read_image(dest, image.tag).layer_digests != image.layer_digests:
        raise RuntimeError(f"pull through {path} brought other layers than {image.dir}")
    shutil.rmtree(dest)
    return returned - started, returned


def _s3_upload_speed(stack: Stack, image: Image) -> float:
    """Bytes/s of one layer uploaded straight to LocalStack with boto3, parts as bloblo's."""
    layer = image.layers[0]
    client = stack.s3_client
    config = TransferConfig(
        multipart_threshold=8 * MIB, multipart_chunksize=8 * MIB, max_concurrency=4
    )
    started = time.monotonic()
    client.upload_file(str(image.blob_path(layer.digest)), stack.scratch_bucket, "x", Config=config)
    seconds = time.monotonic() - started
    client.delete_object(Bucket=stack.scratch_bucket, Key="x")
    return layer.size / seconds


def _latencies(stack: Stack, image: Image, count: int) -> dict[str, list[float]]:
    """Time bloblo's 307 for a cached layer and the upstream's HEAD of it (see bench.latency)."""
    token = stack.issuer.mint(USER[0], [{"type": "repository", "name": REPO, "actions": ["pull"]}])
    path = f"/v2/{REPO}/blobs/{image.layer_digests[0]}"
    probes = [
        latency.Probe("bloblo 307", "GET", stack.bloblo.url + path, 307),
        latency.Probe("upstream HEAD", "HEAD", stack.upstream.url + path, 200),
        latency.Probe(
            "upstream HEAD, new connection", "HEAD", stack.upstream.url + path, 200, True
        ),
        latency.Probe("relay HEAD", "HEAD", stack.relay.url + path, 200),
    ]
    return latency.measure(probes, token, count)


def _section(plan: Plan, results: list[RoundResult]) -> Section:
    size = plan.layer_size * plan.layers
    section = Section(
        title="offload: bloblo against distribution's pull-through cache on S3 (issue #3)",
        setup=(
            f"Each of {plan.rounds} rounds pushes four fresh images ({plan.layers} layers of "
            f"{plan.layer_size / MIB:,.0f} MiB, {size / MIB:,.0f} MiB in all, gzip level 0) to a "
            "token-auth docker-registry and pulls them with skopeo into fresh OCI layouts: cold "
            f"through bloblo ({WORKERS} workers), cold through the peer (docker-registry 2.8 "
            "`proxy:` mode, S3 storage with redirects), directly from the upstream, cold through "
            "a second bloblo with BLOBLO_MAX_FILLS=0; then the two cached ones again (warm, "
            "both 307 to LocalStack). The order rotates; ratios: median of per-round ratios."
        ),
    )
    section.rows = _pull_rows(results) + _bloblo_rows(results)
    section.notes = _notes(results)
    return section


def _pull_rows(results: list[RoundResult]) -> list[Row]:
    def pulls(path: str) -> list[float]:
        return [r.pulls[path] for r in results]

    def ratio(a: str, b: str) -> list[float]:
        return [r.pulls[a] / r.pulls[b] for r in results]

    return [
        Row("cold pull through bloblo", pulls("bloblo"), "s"),
        Row("cold pull through the peer", pulls("peer"), "s"),
        Row("pull direct from the upstream", pulls("direct"), "s"),
        Row("cold pull through bloblo, caching off", pulls("uncached"), "s"),
        Row("warm pull through bloblo", pulls("bloblo warm"), "s"),
        Row("warm pull through the peer", pulls("peer warm"), "s"),
        Row("cold: bloblo / peer", ratio("bloblo", "peer"), target=Target("<=", 0.9)),
        Row("cold: bloblo / direct", ratio("bloblo", "direct"), target=Target("<=", 1.5, True)),
        Row("cold: bloblo caching off / direct", ratio("uncached", "direct")),
        Row("warm: bloblo / peer", ratio("bloblo warm", "peer warm"), target=Target("<=", 1.0)),
    ]


def _bloblo_rows(results: list[RoundResult]) -> list[Row]:
    return [
        Row(
            "bloblo's bucket holds every layer, after its cold pull returned",
            [r.stored_after["bloblo"] for r in results],
            "s",
            target=Target("<=", 1.0),
        ),
        Row(
            "the peer's bucket holds every layer, after its cold pull returned",
            [r.stored_after["peer"] for r in results],
            "s",
        ),
        *_latency_rows(results),
        *worker_rows(
            "a cold pull (stream, hash, upload)",
            [r.bloblo_rss for r in results],
            [r.bloblo_cpu for r in results],
            [r.image_bytes / GIB for r in results],
        ),
        Row(
            "bloblo cold pull, image bytes / pull time",
            [r.image_bytes / r.pulls["bloblo"] / MB for r in results],
            "MB/s",
            digits=0,
        ),
        Row(
            "LocalStack upload, boto3 straight from a file (8 MiB parts x 4)",
            [r.s3_upload / MB for r in results],
            "MB/s",
            digits=0,
        ),
    ]


def _latency_rows(results: list[RoundResult]) -> list[Row]:
    def p50(probe: str) -> list[float]:
        return [latency.p50_ms(r.latencies[probe]) for r in results]

    gap = [a - b for a, b in zip(p50("bloblo 307"), p50("upstream HEAD"), strict=True)]
    return [
        Row("warm blob GET through bloblo (307), p50", p50("bloblo 307"), "ms"),
        Row("HEAD of that blob at the upstream, p50", p50("upstream HEAD"), "ms"),
        Row("307 p50 minus HEAD p50", gap, "ms", target=Target("<=", 3.0)),
        Row(
            "HEAD at the upstream, new TCP connection each, p50",
            p50("upstream HEAD, new connection"),
            "ms",
        ),
        Row("HEAD through a bare gevent TCP relay, p50", p50("relay HEAD"), "ms"),
    ]


def _notes(results: list[RoundResult]) -> list[str]:
    count = sum(len(r.latencies["bloblo 307"]) for r in results)
    return [
        f"Latency: {count} sequential requests of each kind (bearer token, one keep-alive "
        f"session each, allow_redirects=False), in alternating blocks of {latency.BLOCK}.",
        "CPU: user + system seconds of all bloblo workers from the start of the cold pull until "
        "its bucket held every layer, divided by the GiB of layers pulled.",
        "Pull seconds include skopeo's start and its HTTPS probe of each plain-HTTP registry: "
        "the same for every path.",
        "Every pull starts after sync(2), untimed: no path pays for the writeback of the pushes "
        "or of the pull before it.",
    ]
