"""Benchmark fill (issue #7): what one cache miss costs a bloblo worker, and whether the worker
still answers others while its fill runs.

A plain docker-registry holds the blobs; two bloblos with ONE gevent worker each stand in front
of it: one caching in LocalStack (its spools in a directory of its own, BLOBLO_SPOOL_DIR), one
with BLOBLO_MAX_FILLS=0 that only streams (the baseline). Each round pushes three fresh blobs of
random bytes and runs five phases, the order rotating from round to round:

- fill: one client (requests, streaming, hashing) GETs a fresh blob through the caching bloblo;
  psutil reads the worker's CPU time (user + system) when the GET starts and again when the
  bucket holds `blobs/sha256/<hex>` (polled every 20 ms), and samples its RSS every 10 ms;
- stream: the same client GETs a blob through the streaming bloblo, measured the same way from
  the start of the GET until the client has the last byte;
- fill, probed: curl GETs another fresh blob through the caching bloblo while a probe
  (bench/loop.py) sends GET /healthz to the same worker every 20 ms on a kept-alive connection,
  each latency timed from when it was due, until the bucket holds the blob;
- stream, probed: the same, curl and the probe on the streaming bloblo, until curl has the blob;
- idle, probed: the probe alone on the idle caching worker (the probe's own floor).

After each fill the benchmark waits until the worker holds no spool file open (the fill is over)
and deletes the object, so that nothing overlaps the next phase. One small blob through each
phase first, unmeasured.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.blobs import blob_path, cache_key, download, push_fresh_blob, wait_fills_ended
from bench.loop import INTERVAL, LoopProbe, latency_ms
from bench.measure import GIB, MIB, WorkerWatch, curl_download, rotated, seconds_until_stored
from bench.report import Row, Section, Target
from tests.stack.bloblo import BlobloServer
from tests.stack.procs import LOOPBACK
from tests.stack.registry import Registry
from tests.stack.s3 import S3Server

LOG = logging.getLogger(__name__)

REPO = "bench/fill"
PHASES = ("fill", "stream", "fill, probed", "stream, probed", "idle, probed")
BLOBS = ("fill", "fill, probed", "stream")  # fresh each round; both streamed GETs share one
PROBED_BLOB = {"fill, probed": "fill, probed", "stream, probed": "stream", "idle, probed": None}
STORE_TIMEOUT = 120.0  # how long the bucket may take to hold a blob after its client had it
WARM_UP_SIZE = 4 * MIB


@dataclass(frozen=True)
class Plan:
    """How big each blob is, how many rounds run, how long the idle worker is probed."""

    size: int
    rounds: int
    idle_seconds: float


FULL = Plan(size=512 * MIB, rounds=3, idle_seconds=3.0)
QUICK = Plan(size=128 * MIB, rounds=2, idle_seconds=1.0)


@dataclass
class Stack:
    """The running processes, the caching bloblo's bucket and spool directory."""

    s3: S3Server
    registry: Registry
    caching: BlobloServer
    streaming: BlobloServer  # BLOBLO_MAX_FILLS=0
    bucket: str
    spool_dir: Path
    s3_client: object  # boto3 S3 client, made once

    def url(self, server: BlobloServer, digest: str) -> str:
        """The URL of blob `digest` through `server`."""
        return server.url + blob_path(REPO, digest)

    def settle(self, digest: str) -> None:
        """Wait until the caching worker's fill of `digest` is over; delete its object."""
        if not wait_fills_ended(self.caching.worker_pids(), self.spool_dir, STORE_TIMEOUT):
            LOG.warning("fill: the fill of %s still runs after %.0f s", digest, STORE_TIMEOUT)
        self.s3_client.delete_object(Bucket=self.bucket, Key=cache_key(digest))


@dataclass(frozen=True)
class Miss:
    """One quiet GET: its seconds, the worker's CPU seconds and RSS growth until the blob was
    published (or, streaming, until the client had it), and the seconds from the client having
    it until the bucket held it (0 when streaming)."""

    seconds: float
    cpu_seconds: float
    system_seconds: float
    rss_growth: int
    stored_after: float = 0.0


@dataclass
class RoundResult:
    """The quiet misses and the probe's latencies (seconds) by phase."""

    misses: dict[str, Miss] = field(default_factory=dict)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    reconnects: int = 0


