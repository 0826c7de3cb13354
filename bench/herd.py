"""Benchmark herd (issue #7): many clients at once of one blob that no cache holds yet.

A plain docker-registry holds the blobs; bloblo (2 gevent workers, its default on 2 cores) in
front, caching in LocalStack, its spools in a directory of its own (BLOBLO_SPOOL_DIR). Each
round pushes two fresh blobs of random bytes, one per side, and 20 clients (threads of this
process with requests, each its own connection, streaming and hashing what arrives) GET one of
them at once through bloblo, the other at once straight from the registry; the order of the two
sides rotates from round to round. A cache miss starts one fill per digest and host, and every
other client, in that worker or another, reads from it: the registry should serve the blob
once. The registry's own log says what it served (`http.response.written` of
every GET of the blob). Every client's digest is checked. After the herd through bloblo the
benchmark polls the bucket for the blob's key, then waits until no worker holds a spool file
open (every fill's upload is over) before anything else runs. One small blob through each side
first, unmeasured.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.blobs import (
    blob_path,
    cache_key,
    check_downloads,
    download_together,
    push_fresh_blob,
    registry_gets_settled,
    wait_fills_ended,
)
from bench.measure import GIB, MB, MIB, WorkerWatch, rotated, seconds_until_stored, worker_rows
from bench.report import Row, Section, Target
from tests.stack.bloblo import BlobloServer
from tests.stack.registry import Registry
from tests.stack.s3 import S3Server

LOG = logging.getLogger(__name__)

REPO = "bench/herd"
WORKERS = 2  # bloblo's default on this machine: one per core
CLIENTS = 20
PATHS = ("bloblo", "direct")
STORE_TIMEOUT = 120.0  # how long the bucket may take to hold the blob after the last client
WARM_UP_SIZE = 4 * MIB


@dataclass(frozen=True)
class Plan:
    """How big each blob is and how many rounds run."""

    size: int
    rounds: int


FULL = Plan(size=256 * MIB, rounds=3)
QUICK = Plan(size=64 * MIB, rounds=1)


@dataclass
class Stack:
    """The running processes, bloblo's bucket and spool directory."""

    s3: S3Server
    registry: Registry
    bloblo: BlobloServer
    bucket: str
    spool_dir: Path
    s3_client: object  # boto3 S3 client, made once


@dataclass(frozen=True)
class Herd:
    """One herd: seconds until the last client had the blob, the registry's GETs of it and the
    bytes they served; through bloblo also when the bucket held it (after the last client) and
    what bloblo's workers used meanwhile."""

    seconds: float
    gets: int
    served: int
    stored_after: float = 0.0
    cpu_seconds: float = 0.0
    rss_growth: int = 0


@contextlib.contextmanager
def running_stack(workdir: Path) -> Iterator[Stack]:
    """Start LocalStack, the registry and bloblo; stop them all."""
    with contextlib.ExitStack() as stack:
        s3 = stack.enter_context(S3Server(workdir / "s3"))
        bucket = s3.create_bucket("bench-herd")
        registry = stack.enter_context(Registry(workdir / "registry"))
        spool_dir = workdir / "spool"
        spool_dir.mkdir(parents=True, mode=0o700)
        bloblo = stack.enter_context(
            BlobloServer(
                workdir / "bloblo",
                registry.url,
                s3.endpoint_url,
                bucket,
                workers=WORKERS,
                env={"BLOBLO_SPOOL_DIR": str(spool_dir)},
            )
        )
        yield Stack(s3, registry, bloblo, bucket, spool_dir, s3.client())


def run(workdir: Path, quick: bool = False) -> Section:
    """Start the stack under `workdir`, run the rounds, stop everything."""
    plan = QUICK if quick else FULL
    with running_stack(workdir) as stack:
        for path in PATHS:  # warm-up: connections, code paths, the first fill of each worker
            digest = push_fresh_blob(stack.registry, REPO, WARM_UP_SIZE, workdir)
            _herd(stack, path, digest, WARM_UP_SIZE)
        results = [_round(stack, plan, workdir, index) for index in range(plan.rounds)]
    return _section(plan, results)


def _round(stack: Stack, plan: Plan, workdir: Path, index: int) -> dict[str, Herd]:
    """A fresh blob per side; a herd of it through each side, the order rotating."""
    digests = {path: push_fresh_blob(stack.registry, REPO, plan.size, workdir) for path in PATHS}
    herds = {path: _herd(stack, path, digests[path], plan.size) for path in rotated(PATHS, index)}
    LOG.info(
        "herd round %d: %s",
        index + 1,
        ", ".join(
            f"{path} {one.seconds:.2f} s, registry {one.served / plan.size:.2f}x in {one.gets}"
            for path, one in herds.items()
        ),
    )
    return herds


