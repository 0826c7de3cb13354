"""Benchmark ranges (issue #7): a Range request for a blob no cache holds yet, answered from
the spool of the fill it starts (bloblo's choice), against the registry's own 206.

A plain docker-registry holds the blobs; bloblo (1 gevent worker) in front, caching in
LocalStack. Each round pushes a fresh blob of random bytes before each GET and asks, with a
streaming requests client: the registry directly for `Range: bytes=<3/4 of the blob>-` (what
passing the upstream's 206 through would cost, less bloblo's hop); bloblo for the same range of
another blob; and bloblo for 16 MiB at a quarter of a third (a chunk of containerd's parallel
fetch). bloblo starts a fill of the whole blob and answers 206 once the fill's spool holds the
range's first bytes: the registry sends each blob once, and the range waits for the bytes
before it. The figures: time to the first byte and to the last.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests

from bench.blobs import blob_path, push_fresh_blob
from bench.measure import MIB
from bench.report import Row, Section
from tests.stack.bloblo import BlobloServer
from tests.stack.registry import Registry
from tests.stack.s3 import S3Server

REPO = "bench/ranges"
CHUNK = 16 * MIB
SETTLE_SECONDS = 4.0  # after a push and a GET: LocalStack takes a 512 MiB upload in about 3 s


@dataclass(frozen=True)
class Plan:
    """How big each blob is and how many rounds run."""

    size: int
    rounds: int


FULL = Plan(size=512 * MIB, rounds=3)
QUICK = Plan(size=64 * MIB, rounds=2)


@dataclass(frozen=True)
class Answer:
    """A ranged GET: its status, seconds to the first body byte and to the last, bytes."""

    status: int
    first: float
    last: float
    received: int


def ranged_get(url: str, first_byte: int, last_byte: int | None = None) -> Answer:
    """GET url for bytes first_byte..last_byte (to the end when None), streamed and timed."""
    ask = f"bytes={first_byte}-{'' if last_byte is None else last_byte}"
    started, first, received = time.monotonic(), None, 0
    with requests.get(url, headers={"Range": ask}, stream=True, timeout=300) as answer:
        for chunk in answer.iter_content(MIB):
            first = first if first is not None else time.monotonic() - started
            received += len(chunk)
        return Answer(answer.status_code, first or 0.0, time.monotonic() - started, received)


@contextlib.contextmanager
def running_stack(workdir: Path) -> Iterator[tuple[Registry, BlobloServer]]:
    """LocalStack, the registry and one bloblo with one worker; stopped at the end."""
    with contextlib.ExitStack() as stack:
        s3 = stack.enter_context(S3Server(workdir / "s3"))
        bucket = s3.create_bucket("bench-ranges")
        registry = stack.enter_context(Registry(workdir / "registry"))
        bloblo = stack.enter_context(
            BlobloServer(workdir / "bloblo", registry.url, s3.endpoint_url, bucket, workers=1)
        )
        yield registry, bloblo


def run(workdir: Path, quick: bool = False) -> Section:
    """Start the stack under workdir, run the rounds, stop everything."""
    plan = QUICK if quick else FULL
    tail, quarter = plan.size * 3 // 4, plan.size // 4
    rounds: list[dict[str, Answer]] = []
    with running_stack(workdir) as (registry, bloblo):
        for index in range(plan.rounds + 1):  # the first round warms everything up, unmeasured
            asks = {
                "direct": (registry.url, tail, None),
                "bloblo": (bloblo.url, tail, None),
                "chunk": (bloblo.url, quarter, quarter + CHUNK - 1),
            }
            answers = {}
            for kind, (base, first_byte, last_byte) in asks.items():
                # Pushed right before its GET: a push's dirty pages still being written back
                # would slow the spool's writes (1.2 s instead of 0.45 s to the range's start).
                digest = push_fresh_blob(registry, REPO, plan.size, workdir)
                time.sleep(SETTLE_SECONDS)
                answers[kind] = ranged_get(base + blob_path(REPO, digest), first_byte, last_byte)
                time.sleep(SETTLE_SECONDS)  # the fill's upload ends before the next push
            assert all(a.status == 206 for a in answers.values()), answers
            if index:
                rounds.append(answers)
    return _section(plan, rounds)


def _section(plan: Plan, rounds: list[dict[str, Answer]]) -> Section:
    def ms(kind: str, field: str) -> list[float]:
        return [getattr(answers[kind], field) * 1000 for answers in rounds]

    size = plan.size // MIB
    return Section(
        title="ranges: a Range miss, from the fill's spool or the registry's 206 (issue #7)",
        setup=(
            f"A plain docker-registry; bloblo (1 gevent worker, LocalStack) in front. Each of "
            f"{plan.rounds} rounds pushes three fresh {size} MiB blobs of random bytes and GETs "
            f"`Range: bytes={size * 3 // 4}Mi-` of the first straight from the registry, the same "
            f"range of the second through bloblo (a miss: a fill starts and the range is served "
            f"from its spool), and 16 MiB at {size // 4} MiB of the third through bloblo."
        ),
        rows=[
            Row("registry's own 206, last quarter: first byte", ms("direct", "first"), "ms"),
            Row("registry's own 206, last quarter: last byte", ms("direct", "last"), "ms"),
            Row("bloblo, Range miss, last quarter: first byte", ms("bloblo", "first"), "ms"),
            Row("bloblo, Range miss, last quarter: last byte", ms("bloblo", "last"), "ms"),
            Row("bloblo, Range miss, 16 MiB at a quarter: last byte", ms("chunk", "last"), "ms"),
        ],
        notes=[
            "From the spool, a range waits for the fill to reach its first byte: the bytes "
            "before it come from the registry first, once, for every client of the blob.",
        ],
    )
