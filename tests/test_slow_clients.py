"""Issue #14 §2, slow clients: what a client that takes its answer one byte a second, a slowloris
client and ten thousand idle keep-alive connections may hold of a worker, and for how long; and
that the other clients are served meanwhile (a loop probe on a kept-alive connection, warm blob
GETs on fresh ones).

The bounds are bloblo's settings, shortened here so that each shows within seconds: a client
must take each piece of its answer (up to 1 MiB) within BLOBLO_CLIENT_STALL_SECONDS (default
60, here 2), and a connection must finish its TLS handshake, then its request head, within
gunicorn's keep-alive (bloblo's default 5 s, here 2 s). docs/operating.md, "Slow clients and
many connections", states them.
Figures (probe p99, waits, how long connections were kept) are printed: run with -s.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import resource
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from bench.loop import LoopProbe, latency_ms
from tests.stack.bloblo import BlobloServer
from tests.stack.cache import blob_key, bucket_keys, cached
from tests.stack.images import push_big_blob, unique_tag
from tests.stack.limits import PRLIMIT
from tests.stack.procs import LOOPBACK, local_session, poll
from tests.stack.regclient import RegistryClient
from tests.stack.registry import Registry
from tests.stack.scrape import delta, scrape
from tests.stack.slow_clients import (
    LORIS_HEAD,
    Crowd,
    SlowReader,
    raise_open_files_limit,
    worker_holds,
)
from tests.stack.tls import make_server_tls

MIB = 1024 * 1024
REPO = "team/app"
KEEPALIVE = 2  # gunicorn's --keep-alive here (bloblo's default: 5)
STALL = 2  # BLOBLO_CLIENT_STALL_SECONDS here (default: 60)
WORKER_CONNECTIONS = 1000  # gunicorn.conf.py: client connections per worker
SHORTENED = {
    "BLOBLO_UPLOAD_HOLD_SECONDS": "0",
    "BLOBLO_CLIENT_STALL_SECONDS": str(STALL),
    "GUNICORN_CMD_ARGS": f"--keep-alive {KEEPALIVE}",
    # Cached blobs are streamed from S3 to this client (BLOBLO_STREAM_USER_AGENTS), redirected
    # for every other.
    "BLOBLO_STREAM_USER_AGENTS": "^s3-streamed$",
}


def _report(what: str, **figures: object) -> None:
    """A line of figures for the issue's closing note (visible with -s)."""
    print(f"\n[slow clients] {what}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


def _push(registry: Registry, size: int, workdir: Path) -> str:
    """A fresh blob of `size` random bytes in the registry's team/app; its digest."""
    directory = workdir / f"blob-{uuid.uuid4().hex[:8]}"
    directory.mkdir()
    client = RegistryClient(registry.url)
    try:
        return push_big_blob(client, REPO, unique_tag(), size, directory).digest
    finally:
        client.close()


def _path(digest: str) -> str:
    return f"/v2/{REPO}/blobs/{digest}"


@pytest.fixture(scope="module")
def bucket_name(s3) -> str:
    """A bucket for this module's bloblo."""
    return s3.create_bucket(f"bloblo-slow-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def bloblo(tmp_path_factory, s3, plain_registry, bucket_name) -> Iterator[BlobloServer]:
    """One bloblo worker with the shortened bounds, shared by the tests of this module (each
    leaves it with no connection of its own)."""
    with BlobloServer(
        tmp_path_factory.mktemp("bloblo-slow"),
        plain_registry.url,
        s3.endpoint_url,
        bucket_name,
        workers=1,
        env=SHORTENED,
    ) as server:
        yield server


@pytest.fixture(scope="module")
def warm_blob(bloblo, plain_registry, s3, bucket_name, tmp_path_factory) -> str:
    """A small blob the bucket holds: its GETs are answered 307."""
    digest = _push(plain_registry, 4096, tmp_path_factory.mktemp("warm"))
    with local_session() as session:
        assert session.get(bloblo.url + _path(digest), timeout=30).status_code == 200
    assert poll(lambda: blob_key(digest) in bucket_keys(s3, bucket_name), timeout=30)
    return digest


class WarmGets:
    """Within `with`: a thread GETs the warm blob over and over, each on a new connection,
    and records each status and how long it took."""

    def __init__(self, bloblo: BlobloServer, digest: str) -> None:
        self.url = bloblo.url + _path(digest)
        self.statuses: list[int] = []
        self.seconds: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            started = time.monotonic()
            try:
                with local_session() as session:
                    status = session.get(self.url, allow_redirects=False, timeout=120).status_code
            except Exception as exc:  # the test sees it among the statuses
                status = repr(exc)
            self.statuses.append(status)
            self.seconds.append(time.monotonic() - started)

    def __enter__(self) -> WarmGets:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=150)


def _spools_open(pid: int) -> list[str]:
    """The spool files process pid holds open (unlinked ones too, which psutil leaves out)."""
    fds = Path(f"/proc/{pid}/fd")
    held = []
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile
            held.append(os.readlink(fd))
    return [path for path in held if ".spool" in path]


# --- a client reading one byte a second -------------------------------------------------------


def test_clients_reading_a_byte_a_second_are_cut_off_while_others_are_served_and_the_fill_publishes(
    bloblo, plain_registry, s3, bucket_name, warm_blob, tmp_path
):
    """A cold miss (a fill), a cached blob streamed from S3 and another blob passed through
    from the registry uncached (a conditional GET), each to a client taking one byte a second:
    each such client is cut off once a piece of its answer waited BLOBLO_CLIENT_STALL_SECONDS
    (a short read: it never gets the blob), the worker then holds neither its connection nor a
    spool, the fill publishes the blob all the same, and the loop probe and warm GETs are
    answered throughout."""
    cold = _push(plain_registry, 16 * MIB, tmp_path)  # far more than the sockets' buffers
    other = _push(plain_registry, 16 * MIB, tmp_path)
    worker = bloblo.worker_pids()[0]
    before = scrape(bloblo)
    with LoopProbe(LOOPBACK, bloblo.port) as probe, WarmGets(bloblo, warm_blob) as warm:
        filling = SlowReader(bloblo.port, _path(cold))
        assert poll(lambda: _spools_open(worker), timeout=10)  # the fill's, which it reads
        assert poll(lambda: blob_key(cold) in bucket_keys(s3, bucket_name), timeout=30), (
            "the fill of a slow client's blob was not published"
        )
        from_s3 = SlowReader(bloblo.port, _path(cold), [("User-Agent", "s3-streamed")])
        # A conditional GET of a blob the bucket lacks is passed through, never filled.
        uncached = SlowReader(bloblo.port, _path(other), [("If-None-Match", '"x"')])
        readers = {"fill": filling, "s3_stream": from_s3, "upstream": uncached}
        held = {}
        for name, reader in readers.items():
            assert poll(lambda r=reader: not worker_holds(worker, r.local_port), timeout=60), (
                f"the worker still holds the {name} client reading a byte a second"
            )
            held[name] = round(time.monotonic() - reader.opened_at, 1)
        assert _spools_open(worker) == []
    assert cached(s3, bucket_name, cold) is not None
    for name, reader in readers.items():
        received = reader.drain()
        assert (reader.status, reader.content_length) == (200, 16 * MIB), name
        assert reader.ended and received < 16 * MIB, f"{name}: {received} bytes, not cut off"
    assert warm.statuses and set(warm.statuses) == {307}
    after = scrape(bloblo)
    for outcome in readers:
        assert delta(before, after, "bloblo_blob_requests_total", outcome=outcome) == 1, outcome
    assert delta(before, after, "bloblo_fills_total", result="published") == 1
    log = bloblo.log_text()
    assert "Traceback" not in log
    assert log.count("stopped taking its answer") >= 3
    _report(
        "a byte a second",
        held_s=held,
        probe_requests=len(probe.latencies),
        probe_p99_ms=round(latency_ms(probe.latencies, 0.99), 1),
        warm_gets=len(warm.statuses),
        warm_p99_ms=round(latency_ms(warm.seconds, 0.99), 1),
    )


# --- slowloris --------------------------------------------------------------------------------


def test_slowloris_connections_are_closed_within_the_keep_alive_while_real_clients_are_served(
    bloblo, warm_blob
):
    """Hundreds of connections that send a request head one header line a second and never
    end it, and as many that send nothing: the worker closes each within the keep-alive,
    answering none, while the loop probe and warm GETs are answered."""
    with (
        LoopProbe(LOOPBACK, bloblo.port) as probe,
        WarmGets(bloblo, warm_blob) as warm,
        Crowd(bloblo.port, 300, request=LORIS_HEAD, trickle=1.0) as loris,
        Crowd(bloblo.port, 300, request=b"") as silent,
    ):
        for crowd in (loris, silent):
            assert poll(lambda c=crowd: c.closed_by_server() == 300, timeout=KEEPALIVE + 30), (
                f"{300 - crowd.closed_by_server()} slowloris connections still open"
            )
    for crowd in (loris, silent):
        assert crowd.failed() == [] and crowd.answered() == 0
    assert warm.statuses and set(warm.statuses) == {307}
    kept = [m.closed_at - m.connected_at for m in loris.members + silent.members]
    _report(
        "slowloris",
        connections=len(kept),
        kept_max_s=round(max(kept), 2),
        probe_requests=len(probe.latencies),
        probe_p99_ms=round(latency_ms(probe.latencies, 0.99), 1),
        warm_gets=len(warm.statuses),
        warm_p99_ms=round(latency_ms(warm.seconds, 0.99), 1),
    )


TLS_RECORD_HEADER = b"\x16\x03\x01\x02\x00"  # a handshake record of 512 bytes, never sent


def test_connections_that_never_finish_a_tls_handshake_are_closed_within_the_keep_alive(
    plain_registry, start_bloblo, tmp_path
):
    """On bloblo's HTTPS port, connections that send nothing or only the first bytes of a
    ClientHello are closed within the keep-alive, without a line at INFO, and leave no
    descriptor behind, while HTTPS clients are served."""
    tls = make_server_tls(tmp_path / "tls")
    bloblo = start_bloblo(
        plain_registry,
        BLOBLO_TLS_CERT=str(tls.cert),
        BLOBLO_TLS_KEY=str(tls.key),
        **SHORTENED,
    )
    context = ssl.create_default_context(cafile=str(tls.ca_cert))
    worker = psutil.Process(bloblo.worker_pids()[0])
    before = worker.num_fds()
    answered = []
    with (
        Crowd(bloblo.port, 200, request=b"") as silent,
        Crowd(bloblo.port, 200, request=TLS_RECORD_HEADER) as partial,
    ):
        while silent.closed_by_server() + partial.closed_by_server() < 400:
            connection = http.client.HTTPSConnection(
                LOOPBACK, bloblo.port, context=context, timeout=60
            )
            connection.request("GET", "/livez")
            answered.append(connection.getresponse().status)
            connection.close()
            time.sleep(0.1)
            if time.monotonic() - silent.members[0].opened_at > KEEPALIVE + 30:
                break
        for crowd in (silent, partial):
            assert crowd.closed_by_server() == 200, "TLS handshakes still waited for"
            assert crowd.failed() == [] and crowd.answered() == 0
    assert answered and set(answered) == {200}
    assert poll(lambda: worker.num_fds() <= before, timeout=30)
    log = bloblo.log_text()
    assert "Traceback" not in log
    assert "TLS handshake from" not in log  # a timeout is a DEBUG line: no flood
    kept = [m.closed_at - m.connected_at for m in silent.members + partial.members]
    _report("TLS handshakes", connections=len(kept), kept_max_s=round(max(kept), 2))


# --- ten thousand idle keep-alive connections ----------------------------------------------


def test_ten_thousand_idle_keep_alive_connections_wait_their_turn_and_are_all_released(
    bloblo, warm_blob
):
    """10,000 connections that each ask /livez once and stay open: the worker holds at most
    WORKER_CONNECTIONS of them at a time, closing each the keep-alive after its answer; the
    rest wait in the listen backlog (or for the kernel to take their SYN) and are served in
    turn; a client on a kept-alive connection is answered throughout, a new client after a
    wait; and once they are gone the worker holds no more descriptors than before."""
    raise_open_files_limit(12_000)
    worker = psutil.Process(bloblo.worker_pids()[0])
    with local_session() as session:  # the warm path's upstream and S3 connections, pooled
        assert session.get(bloblo.url + _path(warm_blob), allow_redirects=False).status_code == 307
    before = worker.num_fds()
    most, new_client = 0, {}
    crowd = Crowd(bloblo.port, 10_000, batch=1000, batch_wait=0.1)
    started = time.monotonic()
    with LoopProbe(LOOPBACK, bloblo.port) as probe, crowd:

        def busy() -> bool:
            nonlocal most
            held = sum(c.status == "ESTABLISHED" for c in worker.net_connections(kind="tcp"))
            most = max(most, held)
            return crowd.opened() == 10_000 and crowd.answered() >= WORKER_CONNECTIONS

        assert poll(busy, timeout=60)
        opened_s = round(time.monotonic() - started, 1)
        asked = time.monotonic()
        with local_session() as session:
            answer = session.get(bloblo.url + _path(warm_blob), allow_redirects=False, timeout=300)
        new_client = {"status": answer.status_code, "wait_s": round(time.monotonic() - asked, 1)}
        assert poll(lambda: busy() and crowd.closed_by_server() >= WORKER_CONNECTIONS, 60)
        connected, answered, closed = crowd.connected(), crowd.answered(), crowd.closed_by_server()
    assert new_client["status"] == 307
    assert most <= WORKER_CONNECTIONS + 4  # + the warm path's upstream and S3 connections
    idle = [m.closed_at - m.answered_at for m in crowd.members if m.closed_at and m.answered_at]
    left = time.monotonic()
    assert poll(lambda: worker.num_fds() <= before, timeout=60), (
        f"the worker holds {worker.num_fds()} descriptors, {before} before the crowd"
    )
    released_s = round(time.monotonic() - left, 1)
    _report(
        "10,000 idle connections",
        opened_in_s=opened_s,
        connected=connected,
        answered=answered,
        closed_by_bloblo=closed,
        most_held_by_worker=most,
        idle_kept_s=f"{min(idle):.1f}-{max(idle):.1f}",
        new_client=new_client,
        probe_requests=len(probe.latencies),
        probe_p99_ms=round(latency_ms(probe.latencies, 0.99), 1),
        descriptors=f"{before} before, {worker.num_fds()} after",
        released_in_s=released_s,
    )


def test_bloblo_raises_its_open_files_limit_so_that_a_workers_connections_fit(
    plain_registry, start_bloblo
):
    """Started with the soft RLIMIT_NOFILE of 1024 most systems give (systemd's default),
    bloblo raises it to the hard limit: a worker's 1,000 client connections, plus its
    upstream and S3 connections and spools, would not fit in 1024 descriptors."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard < 4096:
        pytest.skip(f"the hard RLIMIT_NOFILE ({hard}) is not a number above 4096")
    bloblo = start_bloblo(plain_registry, command_prefix=[PRLIMIT, f"--nofile=1024:{hard}", "--"])
    for pid in [bloblo.pid, *bloblo.worker_pids()]:
        assert psutil.Process(pid).rlimit(psutil.RLIMIT_NOFILE) == (hard, hard)
