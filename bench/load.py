"""Benchmark load (issue #14, part 1): bloblo under many clients at once, its warm redirects per
second, and a very big cold blob beside warm pulls.

1. A crowd (tests/stack/crowd.py, one gevent process) of clients pulls warm blobs of mixed sizes
   (bloblo answers 307, the client fetches S3's presigned URL) and now and then a fresh one (a
   fill) through one bloblo with its default workers, while a herd of clients pulls one fresh
   image together. Every body is checked against its digest. Measured: failures, p50/p99 of
   bloblo's answers to warm GETs, registry bytes for the herd's image per image byte, each
   worker's RSS at the start and the end, the spool disk at its peak, and the workers'
   descriptors, connections and greenlets before and after.
2. Warm redirects per second (ApacheBench GETs of one cached blob: HEAD upstream, presign,
   307) with 1, 2 and 4 workers, next to the registry's own HEADs of the blob per second (the
   ceiling: each redirect asks one), measured with the same client in the same run.
3. A big blob pulled cold while warm clients pull: the workers' peak RSS growth and a /healthz
   loop probe's p99.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from bench.blobs import (
    blob_path,
    cache_key,
    download,
    push_fresh_blob,
    registry_gets_settled,
    wait_fills_ended,
)
from bench.herd import Stack
from bench.loop import LoopProbe, latency_ms
from bench.measure import (
    GIB,
    MIB,
    WorkerWatch,
    object_exists,
    percentile,
    seconds_until_stored,
)
from bench.report import Row, Section, Target
from tests.stack import procs
from tests.stack.bloblo import BlobloServer
from tests.stack.crowd import Blob, push_blobs, run_crowd
from tests.stack.images import build_image, push
from tests.stack.procs import LOOPBACK, local_session, poll
from tests.stack.registry import Registry
from tests.stack.s3 import S3Server

LOG = logging.getLogger(__name__)

KIB = 1 << 10
WORKERS = 2  # bloblo's default on this machine
AB = "/usr/bin/ab"  # ApacheBench, Debian's apache2-utils
RSS_BOUND = 256 * MIB  # stated bound of a worker's RSS growth while a big blob is filled


@dataclass(frozen=True)
class Plan:
    """How many clients, for how long, and how big the blobs are."""

    clients: int  # pulling in a loop
    herd: int  # pulling one fresh image together, on top
    seconds: float
    warm_sizes: Sequence[int]
    cold_sizes: Sequence[int]
    cold_share: float
    herd_layers: Sequence[int]
    load_seconds: int
    load_connections: int
    worker_counts: Sequence[int]
    big: int
    big_clients: int


FULL = Plan(
    clients=150,
    herd=50,
    seconds=60,
    warm_sizes=[16 * KIB, 256 * KIB, 1 * MIB, 4 * MIB, 8 * MIB] * 4,
    cold_sizes=[64 * KIB, 512 * KIB, 2 * MIB, 8 * MIB] * 40,
    cold_share=0.05,
    herd_layers=[4 * MIB, 16 * MIB, 32 * MIB],
    load_seconds=10,
    load_connections=32,
    worker_counts=(1, 2, 4),
    big=4 * GIB,
    big_clients=50,
)
QUICK = Plan(
    clients=40,
    herd=10,
    seconds=10,
    warm_sizes=[16 * KIB, 256 * KIB, 1 * MIB] * 2,
    cold_sizes=[64 * KIB, 512 * KIB, 2 * MIB] * 10,
    cold_share=0.05,
    herd_layers=[1 * MIB, 4 * MIB],
    load_seconds=3,
    load_connections=16,
    worker_counts=(1, 2),
    big=512 * MIB,
    big_clients=20,
)


@contextlib.contextmanager
def running_stack(workdir: Path, s3: S3Server, registry: Registry, workers: int) -> Iterator[Stack]:
    """bloblo with `workers` workers in front of registry, in a fresh bucket; stopped after."""
    bucket = s3.create_bucket(f"bench-load-{workers}-{int(time.time() * 1000) % 10**8}")
    spool_dir = workdir / f"spool-{bucket}"
    spool_dir.mkdir(parents=True, mode=0o700)
    with BlobloServer(
        workdir / f"bloblo-{bucket}",
        registry.url,
        s3.endpoint_url,
        bucket,
        workers=workers,
        env={"BLOBLO_SPOOL_DIR": str(spool_dir)},
    ) as bloblo:
        yield Stack(s3, registry, bloblo, bucket, spool_dir, s3.client())


def run(workdir: Path, quick: bool = False) -> Section:
    """Start LocalStack and a registry under `workdir`, run the three parts, stop everything."""
    plan = QUICK if quick else FULL
    rows: list[Row] = []
    notes: list[str] = []
    with S3Server(workdir / "s3") as s3, Registry(workdir / "registry") as registry:
        with running_stack(workdir, s3, registry, WORKERS) as stack:
            crowd_rows, crowd_notes = _crowd(stack, plan, workdir)
            rows += crowd_rows
            notes += crowd_notes
            big_rows, big_notes = _big_beside_warm(stack, plan, workdir)
        redirect_rows, redirect_notes = _redirect_rates(workdir, s3, registry, plan)
    return Section(
        title="load: many clients, warm redirects per second, a big blob beside warm pulls "
        "(issue #14)",
        setup=(
            f"A plain docker-registry; bloblo ({WORKERS} gevent workers unless said, "
            f"LocalStack) in front. Part 1: {plan.clients} clients pull for {plan.seconds:g} s "
            f"(warm blobs of {_sizes(plan.warm_sizes)}, and {plan.cold_share:.0%} of the time a "
            f"fresh one of {_sizes(plan.cold_sizes)}), and {plan.herd} more pull one fresh "
            f"image ({_sizes(plan.herd_layers)} layers) together after 5 s: "
            f"{plan.clients + plan.herd} clients in all (tests/stack/crowd.py: one gevent "
            "process, a connection per client, every body hashed and checked). Part 2: "
            f"ApacheBench ({plan.load_connections} kept-alive connections, {plan.load_seconds} "
            "s) GETs one cached blob through bloblo (307s), then HEADs it at the registry. "
            "Part 3: one client pulls a "
            f"fresh {plan.big / GIB:g} GiB blob cold while {plan.big_clients} clients pull "
            "warm blobs, and a probe GETs /healthz every 20 ms."
        ),
        rows=[*rows, *big_rows, *redirect_rows],
        notes=[*notes, *big_notes, *redirect_notes],
    )


def _sizes(sizes: Sequence[int]) -> str:
    distinct = sorted(set(sizes))
    return ", ".join(f"{s // KIB} KiB" if s < MIB else f"{s // MIB} MiB" for s in distinct)


def _cache(stack: Stack, blobs: Sequence[Blob]) -> None:
    """Pull each blob through bloblo until the bucket holds them all. One pass may not do: a
    fill's upload is held while the host is busy (BLOBLO_UPLOAD_HOLD_SECONDS) and still counts
    against BLOBLO_MAX_FILLS, so a client pulling many new blobs in a row gets the later ones
    uncached; the next pass, once the fills are over, fills those."""
    pids = stack.bloblo.worker_pids()
    missing = list(blobs)
    for _ in range(5):
        with local_session() as session:
            for blob in missing:
                url = stack.bloblo.url + blob_path(blob.repo, blob.digest)
                answer = session.get(url, timeout=60)
                if answer.status_code != 200:
                    raise RuntimeError(f"warming {blob.digest} answered {answer.status_code}")
        wait_fills_ended(pids, stack.spool_dir, 120)
        missing = [
            blob
            for blob in missing
            if not object_exists(stack.s3_client, stack.bucket, cache_key(blob.digest))
        ]
        if not missing:
            return
    raise RuntimeError(f"{len(missing)} warm blobs were not published after 5 passes")


def _worker_state(stack: Stack) -> dict[int, dict[str, int]]:
    """Per worker: descriptors, connections of clients, connections of its pools, greenlets."""
    with local_session() as session:
        answer = session.get(f"{stack.bloblo.url}/metrics", timeout=30)
    greenlets = {
        match.group(1): int(float(match.group(2)))
        for match in re.finditer(r'bloblo_worker_greenlets\{pid="(\d+)"\} (\S+)', answer.text)
    }
    state = {}
    for pid in stack.bloblo.worker_pids():
        process = psutil.Process(pid)
        connections = [c for c in process.net_connections("tcp") if c.raddr]
        clients = sum(
            c.laddr.port == stack.bloblo.port and c.status == psutil.CONN_ESTABLISHED
            for c in connections
        )
        state[pid] = {
            "descriptors": process.num_fds(),
            "clients": clients,
            "pooled": sum(c.laddr.port != stack.bloblo.port for c in connections),
            "greenlets": greenlets.get(str(pid), -1),
            "rss": process.memory_info().rss,
        }
    return state


class SpoolWatch:
    """Within `with`: the largest disk space (allocated blocks) the spool directory held,
    sampled every 50 ms."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="spool-watch", daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            used = 0
            for entry in os.scandir(self.directory):
                with contextlib.suppress(OSError):
                    used += entry.stat(follow_symlinks=False).st_blocks * 512
            self.peak = max(self.peak, used)

    def __enter__(self) -> SpoolWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def _crowd(stack: Stack, plan: Plan, workdir: Path) -> tuple[list[Row], list[str]]:
    """Part 1: the crowd and the herd; the rows and notes."""
    LOG.info("load: pushing %d warm, %d fresh blobs", len(plan.warm_sizes), len(plan.cold_sizes))
    url = stack.registry.url
    warm = push_blobs(url, "bench/warm", plan.warm_sizes, workdir)
    cold = push_blobs(url, "bench/cold", plan.cold_sizes, workdir)
    image = build_image(workdir / "herd-image", plan.herd_layers)
    push(image, stack.registry.host, "bench/herd")
    _cache(stack, warm)
    pids = stack.bloblo.worker_pids()
    wait_fills_ended(pids, stack.spool_dir, 120)
    poll(lambda: -1 not in [s["greenlets"] for s in _worker_state(stack).values()], 30)
    before = _worker_state(stack)
    LOG.info("load: %d clients for %g s", plan.clients + plan.herd, plan.seconds)
    with SpoolWatch(stack.spool_dir) as spool:
        outcome = run_crowd(
            {
                "url": stack.bloblo.url,
                "seconds": plan.seconds,
                "clients": plan.clients,
                "warm": warm,
                "cold": cold,
                "cold_share": plan.cold_share,
                "herd": {
                    "at": 5,
                    "clients": plan.herd,
                    "repo": "bench/herd",
                    "reference": image.tag,
                },
            },
            timeout=plan.seconds + 600,
        )
        wait_fills_ended(pids, stack.spool_dir, 300)
    failures = sum(outcome["failures"].values())
    if failures:
        LOG.warning("load: %d pulls failed, e.g. %s", failures, outcome["errors"][:3])
    served = sum(
        registry_gets_settled(stack.registry, blob_path("bench/herd", digest), 1)[1]
        for digest in [image.config_digest, *image.layer_digests]
    )
    image_bytes = sum(layer.size for layer in image.layers) + len(
        image.blob_bytes(image.config_digest)
    )
    after = _settled(stack, before)
    pulls = outcome["pulls"]
    answers = outcome["warm_answer_seconds"]
    rows = [
        Row("pulls that failed or got wrong bytes", [failures], digits=0, target=Target("<=", 0)),
        Row("warm blob pulls (307, then S3)", [pulls.get("warm", 0)], digits=0),
        Row("fresh blob pulls (fills)", [pulls.get("cold", 0)], digits=0),
        Row("herd blob pulls", [pulls.get("herd", 0)], digits=0),
        Row("bloblo's answer to a warm GET, p50", [percentile(answers, 0.5) * 1e3], "ms"),
        Row("bloblo's answer to a warm GET, p99", [percentile(answers, 0.99) * 1e3], "ms"),
        Row(
            f"herd of {plan.herd}: registry bytes / image bytes",
            [served / image_bytes],
            target=Target("<=", 1),
        ),
        Row(f"herd of {plan.herd}: until the last had the image", [outcome["herd_seconds"]], "s"),
        Row(
            "worker RSS at the start",
            [s["rss"] / MIB for s in before.values()],
            "MiB",
            digits=0,
        ),
        Row("worker RSS at the end", [s["rss"] / MIB for s in after.values()], "MiB", digits=0),
        Row("spool disk at its peak", [spool.peak / MIB], "MiB", digits=0),
    ]
    leaks = _leaks(before, after)
    notes = [
        f"Clients pulled {outcome['bytes_checked'] / GIB:.1f} GiB, every body checked against "
        f"its digest; answers: {dict(outcome['statuses'])}.",
        "Afterwards, per worker (before -> after): "
        + "; ".join(
            f"descriptors {before[pid]['descriptors']} -> {after[pid]['descriptors']}, client "
            f"connections {before[pid]['clients']} -> {after[pid]['clients']}, pooled "
            f"connections {before[pid]['pooled']} -> {after[pid]['pooled']}, greenlets "
            f"{before[pid]['greenlets']} -> {after[pid]['greenlets']}"
            for pid in before
            if pid in after
        )
        + ". "
        + (leaks or "Nothing left behind beyond the pools' kept-alive connections."),
    ]
    if failures:
        notes.append(f"Failures: {outcome['errors']}")
    return rows, notes


