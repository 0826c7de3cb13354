"""How long bloblo takes to answer a warm blob GET with its 307 (one HEAD upstream with the
client's token, one S3 presign), next to HEADs of the same blob answered by the upstream:
over a kept-alive connection (the baseline), over a new connection each time, and through a
bare TCP relay (one extra hop, nothing else)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import requests

from bench.measure import percentile
from tests.stack.procs import local_session

BLOCK = 50  # requests of one probe in a row before the next: all probes share the noise
WARM_UP = 3  # unmeasured requests per probe first: connections opened, S3 lookup remembered


@dataclass(frozen=True)
class Probe:
    """One kind of request: `method url` must answer `status`; `close` asks the server to
    close the connection after each answer, so that every request opens a new one."""

    name: str
    method: str
    url: str
    status: int
    close: bool = False


def p50_ms(seconds: Sequence[float]) -> float:
    """The median of `seconds`, in milliseconds."""
    return percentile(seconds, 0.5) * 1e3


def _timed(session: requests.Session, probe: Probe, token: str) -> float:
    headers = {"Authorization": f"Bearer {token}"}
    if probe.close:
        headers["Connection"] = "close"
    started = time.perf_counter()
    with session.request(probe.method, probe.url, headers=headers, allow_redirects=False) as resp:
        resp.content  # noqa: B018 (read the body so the connection can be reused)
        elapsed = time.perf_counter() - started
    if resp.status_code != probe.status:
        raise RuntimeError(
            f"{probe.method} {probe.url} answered {resp.status_code}, expected {probe.status}"
        )
    return elapsed


def measure(probes: Sequence[Probe], token: str, count: int) -> dict[str, list[float]]:
    """`count` sequential requests of each probe with bearer `token`, in alternating blocks,
    one keep-alive session per probe; return the seconds of each request by probe name."""
    sessions = {probe.name: local_session() for probe in probes}
    timings: dict[str, list[float]] = {probe.name: [] for probe in probes}
    try:
        for probe in probes:
            for _ in range(WARM_UP):
                _timed(sessions[probe.name], probe, token)
        done = 0
        while done < count:
            block = min(BLOCK, count - done)
            for probe in probes:
                timings[probe.name] += [
                    _timed(sessions[probe.name], probe, token) for _ in range(block)
                ]
            done += block
    finally:
        for session in sessions.values():
            session.close()
    return timings
