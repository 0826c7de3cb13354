"""A crowd of registry clients in a process of its own: `python -m tests.stack.crowd < plan.json`.

Each client is a greenlet with its own connections (requests, one session each). For the plan's
seconds it pulls blobs through bloblo: mostly warm ones (already in the bucket: bloblo answers
307 and the client fetches the presigned URL), now and then the next fresh one (a miss that
starts a fill or joins one). Every body is hashed and checked against its digest and size. A
herd of the plan's clients may pull one fresh image together (manifest, config, layers), all let
go at the same moment. What happened is printed as one JSON object (`Outcome`).

A plan is JSON: url, seconds, clients, warm (blobs), and optionally cold (blobs), cold_share,
herd ({at, clients, repo, reference}), headers, seed, and stop_file (the clients stop early
once it exists).

Its own process, with gevent, so that hundreds of clients cost one core at most and none of the
caller's threads: the caller (a test, a benchmark) reads the JSON and checks it.
"""

if __name__ == "__main__":  # patch before requests or ssl are imported (FIELD-NOTES)
    from gevent import monkey

    monkey.patch_all()

import hashlib  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
import requests  # noqa: E402
from requests.adapters import HTTPAdapter  # noqa: E402
from urllib3.util.retry import Retry  # noqa: E402

CHUNK = 1 << 20  # what a client reads and hashes at a time
TIMEOUT = (10, 120)  # connect, and between two reads: a stuck client fails, never hangs
MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
ERRORS_KEPT = 20  # failures described in the outcome (all are counted)


@dataclass(frozen=True)
class Blob:
    """A blob to pull: GET {url}/v2/{repo}/blobs/{digest} must give `size` bytes of `digest`."""

    repo: str
    digest: str
    size: int


@dataclass
class Outcome:
    """What the crowd did: pulls by kind (warm, cold, herd), those that failed (wrong bytes,
    an error status, a broken connection), seconds of bloblo's answers to warm GETs (until its
    307's headers), and how long the herd took until its last client had the whole image."""

    pulls: Counter = field(default_factory=Counter)
    failures: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    warm_answer_seconds: list[float] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    herd_seconds: float | None = None
    bytes_checked: int = 0

    def failed(self, kind: str, what: str) -> None:
        """Count one failed pull of `kind`, describing the first few."""
        self.failures[kind] += 1
        if len(self.errors) < ERRORS_KEPT:
            self.errors.append(f"{kind}: {what}")


# A request on a kept-alive connection that the server closed as the request went out fails
# before any answer: sent again once, as docker's and containerd's HTTP client (Go's) does.
RESEND_WHEN_DROPPED = Retry(total=1, connect=1, read=1, status=0, redirect=0, other=0)


def _session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # loopback only: no proxy from the environment
    adapter = HTTPAdapter(pool_connections=2, pool_maxsize=1, max_retries=RESEND_WHEN_DROPPED)
    session.mount("http://", adapter)
    return session


def _pull(session: requests.Session, url: str, blob: Blob, headers: dict) -> tuple[float, int]:
    """GET blob through bloblo, following a 307 to S3; return (seconds until bloblo's answer,
    its status). Raises ValueError, naming bloblo or S3, unless the body is the blob."""
    started = time.perf_counter()
    try:
        answer = session.get(
            f"{url}/v2/{blob.repo}/blobs/{blob.digest}",
            headers=headers,
            allow_redirects=False,
            stream=True,
            timeout=TIMEOUT,
        )
    except requests.RequestException as exc:
        raise ValueError(f"bloblo: {exc}") from None
    with answer:
        answered, status = time.perf_counter() - started, answer.status_code
        if status != 307:
            _check(answer, blob)
            return answered, status
        answer.close()
    try:
        with session.get(answer.headers["Location"], stream=True, timeout=TIMEOUT) as s3:
            _check(s3, blob)
    except requests.RequestException as exc:
        raise ValueError(f"S3: {exc}") from None
    return answered, status


def _check(answer: requests.Response, blob: Blob) -> None:
    """Raise ValueError unless `answer` is a 200 whose body is the blob."""
    if answer.status_code != 200:
        raise ValueError(f"{blob.digest} answered {answer.status_code}")
    hasher, size = hashlib.sha256(), 0
    for chunk in answer.raw.stream(CHUNK, decode_content=False):
        hasher.update(chunk)
        size += len(chunk)
    got = f"sha256:{hasher.hexdigest()}"
    if (got, size) != (blob.digest, blob.size):
        raise ValueError(f"{blob.digest} ({blob.size} bytes) came as {got} ({size} bytes)")


