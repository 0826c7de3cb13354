"""bloblo itself, as in production: gunicorn with gevent workers, run from the repository with
an environment built from scratch for each test."""

from __future__ import annotations

import logging
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil

from tests.stack.procs import LOOPBACK, Process, ProcessServer, child_env, free_port

LOG = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
GUNICORN = REPO / ".venv" / "bin" / "gunicorn"


def bloblo_env(
    port: int,
    upstream_url: str,
    s3_endpoint_url: str,
    bucket: str,
    workers: int,
    home: Path,
    extra: Mapping[str, str],
) -> dict[str, str]:
    """bloblo's environment: the settings given, nothing from the caller's AWS_*, BLOBLO_* or
    home directory (so ~/.aws and a repository .env cannot leak in), then `extra`."""
    env = child_env(
        drop_prefixes=["AWS_", "BLOBLO_"],
        HOME=str(home),
        TMPDIR=str(home),  # bloblo's default spool directory goes there, not in /tmp
        BLOBLO_DOTENV="0",
        BLOBLO_LISTEN_ADDR=f"{LOOPBACK}:{port}",
        BLOBLO_UPSTREAM_URL=upstream_url,
        BLOBLO_WORKERS=str(workers),
        BLOBLO_S3_BUCKET_NAME=bucket,
        BLOBLO_S3_ENDPOINT_URL=s3_endpoint_url,
        BLOBLO_S3_REGION="us-east-1",
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test",
    )
    env.update(extra)
    return env


def try_start(
    workdir: Path, upstream_url: str, env: Mapping[str, str]
) -> subprocess.CompletedProcess:
    """Start gunicorn with bloblo's configuration once, for a start-up expected to fail (a bad
    configuration): the completed process, its exit code, stdout and stderr."""
    return subprocess.run(
        [str(GUNICORN), "-c", "gunicorn.conf.py", "wsgi:app"],
        cwd=REPO,
        env=bloblo_env(free_port(), upstream_url, "http://127.0.0.1:1", "b-u-c", 1, workdir, env),
        capture_output=True,
        text=True,
        timeout=60,
    )


class BlobloServer(ProcessServer):
    """A running bloblo (gunicorn master + `workers` gevent workers) on 127.0.0.1:free-port,
    proxying `upstream_url` and caching blobs in `bucket` at `s3_endpoint_url`. gunicorn runs
    as `command_prefix + [gunicorn, ...]` (e.g. limits.file_size_limit(); the prefix must exec
    it, so that the PID stopped is gunicorn's)."""

    def __init__(
        self,
        workdir: Path,
        upstream_url: str,
        s3_endpoint_url: str,
        bucket: str,
        workers: int = 1,
        env: Mapping[str, str] | None = None,
        app_dir: Path = REPO,
        command_prefix: Sequence[str] = (),
    ) -> None:
        self.workdir = Path(workdir)
        home = self.workdir / "home"
        home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.host = f"{LOOPBACK}:{self.port}"
        tls = "BLOBLO_TLS_CERT" in (env or {})
        self.url = f"{'https' if tls else 'http'}://{self.host}"
        self.upstream_url = upstream_url
        self.bucket = bucket
        self.process = Process(
            [*command_prefix, str(GUNICORN), "-c", "gunicorn.conf.py", "wsgi:app"],
            self.workdir / "bloblo.log",
            env=bloblo_env(
                self.port, upstream_url, s3_endpoint_url, bucket, workers, home, env or {}
            ),
            cwd=app_dir,
            name=f"bloblo:{self.port}",
        )
        self.start_seconds = self._ready_or_stop(
            lambda: self.process.wait_http(
                f"{self.url}/healthz",
                ok=lambda resp: resp.status_code == 200,
                timeout=60,
                verify=not tls,  # readiness only: the tests check the certificate themselves
            )
        )
        LOG.info("bloblo ready at %s in %.2f s", self.url, self.start_seconds)

    def worker_pids(self) -> list[int]:
        """PIDs of the master's live worker processes."""
        try:
            return [child.pid for child in psutil.Process(self.pid).children()]
        except psutil.NoSuchProcess:
            return []

    def worker_rss(self) -> dict[int, int]:
        """Resident memory in bytes of each live worker, by PID (sum the values for a total)."""
        rss = {}
        for pid in self.worker_pids():
            try:
                rss[pid] = psutil.Process(pid).memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return rss

    def stop(self) -> None:
        """Stop gunicorn by PID with SIGINT, its quick shutdown: SIGTERM's graceful one waits
        for every idle keep-alive connection a test left open (production keeps SIGTERM)."""
        self.process.stop(signum=signal.SIGINT)