@contextlib.contextmanager
def running_stack(workdir: Path) -> Iterator[Stack]:
    """Start LocalStack, the registry and both bloblos; stop them all."""
    with contextlib.ExitStack() as stack:
        s3 = stack.enter_context(S3Server(workdir / "s3"))
        bucket = s3.create_bucket("bench-fill")
        registry = stack.enter_context(Registry(workdir / "registry"))
        spool_dir = workdir / "spool"
        spool_dir.mkdir(parents=True, mode=0o700)

        def bloblo(name: str, env: dict[str, str]) -> BlobloServer:
            server = BlobloServer(
                workdir / name, registry.url, s3.endpoint_url, bucket, workers=1, env=env
            )
            return stack.enter_context(server)

        caching = bloblo("caching", {"BLOBLO_SPOOL_DIR": str(spool_dir)})
        streaming = bloblo("streaming", {"BLOBLO_MAX_FILLS": "0"})
        yield Stack(s3, registry, caching, streaming, bucket, spool_dir, s3.client())


def run(workdir: Path, quick: bool = False) -> Section:
    """Start the stack under `workdir`, run the rounds, stop everything."""
    plan = QUICK if quick else FULL
    with running_stack(workdir) as stack:
        _round(stack, Plan(WARM_UP_SIZE, 1, 0.1), workdir, 0)  # warm-up, measured for nothing
        results = [_round(stack, plan, workdir, index) for index in range(plan.rounds)]
    return _section(plan, results)


def _round(stack: Stack, plan: Plan, workdir: Path, index: int) -> RoundResult:
    """Three fresh blobs (two fills, one for both streamed GETs); the phases, rotated."""
    digests = {name: push_fresh_blob(stack.registry, REPO, plan.size, workdir) for name in BLOBS}
    result = RoundResult()
    for phase in rotated(PHASES, index):
        if phase == "fill":
            result.misses[phase] = _quiet_fill(stack, digests["fill"], plan.size)
        elif phase == "stream":
            result.misses[phase] = _quiet_stream(stack, digests["stream"], plan.size)
        else:
            probe = _probed(stack, phase, digests, plan)
            result.latencies[phase.split(",")[0]] = probe.latencies
            result.reconnects += probe.reconnects
    LOG.info(
        "fill round %d: %s; /healthz p99 %s",
        index + 1,
        ", ".join(
            f"{name} {miss.seconds:.2f} s, {miss.cpu_seconds:.2f} s CPU"
            for name, miss in result.misses.items()
        ),
        ", ".join(
            f"{name} {latency_ms(seconds, 0.99):.1f} ms"
            for name, seconds in result.latencies.items()
        ),
    )
    return result


def _quiet_fill(stack: Stack, digest: str, size: int) -> Miss:
    """One client GETs uncached blob `digest` through the caching worker; watch the worker from
    the start of the GET until the bucket holds the blob."""
    with WorkerWatch(stack.caching.worker_pids()) as watch:
        started = time.monotonic()
        got = download(stack.url(stack.caching, digest))
        stored_after = seconds_until_stored(
            stack.s3_client, stack.bucket, [cache_key(digest)], got.finished, STORE_TIMEOUT
        )
    _check(got.digest, got.size, digest, size, "the caching bloblo")
    stack.settle(digest)
    return Miss(
        got.finished - started,
        watch.cpu_seconds,
        watch.system_seconds,
        watch.rss_growth,
        float("inf") if stored_after is None else stored_after,
    )


def _quiet_stream(stack: Stack, digest: str, size: int) -> Miss:
    """One client GETs blob `digest` through the streaming worker; watch the worker from the
    start of the GET until the client has the blob."""
    with WorkerWatch(stack.streaming.worker_pids()) as watch:
        started = time.monotonic()
        got = download(stack.url(stack.streaming, digest))
    _check(got.digest, got.size, digest, size, "the streaming bloblo")
    return Miss(got.finished - started, watch.cpu_seconds, watch.system_seconds, watch.rss_growth)


def _probed(stack: Stack, phase: str, digests: dict[str, str], plan: Plan) -> LoopProbe:
    """Probe a worker's loop while it serves a cold GET by curl (a fill: until the bucket holds
    the blob, then wait for the fill to end), or while it idles for `idle_seconds`."""
    server = stack.streaming if phase == "stream, probed" else stack.caching
    blob = PROBED_BLOB[phase]
    with LoopProbe(LOOPBACK, server.port) as probe:
        if blob is None:
            time.sleep(plan.idle_seconds)
            return probe
        digest = digests[blob]
        size = curl_download(stack.url(server, digest))[1]
        if server is stack.caching:
            seconds_until_stored(
                stack.s3_client, stack.bucket, [cache_key(digest)], time.monotonic(), STORE_TIMEOUT
            )
    if size != plan.size:
        raise RuntimeError(f"curl got {size} bytes of {digest}, not {plan.size}")
    if server is stack.caching:
        stack.settle(digest)
    return probe


