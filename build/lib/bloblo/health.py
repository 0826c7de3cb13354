"""Health: /livez (the process serves) and /readyz (the upstream answers), checked at most every
few seconds, never per request (issue #8, part 4).

S3 is reported but never makes bloblo unready: while S3 is down bloblo serves every blob from the
registry, and a load balancer must not drop every instance during an S3 outage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import gevent
from flask import Blueprint, Response, json
from gevent.lock import Semaphore

from .errors import RegistryError
from .storage import BlobStore
from .upstream import Upstream, release

CHECK_INTERVAL = 5.0  # seconds a check's result is reused
CHECK_TIMEOUT = 3.0  # seconds a check may take before it counts as failed


@dataclass(frozen=True)
class Check:
    """The outcome of one check: ok or fail, and what was seen."""

    ok: bool
    detail: str

    def as_json(self) -> dict:
        return {"status": "ok" if self.ok else "fail", "detail": self.detail}


class Health:
    """The checks behind /readyz, each run at most every CHECK_INTERVAL seconds."""

    def __init__(self, upstream: Upstream, store: BlobStore, clock=time.monotonic):
        self._upstream = upstream
        self._store = store
        self._clock = clock
        self._checked_at = float("-inf")
        self._checks: dict[str, Check] = {}
        self._lock = Semaphore()  # concurrent probes share one run of the checks

    def checks(self) -> dict[str, Check]:
        """The latest checks (upstream, s3), run again if older than CHECK_INTERVAL."""
        with self._lock:
            if self._clock() - self._checked_at >= CHECK_INTERVAL:
                upstream, s3 = gevent.spawn(self._check_upstream), gevent.spawn(self._check_s3)
                gevent.joinall([upstream, s3])
                self._checks = {"upstream": upstream.value, "s3": s3.value}
                self._checked_at = self._clock()
            return self._checks

    def _check_upstream(self) -> Check:
        try:
            answer = self._upstream.send("GET", "/v2/", [], timeout=CHECK_TIMEOUT)
        except RegistryError as exc:
            return Check(False, exc.message)
        release(answer)
        ok = answer.status_code in (200, 401)
        return Check(ok, f"GET /v2/ answered {answer.status_code}")

    def _check_s3(self) -> Check:
        problem = self._store.probe(timeout=CHECK_TIMEOUT)
        return Check(problem is None, problem or "the bucket answers")


def create_blueprint(health: Health) -> Blueprint:
    """bloblo's own health endpoints: answered here, never forwarded upstream."""
    blueprint = Blueprint("health", __name__)

    @blueprint.route("/livez")
    @blueprint.route("/healthz")  # the first release's name
    def livez() -> Response:
        """Liveness: the process is up and serving."""
        return _answer(200, "ok", {})

    @blueprint.route("/readyz")
    def readyz() -> Response:
        """Readiness: 503 only when the upstream does not answer /v2/ with 200 or 401."""
        checks = health.checks()
        ready = checks["upstream"].ok
        return _answer(200 if ready else 503, "ok" if ready else "fail", checks)

    return blueprint


def _answer(status: int, word: str, checks: dict[str, Check]) -> Response:
    body = {"status": word, "checks": {name: c.as_json() for name, c in checks.items()}}
    response = Response(json.dumps(body), status=status, mimetype="application/json")
    response.headers["Cache-Control"] = "no-store"
    return response