def _settled(stack: Stack, before: dict[int, dict[str, int]]) -> dict[int, dict[str, int]]:
    """The workers' state once client connections are closed and greenlets are back to their
    count before (at most 30 s: keep-alive is 5 s, the greenlet count every 5 s)."""

    def settled():
        now = _worker_state(stack)
        done = all(
            s["clients"] == 0 and 0 <= s["greenlets"] <= before.get(pid, {}).get("greenlets", 0)
            for pid, s in now.items()
        )
        return now if done else None

    return poll(settled, 30) or _worker_state(stack)


def _leaks(before: dict, after: dict) -> str:
    """'' when every worker is back to its state before, beyond kept-alive pooled connections;
    else what is left."""
    left = []
    for pid, was in before.items():
        now = after.get(pid)
        if now is None:
            left.append(f"worker {pid} died")
            continue
        extra = (now["descriptors"] - now["pooled"]) - (was["descriptors"] - was["pooled"])
        if extra > 0 or now["clients"] or now["greenlets"] > was["greenlets"]:
            left.append(
                f"worker {pid}: {extra} descriptors beyond its pools, {now['clients']} client "
                f"connections, greenlets {was['greenlets']} -> {now['greenlets']}"
            )
    return "; ".join(left)


def _big_beside_warm(stack: Stack, plan: Plan, workdir: Path) -> tuple[list[Row], list[str]]:
    """Part 3: a big blob pulled cold while warm clients pull; rows and notes."""
    LOG.info("load: pushing a %d MiB blob", plan.big // MIB)
    digest = push_fresh_blob(stack.registry, "bench/big", plan.big, workdir / "big")
    warm = push_blobs(stack.registry.url, "bench/warm2", [256 * KIB, 1 * MIB] * 4, workdir)
    _cache(stack, warm)
    pids = stack.bloblo.worker_pids()
    wait_fills_ended(pids, stack.spool_dir, 120)
    result: dict[str, object] = {}

    def crowd() -> None:
        result["crowd"] = run_crowd(
            {
                "url": stack.bloblo.url,
                "seconds": 3600,
                "clients": plan.big_clients,
                "warm": warm,
                "stop_file": str(stop_file),
            },
            timeout=3600,
        )

    stop_file = workdir / "big-done"
    host, port = LOOPBACK, stack.bloblo.port
    with WorkerWatch(pids) as watch, LoopProbe(host, port) as probe:
        warm_pulls = threading.Thread(target=crowd, name="warm-crowd")
        warm_pulls.start()
        started = time.monotonic()
        got = download(stack.bloblo.url + blob_path("bench/big", digest))
        seconds = time.monotonic() - started
        stop_file.touch()
        warm_pulls.join()
    stored = seconds_until_stored(
        stack.s3_client, stack.bucket, [cache_key(digest)], time.monotonic(), 600
    )
    outcome = result.get("crowd", {"failures": {"?": 1}, "pulls": {}, "errors": ["no outcome"]})
    failures = sum(outcome["failures"].values()) + (got.digest != digest)
    rows = [
        Row(
            f"big blob ({plan.big / GIB:g} GiB) cold beside {plan.big_clients} warm clients: "
            "largest worker RSS growth",
            [watch.rss_growth / MIB],
            "MiB",
            digits=0,
            target=Target("<=", RSS_BOUND / MIB),
        ),
        Row("... its client's throughput", [plan.big / seconds / 1e6], "MB/s", digits=0),
        Row("... /healthz probe p99", [latency_ms(probe.latencies, 0.99)], "ms"),
        Row("... warm pulls meanwhile", [outcome["pulls"].get("warm", 0)], digits=0),
        Row("... pulls that failed", [failures], digits=0, target=Target("<=", 0)),
    ]
    notes = [
        f"The big blob was {'published' if stored is not None else 'NOT published'} "
        "after its pull; RSS growth is the largest of any worker over its RSS at the start."
    ]
    return rows, notes


def _ab(url: str, plan: Plan, method: str, seconds: int | None = None) -> tuple[float, int]:
    """ApacheBench (keep-alive, plan's connections) on `url` with `method` (GET or HEAD) for
    `seconds` (plan's by default): (requests/s, requests that failed or were not `expected`).
    ab counts a 307 as "non-2xx": for GETs that is what bloblo must answer."""
    seconds = seconds or plan.load_seconds
    argv = [AB, "-k", "-q", "-c", str(plan.load_connections), "-t", str(seconds), "-n", "10000000"]
    out = procs.run(
        [*argv, *(["-i"] if method == "HEAD" else []), url], timeout=seconds + 60
    ).stdout
    rate = float(re.search(r"Requests per second:\s+([\d.]+)", out).group(1))
    done = int(re.search(r"Complete requests:\s+(\d+)", out).group(1))
    failed = int(re.search(r"Failed requests:\s+(\d+)", out).group(1))
    non_2xx = re.search(r"Non-2xx responses:\s+(\d+)", out)
    odd = int(non_2xx.group(1)) if non_2xx else 0
    # GETs must all be 307s ("non-2xx"), HEADs all 200s.
    return rate, failed + (done - odd if method == "GET" else odd)


def _redirect_rates(
    workdir: Path, s3: S3Server, registry: Registry, plan: Plan
) -> tuple[list[Row], list[str]]:
    """Part 2: warm redirects per second through 1..4 workers, and the registry's HEADs/s."""
    blob = push_blobs(registry.url, "bench/redirect", [64 * KIB], workdir)[0]
    head_url = registry.url + blob_path(blob.repo, blob.digest)
    rows, notes, ceilings = [], [], []
    for workers in plan.worker_counts:
        with running_stack(workdir, s3, registry, workers) as stack:
            _cache(stack, [blob])
            url = stack.bloblo.url + blob_path(blob.repo, blob.digest)
            _ab(url, plan, "GET", seconds=1)  # warm-up: connections, code paths
            rate, bad = _ab(url, plan, "GET")
            ceiling, bad_heads = _ab(head_url, plan, "HEAD")
            ceilings.append(ceiling)
            rows.append(Row(f"warm redirects/s, {workers} worker(s)", [rate], "1/s", digits=0))
            rows.append(Row("... per worker", [rate / workers], "1/s", digits=0))
            rows.append(Row("... / the registry's HEADs/s in the same run", [rate / ceiling]))
            if bad or bad_heads:
                notes.append(f"{workers} worker(s): {bad} redirects, {bad_heads} HEADs failed")
    rows.append(Row("the registry's HEADs of the blob/s (the ceiling)", ceilings, "1/s", digits=0))
    return rows, notes
