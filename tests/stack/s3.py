"""A real S3 endpoint on 127.0.0.1: LocalStack on the host (Python 3.13 venv), or moto's
server when LocalStack's venv is missing."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from tests.stack.procs import LOOPBACK, Process, ProcessServer, child_env, free_port

LOG = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
LOCALSTACK_PYTHON = REPO / ".venv-localstack" / "bin" / "python"
LAUNCHER = Path(__file__).resolve().with_name("localstack_launcher.py")
REGION = "us-east-1"
ACCESS_KEY = SECRET_KEY = "test"  # LocalStack checks presigned URLs only with secret "test"


def client_config() -> Config:
    """The botocore settings local S3 endpoints need: SigV4, path-style, explicit region, and
    no default CRC checksums / aws-chunked bodies."""
    return Config(
        region_name=REGION,
        signature_version="s3v4",
        s3={"addressing_style": "path"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )


def localstack_env(port: int, workdir: Path) -> dict[str, str]:
    """The environment LocalStack needs to run on the host, on loopback only, offline, with
    all its files under `workdir` and presigned URLs checked."""
    return child_env(
        drop_prefixes=["AWS_"],
        GATEWAY_LISTEN=f"{LOOPBACK}:{port}",
        GATEWAY_SERVER="hypercorn",  # the default server binds every interface
        SERVICES="s3",
        EAGER_SERVICE_LOADING="1",
        DNS_ADDRESS="0",  # else it starts a DNS server and reaches for the internet
        SKIP_SSL_CERT_DOWNLOAD="1",  # else it tries to fetch a TLS cert from the internet
        LOCALSTACK_TELEMETRY_DISABLED="1",
        DISABLE_EVENTS="1",
        FILESYSTEM_ROOT=str(workdir / "filesystem"),
        S3_SKIP_SIGNATURE_VALIDATION="0",  # refuse tampered or expired presigned URLs
        OVERRIDE_IN_DOCKER="0",  # in a container it would ignore FILESYSTEM_ROOT
    )


class S3Server(ProcessServer):
    """A running S3 endpoint with state under `workdir`. `kind` is "localstack" or "moto";
    by default LocalStack when its venv exists."""

    def __init__(self, workdir: Path, port: int | None = None, kind: str | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.kind = kind or self._default_kind()
        self.port = port or free_port()
        self.endpoint_url = f"http://{LOOPBACK}:{self.port}"
        self.process = self._start_localstack() if self.kind == "localstack" else self._start_moto()
        self.start_seconds = self._ready_or_stop(self._wait_ready)
        LOG.info("%s S3 ready at %s in %.2f s", self.kind, self.endpoint_url, self.start_seconds)

    @property
    def validates_presigned_urls(self) -> bool:
        """True when the server refuses tampered or expired presigned URLs (LocalStack only)."""
        return self.kind == "localstack"

    @staticmethod
    def _default_kind() -> str:
        if LOCALSTACK_PYTHON.exists():
            return "localstack"
        LOG.warning(
            "%s is missing (LocalStack runs on the host only on Python 3.13; `make "
            "install` builds it): falling back to moto's S3 server, which accepts any "
            "presigned URL",
            LOCALSTACK_PYTHON,
        )
        return "moto"

    def _start_localstack(self) -> Process:
        store = self.workdir / "s3-objects"
        store.mkdir(exist_ok=True)
        return Process(
            [str(LOCALSTACK_PYTHON), "-P", str(LAUNCHER), str(store)],
            self.workdir / "localstack.log",
            env=localstack_env(self.port, self.workdir),
            cwd=self.workdir,
            name=f"localstack:{self.port}",
        )

    def _start_moto(self) -> Process:
        return Process(
            [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(self.port)],
            self.workdir / "moto.log",
            env=child_env(drop_prefixes=["AWS_"]),
            cwd=self.workdir,
            name=f"moto:{self.port}",
        )

    def _wait_ready(self) -> float:
        if self.kind == "moto":
            return self.process.wait_http(f"{self.endpoint_url}/")

        def s3_up(resp) -> bool:
            return resp.ok and resp.json().get("services", {}).get("s3") in ("running", "available")

        return self.process.wait_http(
            f"{self.endpoint_url}/_localstack/health", ok=s3_up, timeout=120
        )

    def client(self):
        """A new boto3 S3 client for this endpoint (credentials test/test, us-east-1)."""
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=client_config(),
        )

    def create_bucket(self, name: str) -> str:
        """Create bucket `name` unless it exists already; return the name."""
        try:
            self.client().create_bucket(Bucket=name)
        except ClientError as error:
            if error.response["Error"]["Code"] not in (
                "BucketAlreadyOwnedByYou",
                "BucketAlreadyExists",
            ):
                raise
        return name
