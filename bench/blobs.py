"""Fresh blobs and what happens to them, for the benchmarks of fills (issue #7): pushed to a
plain registry, downloaded by clients that hash what they get, counted in the registry's log,
and followed into bloblo's spool directory and bucket.

The registry (distribution) logs every answered request with `http.request.method`,
`http.request.uri` and `http.response.written` (bytes sent, also of a GET cut short), so the
bytes it served for one blob are summed from its log. A fill holds its spool file open in
BLOBLO_SPOOL_DIR until its download and its S3 upload are over and its last reader has left:
no file of a worker open there means no fill of that worker still runs.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench.measure import MIB, settle_disk
from tests.stack.images import push_big_blob, unique_tag
from tests.stack.procs import local_session, poll
from tests.stack.regclient import RegistryClient
from tests.stack.registry import Registry

CHUNK = MIB  # what a client reads and hashes at a time
CLIENT_TIMEOUT = (10, 120)  # connect, and between two reads: a stuck client fails, never hangs
START_TIMEOUT = 60.0  # how long the clients of a herd may take to be ready to start together
# One key=value field of a distribution (logrus text) log line; values with spaces are quoted.
_FIELD = re.compile(r'([\w.]+)=("(?:[^"\\]|\\.)*"|\S*)')


@dataclass(frozen=True)
class Download:
    """What one client got: the digest of the bytes, how many, and when the last one came
    (time.monotonic())."""

    digest: str
    size: int
    finished: float


def push_fresh_blob(registry: Registry, repo: str, size: int, workdir: Path) -> str:
    """Push `size` new random bytes as one blob (with a manifest under a new tag) to `registry`;
    return its digest. The local copy is deleted: the registry has its own."""
    workdir.mkdir(parents=True, exist_ok=True)
    client = RegistryClient(registry.url)
    try:
        blob = push_big_blob(client, repo, unique_tag(), size, workdir)
    finally:
        client.close()
    blob.path.unlink()
    settle_disk()
    return blob.digest


def blob_path(repo: str, digest: str) -> str:
    """The path of a blob GET: /v2/<repo>/blobs/<digest>."""
    return f"/v2/{repo}/blobs/{digest}"


def cache_key(digest: str) -> str:
    """The key bloblo publishes a blob under (no BLOBLO_S3_PREFIX): blobs/<algorithm>/<hex>."""
    return "blobs/" + digest.replace(":", "/", 1)


def download(url: str, ready: threading.Barrier | None = None) -> Download:
    """GET `url` (following a redirect), streaming, hashing every 1 MiB read; with `ready`,
    wait on that barrier first, the connection not yet opened. Raises unless it answers 200."""
    session = local_session()
    try:
        if ready is not None:
            ready.wait(START_TIMEOUT)
        hasher, size = hashlib.sha256(), 0
        with session.get(url, stream=True, timeout=CLIENT_TIMEOUT) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"GET {url} answered {resp.status_code}")
            for chunk in resp.iter_content(CHUNK):
                hasher.update(chunk)
                size += len(chunk)
        return Download(f"sha256:{hasher.hexdigest()}", size, time.monotonic())
    finally:
        session.close()


def download_together(url: str, clients: int) -> tuple[float, list[Download]]:
    """`clients` threads GET `url` at once (each its own session and connection); return the
    time.monotonic() they were let go and what each got."""
    ready = threading.Barrier(clients + 1)
    with ThreadPoolExecutor(clients, thread_name_prefix="herd") as pool:
        futures = [pool.submit(download, url, ready) for _ in range(clients)]
        ready.wait(START_TIMEOUT)
        started = time.monotonic()
        downloads = [future.result() for future in futures]
    return started, downloads


def check_downloads(downloads: list[Download], digest: str, size: int, where: str) -> None:
    """Raise RuntimeError unless every client got the `size` bytes of blob `digest`."""
    wrong = [d for d in downloads if d.digest != digest or d.size != size]
    if wrong:
        raise RuntimeError(
            f"{len(wrong)} of {len(downloads)} clients through {where} got another blob than "
            f"{digest} ({size} bytes), e.g. {wrong[0].digest} ({wrong[0].size} bytes)"
        )


def registry_gets(log_text: str, uri: str) -> tuple[int, int]:
    """How many GETs of exactly `uri` a distribution log records, and the bytes they wrote."""
    gets = written = 0
    for line in log_text.splitlines():
        if uri not in line or "http.response.written=" not in line:
            continue
        fields = {name: value.strip('"') for name, value in _FIELD.findall(line)}
        if fields.get("http.request.method") == "GET" and fields.get("http.request.uri") == uri:
            gets += 1
            written += int(fields["http.response.written"])
    return gets, written


def registry_gets_settled(
    registry: Registry, uri: str, at_least: int, timeout: float = 10.0
) -> tuple[int, int]:
    """registry_gets() of the registry's log once it records at least `at_least` GETs of `uri`
    (a line is written when the answer ends, a moment after the client has it)."""

    def counted() -> tuple[int, int] | None:
        found = registry_gets(registry.log_text(), uri)
        return found if found[0] >= at_least else None

    return poll(counted, timeout) or registry_gets(registry.log_text(), uri)


def spool_files_open(pids: list[int], directory: Path) -> int:
    """How many spool files in `directory` the processes `pids` hold open (not the lock file
    every worker keeps open there, bloblo-fills-*.lock)."""
    prefix = f"{directory.resolve()}/"
    count = 0
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:  # the worker is gone
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:  # closed meanwhile
                continue
            count += target.startswith(prefix) and not target.endswith(".lock")
    return count


def wait_fills_ended(pids: list[int], spool_dir: Path, timeout: float) -> bool:
    """Wait until no process of `pids` holds a spool file in `spool_dir` open (every fill's
    download and upload are over); False if one still does after `timeout` seconds."""
    return bool(poll(lambda: spool_files_open(pids, spool_dir) == 0, timeout))
