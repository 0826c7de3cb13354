"""Issue #14, part 1, the short version of `make bench`'s load: 50 clients for 10 s through
bloblo (2 workers) pull warm and fresh blobs of mixed sizes, and a herd pulls one fresh image
together. Every byte is checked; nothing is timed. Afterwards nothing is left behind: no
client connection, no greenlet, no descriptor beyond the kept-alive pools."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import psutil

from tests.stack.cache import blob_key, bucket_keys
from tests.stack.crowd import Blob, push_blobs, run_crowd
from tests.stack.images import push
from tests.stack.procs import local_session, poll
from tests.stack.registry_log import requests_served
from tests.stack.scrape import delta, scrape

KIB, MIB = 1 << 10, 1 << 20
CLIENTS, SECONDS = 50, 10
HERD = 10


def _cache(bloblo, s3, bucket: str, blobs: Sequence[Blob]) -> None:
    """Pull each blob through bloblo once and wait until the bucket holds them all."""
    with local_session() as session:
        for blob in blobs:
            answer = session.get(f"{bloblo.url}/v2/{blob.repo}/blobs/{blob.digest}", timeout=30)
            assert answer.status_code == 200
    wanted = {blob_key(blob.digest) for blob in blobs}
    assert poll(lambda: wanted <= set(bucket_keys(s3, bucket)), timeout=60)


def _idle(bloblo) -> bool:
    return scrape(bloblo).get(("bloblo_fills_in_progress", ()), 0) == 0


def _worker_state(bloblo) -> dict[int, dict[str, int]]:
    """Per worker: open descriptors, connections of clients to bloblo's port, connections it
    opened itself (its pools to the registry and S3), and greenlets (the last count the worker
    published)."""
    greenlets = {
        dict(labels)["pid"]: value
        for (name, labels), value in scrape(bloblo).items()
        if name == "bloblo_worker_greenlets"
    }
    state = {}
    for pid in bloblo.worker_pids():
        process = psutil.Process(pid)
        connections = [c for c in process.net_connections("tcp") if c.raddr]
        clients = sum(
            c.laddr.port == bloblo.port and c.status == psutil.CONN_ESTABLISHED for c in connections
        )
        state[pid] = {
            "descriptors": process.num_fds(),
            "clients": clients,
            "pooled": sum(c.laddr.port != bloblo.port for c in connections),
            "greenlets": int(greenlets.get(str(pid), -1)),
        }
    return state


def test_fifty_clients_for_ten_seconds_get_every_blob_right_and_leave_nothing_behind(
    start_bloblo, plain_registry, s3, bucket, make_image, tmp_path
):
    bloblo = start_bloblo(plain_registry, workers=2)
    sizes = [4 * KIB, 64 * KIB, 512 * KIB, 2 * MIB]
    warm = push_blobs(plain_registry.url, "load/warm", sizes * 2, tmp_path)
    cold = push_blobs(
        plain_registry.url,
        "load/cold",
        list(itertools.islice(itertools.cycle(sizes), 40)),
        tmp_path,
    )
    image = make_image(layers=[512 * KIB, 1 * MIB])
    push(image, plain_registry.host, "load/herd")
    _cache(bloblo, s3, bucket, warm)
    assert poll(lambda: _idle(bloblo), timeout=60)
    before, metrics_before = _worker_state(bloblo), scrape(bloblo)

    outcome = run_crowd(
        {
            "url": bloblo.url,
            "seconds": SECONDS,
            "clients": CLIENTS,
            "warm": warm,
            "cold": cold,
            "cold_share": 0.05,
            "herd": {"at": 3, "clients": HERD, "repo": "load/herd", "reference": image.tag},
        },
        timeout=120,
    )

    assert outcome["failures"] == {}, outcome["errors"]
    pulls = outcome["pulls"]
    image_blobs = [image.config_digest, *(layer.digest for layer in image.layers)]
    assert pulls["herd"] == HERD * len(image_blobs)
    assert pulls["warm"] > 0 and pulls["cold"] > 0
    assert outcome["statuses"].get("warm 307") == pulls["warm"]  # every warm GET redirected

    # Every fresh blob pulled is published once, and nothing else: no fill failed or mismatched.
    assert poll(lambda: _idle(bloblo), timeout=60)
    metrics_after = scrape(bloblo)
    pulled = cold[: pulls["cold"]]
    assert delta(metrics_before, metrics_after, "bloblo_fills_total", result="published") == len(
        pulled
    ) + len(image_blobs)
    for result in ("digest_mismatch", "aborted", "failed"):
        assert delta(metrics_before, metrics_after, "bloblo_fills_total", result=result) == 0
    expected = {blob_key(b.digest) for b in [*warm, *pulled]} | set(map(blob_key, image_blobs))
    assert set(bucket_keys(s3, bucket)) == expected
    # The herd cost the registry one GET of each of its blobs, whichever worker filled it.
    served = {
        digest: requests_served(plain_registry, "GET", f"/v2/load/herd/blobs/{digest}")
        for digest in image_blobs
    }
    assert served == dict.fromkeys(image_blobs, 1), (image.config_digest, served)

    # Nothing left behind: client connections closed, no more greenlets than before (a timer
    # of an earlier fill may still have been counted then), and every descriptor beyond the
    # ones before is a kept-alive connection of a worker's pools.
    def settled():
        after = _worker_state(bloblo)
        ok = all(
            now["clients"] == 0
            and 0 <= now["greenlets"] <= before[pid]["greenlets"]
            and now["descriptors"] - now["pooled"]
            <= before[pid]["descriptors"] - before[pid]["pooled"]
            for pid, now in after.items()
        )
        return after if ok else None

    after = poll(settled, timeout=30)
    assert after is not None, (before, _worker_state(bloblo))
    assert after.keys() == before.keys()  # no worker died
