"""Measuring instruments shared by the benchmarks: downloads with curl, a watch on bloblo's
workers (CPU time, peak RSS), S3 key polling and percentiles."""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from collections.abc import Iterable, Sequence

import psutil
from botocore.exceptions import ClientError

from bench.report import Row
from tests.stack.procs import run

MIB = 1 << 20
GIB = 1 << 30
MB = 1_000_000  # throughputs are in MB/s (10^6 bytes), as curl and most tools report them
CURL = "/usr/bin/curl"


def curl_download(url: str, headers: Sequence[str] = ()) -> tuple[float, int]:
    """GET `url` with curl into /dev/null (no redirects followed); return (bytes/s, bytes).

    Raises RuntimeError unless the answer is 200. curl's own speed figure is used: it leaves
    out the fork and exec of curl itself.
    """
    argv = [CURL, "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{speed_download}"]
    for header in headers:
        argv += ["-H", header]
    status, size, speed = run([*argv, url], timeout=600).stdout.split()
    if status != "200":
        raise RuntimeError(f"GET {url} answered {status}")
    return float(speed), int(size)


def settle_disk() -> None:
    """Write every dirty page to disk (sync(2)), untimed, so that the next measurement does not
    pay for the writeback of what came before it (a push, an earlier pull)."""
    os.sync()


def cpu_seconds(pids: Iterable[int]) -> float:
    """User plus system CPU seconds used so far by the live processes `pids`."""
    return sum(cpu_times(pids))


def cpu_times(pids: Iterable[int]) -> tuple[float, float]:
    """User and system CPU seconds used so far by the live processes `pids`."""
    user = system = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = psutil.Process(pid).cpu_times()
            user += times.user
            system += times.system
    return user, system


def _rss(pid: int) -> int:
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.NoSuchProcess:
        return 0


class WorkerWatch:
    """Within `with`: the CPU seconds `pids` use (user + system; `system_seconds` the part in
    the kernel), and the largest RSS growth of any of them (sampled every `interval` seconds in
    a thread)."""

    def __init__(self, pids: Sequence[int], interval: float = 0.01) -> None:
        self.pids = list(pids)
        self.interval = interval
        self.cpu_seconds = 0.0
        self.system_seconds = 0.0
        self._before = {pid: _rss(pid) for pid in self.pids}
        self._peak = dict(self._before)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
        self._cpu_before = (0.0, 0.0)

    @property
    def rss_growth(self) -> int:
        """The largest growth in bytes of one worker's RSS over its RSS at the start."""
        return max(self._peak[pid] - self._before[pid] for pid in self.pids)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            for pid in self.pids:
                self._peak[pid] = max(self._peak[pid], _rss(pid))

    def __enter__(self) -> WorkerWatch:
        self._cpu_before = cpu_times(self.pids)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        user, system = cpu_times(self.pids)
        self.system_seconds = system - self._cpu_before[1]
        self.cpu_seconds = user - self._cpu_before[0] + self.system_seconds


def worker_rows(
    during: str, rss_growth: Sequence[int], cpu_seconds: Sequence[float], gib: Sequence[float]
) -> list[Row]:
    """Two rows from a WorkerWatch per round: bloblo's largest worker RSS growth and its CPU
    seconds per GiB of blobs moved (`gib` per round), both during `during`."""
    return [
        Row(
            f"bloblo worker peak RSS growth during {during}",
            [growth / MIB for growth in rss_growth],
            "MiB",
            digits=1,
        ),
        Row(
            f"bloblo CPU per GiB, {during}",
            [cpu / size for cpu, size in zip(cpu_seconds, gib, strict=True)],
            "s/GiB",
        ),
    ]


def sha256_throughput(size: int = 512 * MIB) -> float:
    """Bytes/s that SHA-256 (hashlib, 1 MiB updates, one core) reaches on this machine."""
    chunk = os.urandom(MIB)
    hasher = hashlib.sha256()
    started = time.perf_counter()
    for _ in range(size // MIB):
        hasher.update(chunk)
    return size / (time.perf_counter() - started)


def object_exists(client, bucket: str, key: str) -> bool:
    """Whether `key` is in `bucket` (HEAD object)."""
    try:
        client.head_object(Bucket=bucket, Key=key)
    except ClientError as error:
        if error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
            return False
        raise
    return True


def seconds_until_stored(
    client, bucket: str, keys: Iterable[str], since: float, timeout: float, interval: float = 0.02
) -> float | None:
    """Poll every `interval` s until every key is in `bucket`; return the seconds from `since`
    (a time.monotonic() value) to the poll that found the last one, or None after `timeout`."""
    missing = set(keys)
    deadline = time.monotonic() + timeout
    while True:
        missing = {key for key in missing if not object_exists(client, bucket, key)}
        if not missing:
            return time.monotonic() - since
        if time.monotonic() > deadline:
            return None
        time.sleep(interval)


def rotated(items: Sequence[str], index: int) -> list[str]:
    """`items` rotated left by `index`: round i starts with a different path than round i-1,
    so that no path always runs first (or right after the same other path)."""
    shift = index % len(items)
    return [*items[shift:], *items[:shift]]


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile (`fraction` from 0 to 1) of `values`."""
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[index]
