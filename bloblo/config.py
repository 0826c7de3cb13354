"""Settings: every BLOBLO_* variable is read here, once, into one immutable object.

This module imports only the standard library, environs and marshmallow, so that gunicorn.conf.py
can load it to check the configuration in the master before any worker forks (importing the
package would import ssl before gevent has patched it).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import tempfile
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import environs
from marshmallow import ValidationError
from marshmallow.validate import OneOf, Range, Regexp

LOCALSTACK_ENDPOINT = "http://localhost:4566"
MAX_PRESIGN_EXPIRES = 7 * 24 * 3600  # the longest a SigV4 presigned URL may live
MAX_AUTH_CACHE_TTL = 60  # issue #3: remembered authorizations go stale fast
MAX_CACHE_CHECK_SECONDS = 60  # issue #8: a deleted object is redirected to at most this long
DEFAULT_TRUSTED_PROXIES = ["127.0.0.0/8", "::1/128"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(ValueError):
    """Some variables hold values bloblo cannot use; the message names each and what it expects."""


@dataclass(frozen=True)
class Settings:
    """Everything bloblo is configured with. `load_settings` builds it; tests build it directly."""

    upstream_url: str = "http://localhost:6666"
    listen_host: str = ""  # empty: every interface
    listen_port: int = 7777
    workers: int = 2  # gunicorn worker processes (gunicorn.conf.py reads it)
    preserve_host: bool = False
    upstream_connect_timeout: float = 10.0
    upstream_read_timeout: float = 60.0
    # A client must take each piece of an answer (up to 1 MiB) within this long, or its
    # connection is closed: a slow or stalled client holds nothing for ever (issue #14 §2).
    client_stall_seconds: float = 60.0

    s3_bucket: str = "sample-bucket"
    s3_endpoint_url: str | None = None  # None: AWS itself
    s3_public_endpoint_url: str | None = None  # what clients reach; defaults to s3_endpoint_url
    s3_region: str | None = None
    s3_prefix: str = ""
    s3_access_key: str | None = None  # set only for LocalStack; otherwise boto3's chain decides
    s3_secret_key: str | None = field(default=None, repr=False)

    # After an S3 failure, blobs are served from the registry this long before S3 is asked again.
    s3_backoff_seconds: float = 10.0
    presign_expires: int = 1200
    # How long a worker trusts that the bucket holds a blob before asking S3 again: a deleted
    # object stops being redirected to within this long (issue #8, part 6).
    cache_check_seconds: float = 30.0
    # Redirecting to an object older than this copies it in place first (0: never), so that a
    # lifecycle rule expiring objects N days after they were written spares blobs in use.
    cache_refresh_seconds: float = 0.0
    auth_cache_ttl: float = 0.0
    # None: a directory of bloblo's own in the temporary directory, one per user and namespace
    # (spool_directory); an operator's must be bloblo's alone (issue #13, part 1).
    spool_dir: str | None = None
    spool_max_bytes: int = 10 * 1024 * 1024 * 1024  # per worker
    max_fills: int = 8  # per worker; 0 turns caching off
    fill_deadline_seconds: float = 3600.0
    # A verified fill's S3 upload waits up to this long for the host to be quiet (no download,
    # no client of a fill, for a second), so that a pull's clients keep the cores (issue #7).
    upload_hold_seconds: float = 10.0
    stream_user_agents: re.Pattern[str] | None = None
    stream_networks: tuple[Network, ...] = ()
    # Load balancers whose X-Forwarded-* headers are believed (issue #6, part 4).
    trusted_proxies: tuple[Network, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    log_format: str = "text"  # or json: one JSON object per line
    tls_cert: str | None = None  # PEM certificate (chain) bloblo serves HTTPS with
    tls_key: str | None = field(default=None, repr=False)
    # Clients that may read /metrics (issue #8, part 3).
    metrics_networks: tuple[Network, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    # What an operator should know about the configuration (retired settings): logged once.
    notices: tuple[str, ...] = ()

    @property
    def namespace(self) -> str:
        """12 hex digits naming the bucket and prefix: instances caching elsewhere never share
        a fill, nor its files."""
        return hashlib.sha256(f"{self.s3_bucket}/{self.s3_prefix}".encode()).hexdigest()[:12]

    @property
    def spool_directory(self) -> str:
        """Where fills spool: BLOBLO_SPOOL_DIR, or by default `bloblo-<uid>-<namespace>` in the
        temporary directory (made 0700 by the first process that needs it: spooldir.py)."""
        if self.spool_dir is not None:
            return self.spool_dir
        name = f"bloblo-{os.geteuid()}-{self.namespace}"
        return os.path.join(tempfile.gettempdir(), name)


def load_settings() -> Settings:
    """Read the BLOBLO_* variables from the environment and `./.env` (unless BLOBLO_DOTENV=0).

    Raises ConfigError listing every variable whose value is unusable.
    """
    env = environs.Env(eager=False)
    if os.environ.get("BLOBLO_DOTENV", "1") != "0" and os.path.exists(".env"):
        env.read_env(".env", recurse=False, override=False)
    with env.prefixed("BLOBLO_"):
        raw = _read(env)
    try:
        env.seal()
    except environs.EnvValidationError as exc:
        problems = "; ".join(
            f"{name}: {' '.join(msgs)}" for name, msgs in exc.error_messages.items()
        )
        raise ConfigError(f"invalid configuration: {problems}") from None
    if (raw["tls_cert"] is None) != (raw["tls_key"] is None):
        raise ConfigError(
            "invalid configuration: BLOBLO_TLS_CERT and BLOBLO_TLS_KEY go together: set both "
            "to serve HTTPS, or neither"
        )
    return _settings(raw)


def _read(env: environs.Env) -> dict:
    """Each variable, parsed and checked (values are None where invalid until env.seal())."""
    seconds = Range(min=0.1, max=3600, error="expected seconds from {min} to {max}")
    return {
        "listen_addr": env.str("LISTEN_ADDR", ":7777", validate=_check_listen_addr),
        "upstream_url": env.str("UPSTREAM_URL", "http://localhost:6666", validate=_check_url),
        "workers": env.int(
            "WORKERS",
            os.cpu_count() or 1,
            validate=Range(min=1, max=256, error="expected a number of processes, 1 to {max}"),
        ),
        "preserve_host": env.bool("PRESERVE_HOST", False),
        "use_localstack": env.bool("USE_LOCALSTACK", False),
        "connect_timeout": env.float("UPSTREAM_CONNECT_TIMEOUT", 10.0, validate=seconds),
        "read_timeout": env.float("UPSTREAM_READ_TIMEOUT", 60.0, validate=seconds),
        "client_stall": env.float("CLIENT_STALL_SECONDS", 60.0, validate=seconds),
        "bucket": env.str(
            "S3_BUCKET_NAME",
            "sample-bucket",
            validate=Regexp(
                r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$",
                error="expected an S3 bucket name: 3-63 characters of a-z, 0-9, '.', '-'",
            ),
        ),
        "endpoint": env.str("S3_ENDPOINT_URL", None, validate=_check_url),
        "public_endpoint": env.str("S3_PUBLIC_ENDPOINT_URL", None, validate=_check_url),
        "region": env.str("S3_REGION", None),
        "prefix": env.str(
            "S3_PREFIX",
            "",
            validate=Regexp(
                r"^[A-Za-z0-9!_.*'()/\-]*$", error="expected a key prefix of A-Z a-z 0-9 !_.*'()/-"
            ),
        ),
        "s3_backoff": env.float(
            "S3_BACKOFF_SECONDS",
            10.0,
            validate=Range(min=1, max=600, error="expected seconds, {min} to {max}"),
        ),
        "presign_expires": env.int(
            "PRESIGN_EXPIRES",
            1200,
            validate=Range(min=1, max=MAX_PRESIGN_EXPIRES, error="expected seconds, 1 to {max}"),
        ),
        "cache_check": env.float(
            "CACHE_CHECK_SECONDS",
            30.0,
            validate=Range(
                min=0, max=MAX_CACHE_CHECK_SECONDS, error="expected seconds, 0 to {max}"
            ),
        ),
        "cache_refresh": env.float(
            "CACHE_REFRESH_SECONDS",
            0.0,
            validate=Range(
                min=0, max=10 * 365 * 24 * 3600, error="expected seconds, 0 (never) to {max}"
            ),
        ),
        "auth_cache_ttl": env.float(
            "AUTH_CACHE_TTL",
            0.0,
            validate=Range(min=0, max=MAX_AUTH_CACHE_TTL, error="expected seconds, 0 to {max}"),
        ),
        "spool_dir": env.str("SPOOL_DIR", None, validate=_check_directory),
        "spool_max_mb": env.int(
            "SPOOL_MAX_MB",
            10 * 1024,
            validate=Range(min=0, max=1024 * 1024 * 1024, error="expected MiB, 0 to {max}"),
        ),
        "max_fills": env.int(
            "MAX_FILLS",
            None,
            validate=Range(min=0, max=1000, error="expected fills per worker, 0 to {max}"),
        ),
        "max_uploads": env.int(  # retired: the old name of MAX_FILLS
            "MAX_UPLOADS", None, validate=Range(min=0, max=1000, error="expected 0 to {max}")
        ),
        "fill_deadline": env.float(
            "FILL_DEADLINE_SECONDS",
            3600.0,
            validate=Range(min=0.1, max=7 * 24 * 3600, error="expected seconds, {min} to {max}"),
        ),
        "upload_hold": env.float(
            "UPLOAD_HOLD_SECONDS",
            10.0,
            validate=Range(min=0, max=600, error="expected seconds, {min} to {max}"),
        ),
        "user_agents": env.str("STREAM_USER_AGENTS", "", validate=_check_regex),
        "networks": env.list("STREAM_NETWORKS", [], validate=_check_networks),
        "log_format": env.str(
            "LOG_FORMAT", "text", validate=OneOf(["text", "json"], error="expected text or json")
        ),
        "tls_cert": env.str("TLS_CERT", None, validate=_check_readable),
        "tls_key": env.str("TLS_KEY", None, validate=_check_readable),
        "metrics_networks": env.list(
            "METRICS_NETWORKS", DEFAULT_TRUSTED_PROXIES, validate=_check_networks
        ),
        "trusted_proxies": env.list(
            "TRUSTED_PROXIES", DEFAULT_TRUSTED_PROXIES, validate=_check_networks
        ),
    }


def _settings(raw: dict) -> Settings:
    """Derive the Settings from checked values (LocalStack implies endpoint, region, keys)."""
    localstack = raw["use_localstack"]
    endpoint = raw["endpoint"] or (LOCALSTACK_ENDPOINT if localstack else None)
    host, port = parse_listen_addr(raw["listen_addr"])
    prefix = raw["prefix"].strip("/")
    return Settings(
        upstream_url=raw["upstream_url"].rstrip("/"),
        listen_host=host,
        listen_port=port,
        workers=raw["workers"],
        preserve_host=raw["preserve_host"],
        upstream_connect_timeout=raw["connect_timeout"],
        upstream_read_timeout=raw["read_timeout"],
        client_stall_seconds=raw["client_stall"],
        s3_bucket=raw["bucket"],
        s3_endpoint_url=endpoint,
        s3_public_endpoint_url=raw["public_endpoint"] or endpoint,
        s3_region=raw["region"] or ("us-east-1" if localstack else None),
        s3_prefix=prefix + "/" if prefix else "",
        s3_access_key="test" if localstack else None,
        s3_secret_key="test" if localstack else None,
        s3_backoff_seconds=raw["s3_backoff"],
        presign_expires=raw["presign_expires"],
        cache_check_seconds=raw["cache_check"],
        cache_refresh_seconds=raw["cache_refresh"],
        auth_cache_ttl=raw["auth_cache_ttl"],
        spool_dir=raw["spool_dir"],
        spool_max_bytes=raw["spool_max_mb"] * 1024 * 1024,
        max_fills=_first_set(raw["max_fills"], raw["max_uploads"], Settings.max_fills),
        fill_deadline_seconds=raw["fill_deadline"],
        upload_hold_seconds=raw["upload_hold"],
        stream_user_agents=re.compile(raw["user_agents"]) if raw["user_agents"] else None,
        stream_networks=_networks(raw["networks"]),
        trusted_proxies=_networks(raw["trusted_proxies"]),
        metrics_networks=_networks(raw["metrics_networks"]),
        notices=tuple(_retired()),
        log_format=raw["log_format"],
        tls_cert=raw["tls_cert"],
        tls_key=raw["tls_key"],
    )


# Settings retired by issue #7 (fills), and what replaced them.
RETIRED = {
    "BLOBLO_MAX_UPLOADS": "renamed BLOBLO_MAX_FILLS (fills per worker); its value is used "
    "unless BLOBLO_MAX_FILLS is set",
    "BLOBLO_UPLOAD_BUFFER_MB": "no longer used: a fill spools the whole blob, within "
    "BLOBLO_SPOOL_MAX_MB per worker",
    "BLOBLO_UPLOAD_STALL_SECONDS": "no longer used: a slow client or a slow S3 never holds "
    "a fill back; BLOBLO_FILL_DEADLINE_SECONDS bounds a fill",
}


def _retired() -> list[str]:
    return [
        f"{name} is retired: {what}. See the README's upgrade notes."
        for name, what in RETIRED.items()
        if name in os.environ  # .env's values are in the environment by now
    ]


def _first_set(*values):
    return next(value for value in values if value is not None)


def parse_listen_addr(value: str) -> tuple[str, int]:
    """Split HOST:PORT into (host, port); `:7777` has an empty host, meaning every interface."""
    match = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^:\[\]]*):(\d{1,5})", value.strip())
    if not match or not 0 < int(match.group(2)) < 65536:
        raise ValidationError("expected HOST:PORT, e.g. ':7777', '127.0.0.1:7777' or '[::1]:7777'")
    return match.group(1).strip("[]"), int(match.group(2))


def _check_listen_addr(value: str) -> None:
    parse_listen_addr(value)


def _check_url(value: str | None) -> None:
    if value is None:
        return
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 (raises on a malformed port)
    except ValueError:
        raise ValidationError("expected an http:// or https:// URL with a valid port") from None
    if parts.username is not None or parts.password is not None:
        # Never repeat the value: it holds a secret (issue #6, part 7).
        raise ValidationError(
            "must not contain credentials (user:password@): remove them; clients bring their "
            "own credentials and bloblo passes them on"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        raise ValidationError("expected an http:// or https:// URL with a host and no query")


def _networks(values: list[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(value.strip()) for value in values)


def _check_readable(value: str | None) -> None:
    if value is not None and not os.access(value, os.R_OK):
        raise ValidationError("expected a readable PEM file")


def _check_directory(value: str | None) -> None:
    if value is not None and not os.path.isdir(value):
        raise ValidationError("expected an existing directory")


def _check_regex(value: str) -> None:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValidationError(f"expected a regular expression ({exc})") from None


def _check_networks(values: list[str]) -> None:
    try:
        for value in values:
            ipaddress.ip_network(value.strip())
    except ValueError:
        raise ValidationError("expected networks such as 10.0.0.0/8,::1/128") from None
