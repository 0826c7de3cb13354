"""Benchmark 1 (issue #2): bloblo as a pure streaming proxy against the registry it fronts.

A plain docker-registry holds one big blob. bloblo runs in front of it with
BLOBLO_MAX_FILLS=0, so it only streams: HEAD upstream, then GET upstream copied to the client.
Each round downloads the blob with curl directly, through bloblo, and through a bare TCP relay
in Python (the cost of the extra hop alone), back to back, the order rotating; the ratio of each
round's throughputs is the figure that counts. One unmeasured download per path comes first.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from bench.measure import GIB, MB, MIB, WorkerWatch, curl_download, rotated, worker_rows
from bench.relay import RelayServer
from bench.report import Row, Section, Target
from tests.stack.bloblo import BlobloServer
from tests.stack.images import push_big_blob
from tests.stack.procs import LOOPBACK
from tests.stack.regclient import RegistryClient
from tests.stack.registry import Registry
from tests.stack.s3 import S3Server

LOG = logging.getLogger(__name__)

REPO = "bench/big"
PATHS = ("direct", "bloblo", "relay")


@dataclass(frozen=True)
class Plan:
    """How big the blob is and how many rounds run."""

    size: int
    rounds: int


FULL = Plan(size=GIB, rounds=5)
QUICK = Plan(size=128 * MIB, rounds=3)


@dataclass(frozen=True)
class RoundResult:
    """One round: throughput of each path (bytes/s) and what bloblo's worker used meanwhile."""

    speeds: dict[str, float]
    rss_growth: int
    cpu_seconds: float


def run(workdir: Path, quick: bool = False) -> Section:
    """Start registry, S3 and bloblo under `workdir`, run the rounds, stop everything."""
    plan = QUICK if quick else FULL
    with contextlib.ExitStack() as stack:
        # bloblo asks S3 about every blob even when it uploads none: moto's empty bucket answers.
        s3 = stack.enter_context(S3Server(workdir / "s3", kind="moto"))
        bucket = s3.create_bucket("bench-proxy")
        registry = stack.enter_context(Registry(workdir / "registry"))
        url_path = f"/v2/{REPO}/blobs/{_push_blob(registry, plan.size, workdir)}"
        bloblo = stack.enter_context(
            BlobloServer(
                workdir / "bloblo",
                registry.url,
                s3.endpoint_url,
                bucket,
                workers=1,
                env={"BLOBLO_MAX_FILLS": "0"},
            )
        )
        relay = stack.enter_context(RelayServer(workdir / "relay", LOOPBACK, registry.port))
        urls = {
            path: server.url + url_path
            for path, server in zip(PATHS, (registry, bloblo, relay), strict=True)
        }
        for url in urls.values():  # warm-up: page cache, connections, code paths
            curl_download(url)
        results = [_round(index, urls, bloblo) for index in range(plan.rounds)]
    return _section(plan, results)


def _push_blob(registry: Registry, size: int, workdir: Path) -> str:
    """Push `size` random bytes as one blob (and a manifest); return its digest."""
    client = RegistryClient(registry.url)
    try:
        blob = push_big_blob(client, REPO, "big", size, workdir)
    finally:
        client.close()
    blob.path.unlink()  # the registry has its own copy
    return blob.digest


def _round(index: int, urls: dict[str, str], bloblo: BlobloServer) -> RoundResult:
    """Download the blob through each path; watch bloblo's worker while it streams."""
    speeds: dict[str, float] = {}
    watch = WorkerWatch(bloblo.worker_pids())
    for path in rotated(PATHS, index):
        with watch if path == "bloblo" else contextlib.nullcontext():
            speeds[path] = curl_download(urls[path])[0]
    LOG.info(
        "proxy round %d: %s MB/s, bloblo worker RSS +%.1f MiB",
        index + 1,
        ", ".join(f"{path} {speed / MB:.0f}" for path, speed in speeds.items()),
        watch.rss_growth / MIB,
    )
    return RoundResult(speeds, watch.rss_growth, watch.cpu_seconds)


def _section(plan: Plan, results: list[RoundResult]) -> Section:
    gib = plan.size / GIB
    return Section(
        title="proxy: bloblo as a pure streaming proxy (issue #2)",
        setup=(
            f"One {plan.size / MIB:,.0f} MiB blob in a plain docker-registry; bloblo (1 gevent "
            "worker, BLOBLO_MAX_FILLS=0) in front. Each of "
            f"{plan.rounds} rounds GETs the blob with curl directly, through bloblo and through a "
            "bare TCP relay (Python, gevent, 1 MiB recv_into/sendall), back to back, the order "
            "rotating. Ratios: median of the per-round ratios."
        ),
        rows=[
            Row("GET direct from the registry", _speeds(results, "direct"), "MB/s", digits=0),
            Row("GET through bloblo", _speeds(results, "bloblo"), "MB/s", digits=0),
            Row("GET through a bare gevent TCP relay", _speeds(results, "relay"), "MB/s", digits=0),
            Row(
                "throughput bloblo / direct",
                _ratios(results, "bloblo", "direct"),
                target=Target(">=", 0.8),
            ),
            Row("throughput relay / direct", _ratios(results, "relay", "direct")),
            *worker_rows(
                "a GET (streaming only)",
                [r.rss_growth for r in results],
                [r.cpu_seconds for r in results],
                [gib] * len(results),
            ),
        ],
    )


def _speeds(results: list[RoundResult], path: str) -> list[float]:
    return [r.speeds[path] / MB for r in results]


def _ratios(results: list[RoundResult], path: str, baseline: str) -> list[float]:
    return [r.speeds[path] / r.speeds[baseline] for r in results]