def _herd(stack: Stack, path: str, digest: str, size: int) -> Herd:
    """CLIENTS clients GET blob `digest` (`size` bytes) at once through `path`; check that
    each got it."""
    uri = blob_path(REPO, digest)
    if path == "direct":
        started, downloads = download_together(stack.registry.url + uri, CLIENTS)
        check_downloads(downloads, digest, size, path)
        gets, served = registry_gets_settled(stack.registry, uri, at_least=CLIENTS)
        return Herd(max(d.finished for d in downloads) - started, gets, served)
    workers = stack.bloblo.worker_pids()
    with WorkerWatch(workers) as watch:
        started, downloads = download_together(stack.bloblo.url + uri, CLIENTS)
        last = max(d.finished for d in downloads)
        check_downloads(downloads, digest, size, path)
        stored_after = seconds_until_stored(
            stack.s3_client, stack.bucket, [cache_key(digest)], last, STORE_TIMEOUT
        )
        if not wait_fills_ended(workers, stack.spool_dir, STORE_TIMEOUT):
            LOG.warning(
                "herd: a fill of %s still runs %.0f s after its clients", digest, STORE_TIMEOUT
            )
    gets, served = registry_gets_settled(stack.registry, uri, at_least=1)
    return Herd(
        last - started,
        gets,
        served,
        float("inf") if stored_after is None else stored_after,
        watch.cpu_seconds,
        watch.rss_growth,
    )


def _section(plan: Plan, results: list[dict[str, Herd]]) -> Section:
    def seconds(path: str) -> list[float]:
        return [r[path].seconds for r in results]

    def served(path: str) -> list[float]:
        return [r[path].served / plan.size for r in results]

    def bloblo(attribute: str) -> list[float]:
        return [getattr(r["bloblo"], attribute) for r in results]

    delivered = CLIENTS * plan.size
    return Section(
        title="herd: 20 clients at once of one uncached blob (issue #7)",
        setup=(
            f"A plain docker-registry; bloblo ({WORKERS} gevent workers, LocalStack) in front. "
            f"Each of {plan.rounds} rounds pushes two fresh {plan.size / MIB:,.0f} MiB blobs of "
            f"random bytes; {CLIENTS} clients (threads, requests, each its own connection, "
            "streaming and hashing) GET one at once through bloblo, the other at once straight "
            "from the registry, the order rotating. Registry bytes: the sum of "
            "`http.response.written` over the GETs of the blob in the registry's log. Ratios: "
            "median of the per-round ratios."
        ),
        rows=[
            Row(f"last of {CLIENTS} clients has the blob, through bloblo", seconds("bloblo"), "s"),
            Row(f"last of {CLIENTS} clients has the blob, direct", seconds("direct"), "s"),
            Row(
                "time to the last client: bloblo / direct",
                [b / d for b, d in zip(seconds("bloblo"), seconds("direct"), strict=True)],
            ),
            Row(
                f"{CLIENTS} x blob / time to the last client, through bloblo",
                [delivered / s / MB for s in seconds("bloblo")],
                "MB/s",
                digits=0,
            ),
            Row(
                f"{CLIENTS} x blob / time to the last client, direct",
                [delivered / s / MB for s in seconds("direct")],
                "MB/s",
                digits=0,
            ),
            Row(
                "registry bytes for the blob / blob size, through bloblo",
                served("bloblo"),
                target=Target("<=", 1),
            ),
            Row("registry GETs of the blob through bloblo (fills)", bloblo("gets"), digits=0),
            Row("registry bytes for the blob / blob size, direct", served("direct")),
            Row(
                "bloblo's bucket holds the blob, after the last client had it",
                bloblo("stored_after"),
                "s",
            ),
            *worker_rows(
                f"a herd ({CLIENTS} clients, fills and S3 uploads)",
                bloblo("rss_growth"),
                bloblo("cpu_seconds"),
                [delivered / GIB] * len(results),
            ),
        ],
        notes=[
            f"Each client checks what it got: all {CLIENTS} of every herd had the blob's digest "
            "and size.",
            "The registry's GETs through bloblo are the fills: one for the host, whichever of "
            f"the {WORKERS} workers its clients reached, a target of 1x the blob's bytes.",
            "Time: from the moment the clients were let go (each opens its connection then) until "
            "the last one had the last byte. The clients' hashing runs in this process, on the "
            "same 2 cores, for both sides.",
            "CPU: user + system seconds of both bloblo workers from the herd's start until every "
            f"fill's upload was over, per GiB delivered to clients ({CLIENTS} x the blob).",
        ],
    )