class Crowd:
    """The plan (see module docstring) and the clients that carry it out."""

    def __init__(self, plan: dict):
        self.url = plan["url"]
        self.seconds = float(plan["seconds"])
        self.clients = int(plan["clients"])
        self.headers = dict(plan.get("headers", {}))
        self.warm = [Blob(**blob) for blob in plan["warm"]]
        self.cold = iter([Blob(**blob) for blob in plan.get("cold", [])])
        self.cold_share = float(plan.get("cold_share", 0.0))
        self.herd = plan.get("herd")
        self.stop_file = Path(plan["stop_file"]) if "stop_file" in plan else None
        self.outcome = Outcome()
        self._random = random.Random(plan.get("seed", 1))
        self._deadline = 0.0

    def run(self) -> Outcome:
        """Run every client until the plan's seconds are over and each has finished its pull."""
        self._deadline = time.monotonic() + self.seconds
        clients = [gevent.spawn(self._client) for _ in range(self.clients)]
        if self.herd:
            clients.append(gevent.spawn(self._herd, self.herd))
        gevent.joinall(clients, raise_error=True)
        return self.outcome

    def _stopped(self) -> bool:
        """Whether the caller asked the crowd to stop early (the plan's stop_file exists)."""
        return self.stop_file is not None and self.stop_file.exists()

    def _next(self) -> tuple[str, Blob]:
        if self._random.random() < self.cold_share:
            blob = next(self.cold, None)
            if blob is not None:
                return "cold", blob
        return "warm", self._random.choice(self.warm)

    def _client(self) -> None:
        session = _session()
        try:
            while time.monotonic() < self._deadline and not self._stopped():
                kind, blob = self._next()
                self._pull_one(session, kind, blob)
        finally:
            session.close()

    def _pull_one(self, session: requests.Session, kind: str, blob: Blob) -> None:
        try:
            answered, status = _pull(session, self.url, blob, self.headers)
        except (ValueError, requests.RequestException, KeyError) as exc:
            self.outcome.failed(kind, str(exc))
            session.close()  # a broken connection is not reused
            return
        self.outcome.pulls[kind] += 1
        self.outcome.statuses[f"{kind} {status}"] += 1
        self.outcome.bytes_checked += blob.size
        if kind == "warm":
            self.outcome.warm_answer_seconds.append(answered)

    def _herd(self, herd: dict) -> None:
        """herd["clients"] clients pull herd's image at herd["at"] seconds, all let go at once."""
        go = gevent.event.Event()
        pullers = [gevent.spawn(self._image, go, herd) for _ in range(int(herd["clients"]))]
        gevent.sleep(float(herd["at"]))
        started = time.monotonic()
        go.set()
        gevent.joinall(pullers, raise_error=True)
        self.outcome.herd_seconds = time.monotonic() - started

    def _image(self, go: gevent.event.Event, herd: dict) -> None:
        session = _session()
        repo = herd["repo"]
        try:
            go.wait()
            manifest = session.get(
                f"{self.url}/v2/{repo}/manifests/{herd['reference']}",
                headers={**self.headers, "Accept": ", ".join(MANIFEST_TYPES)},
                timeout=TIMEOUT,
            )
            if manifest.status_code != 200:
                self.outcome.failed("herd", f"manifest answered {manifest.status_code}")
                return
            described = manifest.json()
            for item in itertools.chain([described["config"]], described["layers"]):
                self._pull_one(session, "herd", Blob(repo, item["digest"], item["size"]))
        except (ValueError, requests.RequestException, KeyError) as exc:
            self.outcome.failed("herd", f"manifest: {exc}")
        finally:
            session.close()


def push_blobs(registry_url: str, repo: str, sizes: Sequence[int], workdir: Path) -> list[Blob]:
    """Push one blob of fresh random bytes per size to the registry at registry_url (no auth);
    return them. The local copies are deleted."""
    from tests.stack.images import write_random_file
    from tests.stack.regclient import RegistryClient

    client, blobs = RegistryClient(registry_url), []
    try:
        for index, size in enumerate(sizes):
            path = workdir / f"crowd-blob-{index}"
            digest = write_random_file(path, size)
            client.push_blob(repo, path, digest)
            path.unlink()
            blobs.append(Blob(repo, digest, size))
    finally:
        client.close()
    return blobs


def run_crowd(plan: dict, timeout: float) -> dict:
    """Run a crowd with `plan` in its own process; return its Outcome as a dict. Raises
    RuntimeError (with its stderr) if it fails, TimeoutExpired after `timeout` seconds."""
    import subprocess

    repo_root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-m", "tests.stack.crowd"],
        input=json.dumps(plan, default=asdict),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=repo_root,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the crowd failed (exit code {done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout)


def main() -> None:
    """Read the plan from stdin, run the crowd, print the Outcome as JSON."""
    outcome = Crowd(json.load(sys.stdin)).run()
    json.dump(vars(outcome), sys.stdout)  # not asdict(): it would turn Counters inside out


if __name__ == "__main__":
    main()
