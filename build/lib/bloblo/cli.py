"""The `bloblo` command: `bloblo --version`, and `bloblo check` to see that the configuration, the
upstream registry and the bucket are what bloblo needs (issue #8, part 1).

Like wsgi.py, it lets gevent patch the standard library before anything else is imported.
"""

from gevent import monkey

monkey.patch_all()

import hashlib  # noqa: E402
import importlib.metadata  # noqa: E402
import sys  # noqa: E402

import click  # noqa: E402
import requests  # noqa: E402

from .config import ConfigError, Settings, load_settings  # noqa: E402
from .errors import RegistryError  # noqa: E402
from .names import Digest  # noqa: E402
from .storage import BlobStore  # noqa: E402
from .upstream import Upstream, release  # noqa: E402

CHECK_TIMEOUT = 10.0  # seconds each network check may take
# What `check` writes to the bucket: a blob whose key is its own digest, so it is a valid cache
# entry and can stay (bloblo's role needs no s3:DeleteObject).
PROBE = b"bloblo check: the bucket takes and gives back this blob\n"


def _version() -> str:
    try:
        return importlib.metadata.version("bloblo")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed: run `make install`)"


@click.group()
@click.version_option(version=_version(), prog_name="bloblo")
def main() -> None:
    """bloblo: a registry proxy that serves layer downloads from S3."""


@main.command()
def check() -> None:
    """Check the configuration, the upstream registry and the bucket; exit 1 if any fails."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        _report(False, "configuration", str(exc))
        sys.exit(1)
    _report(True, "configuration", f"upstream {settings.upstream_url}, bucket {settings.s3_bucket}")
    results = [_check_upstream(settings), *_check_bucket(settings)]
    sys.exit(0 if all(results) else 1)


def _report(ok: bool, name: str, detail: str) -> bool:
    click.echo(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
    return ok


def _check_upstream(settings: Settings) -> bool:
    try:
        answer = Upstream(settings).send("GET", "/v2/", [], timeout=CHECK_TIMEOUT)
    except RegistryError as exc:
        return _report(False, "upstream", f"{exc.message}: check BLOBLO_UPSTREAM_URL")
    release(answer)
    if answer.status_code in (200, 401):
        return _report(True, "upstream", f"GET /v2/ answered {answer.status_code}")
    return _report(
        False,
        "upstream",
        f"GET /v2/ answered {answer.status_code}, not 200 or 401: is BLOBLO_UPSTREAM_URL a "
        "registry (distribution API v2)?",
    )


def _check_bucket(settings: Settings) -> list[bool]:
    store = BlobStore(settings)
    problem = store.probe(timeout=CHECK_TIMEOUT)
    if problem:
        return [_report(False, "bucket", problem)]
    results = [_report(True, "bucket", f"s3://{settings.s3_bucket} answers")]
    digest = Digest("sha256", hashlib.sha256(PROBE).hexdigest())
    try:
        store.put(digest, PROBE)
    except Exception as exc:
        return [*results, _report(False, "write", f"{exc}: give bloblo s3:PutObject")]
    results.append(_report(True, "write", f"put {store.key(digest)}"))
    try:
        fetched = requests.get(store.presigned_url(digest), timeout=CHECK_TIMEOUT)
    except requests.RequestException as exc:
        reason = f"{type(exc).__name__}: clients must reach BLOBLO_S3_PUBLIC_ENDPOINT_URL"
        return [*results, _report(False, "presigned GET", reason)]
    if fetched.status_code != 200 or fetched.content != PROBE:
        reason = (
            f"answered {fetched.status_code}: check s3:GetObject, the region "
            "(BLOBLO_S3_REGION) and BLOBLO_S3_PUBLIC_ENDPOINT_URL"
        )
        return [*results, _report(False, "presigned GET", reason)]
    return [*results, _report(True, "presigned GET", "a client gets the blob from S3")]
