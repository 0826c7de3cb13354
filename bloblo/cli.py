"""The `bloblo` command: `bloblo --version`, `bloblo check` to see that the configuration, the
upstream registry and the bucket are what bloblo needs (issue #8, part 1), and `bloblo warm` to
fill the bucket with images' blobs before clients ask for them (part 2).

Like wsgi.py, it lets gevent patch the standard library before anything else is imported.
"""

from gevent import monkey

monkey.patch_all()

import hashlib  # noqa: E402
import importlib.metadata  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import NoReturn  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

import click  # noqa: E402
import requests  # noqa: E402
from tqdm import tqdm  # noqa: E402
from tqdm.contrib.logging import logging_redirect_tqdm  # noqa: E402

from . import spooldir  # noqa: E402
from .config import ConfigError, Settings, load_settings  # noqa: E402
from .credentials import (  # noqa: E402
    Credentials,
    CredentialsError,
    default_config_file,
    from_docker_config,
)
from .errors import RegistryError  # noqa: E402
from .manifests import ManifestError, parse_platform, parse_ref  # noqa: E402
from .names import Digest  # noqa: E402
from .storage import BlobStore  # noqa: E402
from .upstream import Upstream, release  # noqa: E402
from .warm import Progress, Summary, Warmer  # noqa: E402

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


@main.command()
@click.argument("refs", metavar="REF [REF ...]", nargs=-1, required=True)
@click.option("--username", help="user at the upstream registry (with --password-stdin)")
@click.option("--password-stdin", is_flag=True, help="read the password (or token) from stdin")
@click.option(
    "--config-file",
    type=click.Path(dir_okay=True, path_type=Path),
    help="docker's config.json with `docker login` credentials "
    "[default: $DOCKER_CONFIG/config.json or ~/.docker/config.json]",
)
@click.option(
    "--platform",
    "platforms",
    multiple=True,
    metavar="OS/ARCH[/VARIANT]",
    help="of an index or manifest list, warm only this platform (repeatable) [default: all]",
)
@click.option("--jobs", type=click.IntRange(1, 64), default=4, show_default=True)
def warm(
    refs: tuple[str, ...],
    username: str | None,
    password_stdin: bool,
    config_file: Path | None,
    platforms: tuple[str, ...],
    jobs: int,
) -> None:
    """Copy the blobs of REF (repo:tag or repo@digest at BLOBLO_UPSTREAM_URL) that the bucket
    lacks into it, verified as the proxy's fills are; exit 1 if any fails."""
    if password_stdin != (username is not None):
        raise click.UsageError("--username and --password-stdin go together")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings()
    except ConfigError as exc:
        _fail(f"configuration: {exc}")
    upstream_host = urlsplit(settings.upstream_url).netloc
    try:
        parsed_refs = [parse_ref(ref, upstream_host) for ref in refs]
        parsed_platforms = tuple(parse_platform(platform) for platform in platforms)
    except ManifestError as exc:
        raise click.BadParameter(str(exc)) from None
    try:
        credentials = _credentials(settings, username, password_stdin, config_file)
    except CredentialsError as exc:
        _fail(str(exc))
    try:
        spooldir.prepare(settings.spool_directory, create=settings.spool_dir is None)
    except spooldir.UnsafeSpoolDir as exc:
        _fail(str(exc))
    warmer = Warmer(settings, credentials, jobs)
    problem = warmer.store.probe(timeout=CHECK_TIMEOUT)
    if problem:
        _fail(f"bucket s3://{settings.s3_bucket}: {problem}")
    try:
        summary = _warm(warmer, parsed_refs, parsed_platforms)
    except KeyboardInterrupt:
        click.echo("error: interrupted: blobs whose fill had not ended are not cached", err=True)
        sys.exit(130)  # as a shell reports SIGINT
    finally:
        warmer.close()
    click.echo(summary.line)
    sys.exit(1 if summary.failed else 0)


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def _credentials(
    settings: Settings, username: str | None, password_stdin: bool, config_file: Path | None
) -> Credentials | None:
    """--username with the password from stdin, else docker's config.json, else None."""
    if username is not None:
        password = sys.stdin.read().rstrip("\r\n")
        if not password:
            raise CredentialsError("--password-stdin: stdin holds no password")
        return Credentials(username, password)
    path = config_file or default_config_file()
    return from_docker_config(path, settings.upstream_url, required=config_file is not None)


class _Bar(Progress):
    """tqdm on stderr (when it is a terminal): bytes, and blobs done of all."""

    def __init__(self, blobs: list):
        self.done, self.total = 0, len(blobs)
        self.bar = tqdm(
            total=sum(blob.size for blob in blobs),
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=sys.stderr,
            disable=None,
            desc=self._desc(),
        )

    def _desc(self) -> str:
        return f"blobs {self.done}/{self.total}"

    def advance(self, count: int) -> None:
        self.bar.update(count)

    def blob_done(self, blob, outcome: str, reason: str | None) -> None:
        self.done += 1
        self.bar.set_description_str(self._desc())
        if reason:
            tqdm.write(f"FAIL {blob.digest} ({blob.name}): {reason}", file=sys.stderr)


def _warm(warmer: Warmer, refs: list, platforms: tuple) -> Summary:
    """Resolve, then fill; failures to resolve count as failed (one per manifest)."""
    with logging_redirect_tqdm():
        plan = warmer.resolve(refs, platforms)
        for note in plan.notes:
            click.echo(f"note: {note}", err=True)
        for what, reason in plan.failures:
            click.echo(f"FAIL {what}: {reason}", err=True)
        bar = _Bar(plan.blobs)
        try:
            summary = warmer.fill_all(plan.blobs, bar)
        finally:
            bar.bar.close()
    summary.failed += len(plan.failures)
    return summary
