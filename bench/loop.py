"""How long a bloblo worker's gevent loop keeps other requests waiting while it moves a blob: a
probe that sends GET /healthz every 20 ms over one kept-alive connection, in a thread of the
benchmark process, while something else keeps the worker busy.

Each latency is timed from when the request was due on a fixed 20 ms schedule, not from when it
was sent: a probe stuck behind a stalled loop sends its next requests late, and that wait counts
(a stall of 200 ms shows as about ten late answers, not one; no coordinated omission). A request
that finds the connection closed reconnects and is sent again, its latency still counted from
when it was due.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Sequence

from bench.measure import percentile

INTERVAL = 0.02  # seconds between two due times
TIMEOUT = 30.0  # a probe that waits this long fails the benchmark


class LoopProbe:
    """Within `with`: GET http://host:port/healthz every `interval` seconds; `latencies` holds
    the seconds from each request's due time until its whole answer had arrived."""

    def __init__(self, host: str, port: int, interval: float = INTERVAL) -> None:
        self.host, self.port, self.interval = host, port, interval
        self.latencies: list[float] = []
        self.reconnects = 0
        self._connection: http.client.HTTPConnection | None = None
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="loop-probe", daemon=True)

    def __enter__(self) -> LoopProbe:
        self._get()  # connection opened and the path warmed before the schedule starts
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        if self._connection is not None:
            self._connection.close()
        if self._error is not None and exc_info[0] is None:
            raise RuntimeError(f"the /healthz probe failed: {self._error}") from self._error

    def _run(self) -> None:
        due = time.perf_counter()
        try:
            while True:
                wait = due - time.perf_counter()
                if self._stop.wait(wait) if wait > 0 else self._stop.is_set():
                    return
                self._get()
                self.latencies.append(time.perf_counter() - due)
                due += self.interval
        except Exception as exc:  # reported by __exit__
            self._error = exc

    def _get(self) -> None:
        """One GET /healthz on the kept-alive connection; once more on a new one if the server
        had closed it. Raises unless it answers 200."""
        for attempt in (1, 2):
            if self._connection is None:
                self._connection = http.client.HTTPConnection(self.host, self.port, TIMEOUT)
            try:
                self._connection.request("GET", "/healthz")
                with self._connection.getresponse() as resp:
                    resp.read()
                    status = resp.status
            except (http.client.RemoteDisconnected, ConnectionError):
                self._connection.close()
                self._connection = None
                if attempt == 2:
                    raise
                self.reconnects += 1
                continue
            if status != 200:
                raise RuntimeError(f"GET /healthz answered {status}")
            return


def latency_ms(latencies: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile (`fraction` from 0 to 1) of `latencies`, in milliseconds."""
    return percentile(latencies, fraction) * 1e3