def _check(got_digest: str, got_size: int, digest: str, size: int, where: str) -> None:
    if got_digest != digest or got_size != size:
        raise RuntimeError(f"GET of {digest} through {where} brought {got_digest} ({got_size} B)")


def _section(plan: Plan, results: list[RoundResult]) -> Section:
    gib = plan.size / GIB

    def misses(phase: str, attribute: str) -> list[float]:
        return [getattr(r.misses[phase], attribute) for r in results]

    def probe(phase: str, fraction: float) -> list[float]:
        return [latency_ms(r.latencies[phase], fraction) for r in results]

    fill_cpu = [cpu / gib for cpu in misses("fill", "cpu_seconds")]
    stream_cpu = [cpu / gib for cpu in misses("stream", "cpu_seconds")]
    probes = sum(len(r.latencies["fill"]) for r in results)
    reconnects = sum(r.reconnects for r in results)
    return Section(
        title="fill: one cache miss in one worker, its CPU and its loop (issue #7)",
        setup=(
            f"A plain docker-registry; two bloblos with 1 gevent worker each in front: one "
            "caching in LocalStack, one with BLOBLO_MAX_FILLS=0 (streaming only). Each of "
            f"{plan.rounds} rounds GETs fresh {plan.size / MIB:,.0f} MiB blobs of random bytes: "
            "one client (requests, hashing) through each bloblo, quiet; then curl through each "
            "while a probe GETs /healthz from the same worker every "
            f"{INTERVAL * 1e3:.0f} ms (one kept-alive connection, latency from when each was "
            "due), and the probe alone on the idle worker; the order rotating. Ratios: median "
            "of the per-round ratios."
        ),
        rows=[
            Row("cold GET through bloblo (a fill), one client", misses("fill", "seconds"), "s"),
            Row(
                "GET through bloblo, caching off (streaming only)", misses("stream", "seconds"), "s"
            ),
            Row(
                "GET time: fill / streaming only",
                _ratios(misses("fill", "seconds"), misses("stream", "seconds")),
            ),
            Row(
                "bloblo's bucket holds the blob, after the client had it",
                misses("fill", "stored_after"),
                "s",
            ),
            Row(
                "bloblo CPU per GiB, a miss: from the GET until published in S3",
                fill_cpu,
                "s/GiB",
                target=Target("<=", 1.5),
            ),
            Row(
                "of which system (kernel) time",
                [cpu / gib for cpu in misses("fill", "system_seconds")],
                "s/GiB",
            ),
            Row("bloblo CPU per GiB, a GET (streaming only)", stream_cpu, "s/GiB"),
            Row("CPU per GiB: miss / streaming only", _ratios(fill_cpu, stream_cpu)),
            Row(
                "bloblo worker peak RSS growth during a miss, until published",
                [growth / MIB for growth in misses("fill", "rss_growth")],
                "MiB",
                digits=1,
            ),
            Row(
                "bloblo worker peak RSS growth during a GET (streaming only)",
                [growth / MIB for growth in misses("stream", "rss_growth")],
                "MiB",
                digits=1,
            ),
            Row("/healthz during a miss (until published), p50", probe("fill", 0.5), "ms"),
            Row(
                "/healthz during a miss (until published), p99",
                probe("fill", 0.99),
                "ms",
                target=Target("<", 100),
            ),
            Row("/healthz during a miss (until published), max", probe("fill", 1.0), "ms"),
            Row("/healthz during a streamed GET (caching off), p99", probe("stream", 0.99), "ms"),
            Row("/healthz during a streamed GET (caching off), max", probe("stream", 1.0), "ms"),
            Row("/healthz, idle worker, p99", probe("idle", 0.99), "ms"),
        ],
        notes=[
            "CPU: user + system seconds of the worker (psutil) from the start of the GET until "
            "the bucket held the blob (a miss) or the client had it (streaming only), per GiB "
            "of blob; RSS: the largest growth over the worker's RSS at the start, sampled every "
            "10 ms. The quiet client hashes what it gets (and checks the digest) in this "
            "process.",
            f"/healthz: {probes} probes during misses in all, one every {INTERVAL * 1e3:.0f} ms "
            "on a fixed schedule, each latency from its due time to the end of its answer; "
            f"{reconnects} reconnects. The probed GETs are curl's, to /dev/null.",
        ],
    )


def _ratios(values: list[float], baselines: list[float]) -> list[float]:
    return [value / baseline for value, baseline in zip(values, baselines, strict=True)]
