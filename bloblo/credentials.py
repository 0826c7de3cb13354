"""Credentials for pulling from the upstream as one identity: docker's config.json, and answers
to the registry's Basic or Bearer challenge (the token flow of distribution's token auth).

Passwords and tokens never appear in a message or a log line.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import requests

TOKEN_TIMEOUT = 30.0  # seconds a token request may take
_PARAM = re.compile(r'(\w+)=(?:"([^"]*)"|([^,\s]*))')


class CredentialsError(Exception):
    """Credentials cannot be found or are refused; the message says what to do."""


@dataclass(frozen=True)
class Credentials:
    """A user name and password (or registry token) for the upstream."""

    username: str
    password: str = field(repr=False)


def default_config_file() -> Path:
    """docker's config.json: $DOCKER_CONFIG/config.json, else ~/.docker/config.json."""
    directory = os.environ.get("DOCKER_CONFIG")
    return Path(directory) if directory else Path.home() / ".docker" / "config.json"


def from_docker_config(path: Path, upstream_url: str, required: bool) -> Credentials | None:
    """The credentials `docker login` stored in the config file at path for the upstream's
    host[:port] (keys with or without scheme or path); None when it holds none (anonymous).

    A missing file is anonymous unless required. Raises CredentialsError for an unreadable
    file, or when the credentials sit in a credential helper or are an identity token (OAuth2
    refresh), which warm does not use.
    """
    path = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        if required:
            raise CredentialsError(f"{path}: no such file") from None
        return None
    except (OSError, ValueError) as exc:
        raise CredentialsError(f"cannot read {path}: {exc}") from None
    return lookup(config, urlsplit(upstream_url).netloc, str(path))


def lookup(config: dict, host: str, source: str = "config.json") -> Credentials | None:
    """The credentials in a parsed docker config for host (host[:port]); see
    from_docker_config."""
    host = host.lower()
    if not (
        isinstance(config, dict)
        and isinstance(config.get("auths") or {}, dict)
        and isinstance(config.get("credHelpers") or {}, dict)
    ):
        raise CredentialsError(f"{source} is not a docker config.json")
    helpers = config.get("credHelpers") or {}
    entry = next(
        (value for key, value in (config.get("auths") or {}).items() if _host_of(key) == host),
        None,
    )
    use_flags = "pass --username and --password-stdin instead"
    if any(_host_of(key) == host for key in helpers):
        raise CredentialsError(f"{source}: {host} uses a credential helper; {use_flags}")
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise CredentialsError(f"{source}: the entry of {host} is not an object")
    if entry.get("identitytoken"):
        raise CredentialsError(f"{source}: {host} has an identity token (OAuth2); {use_flags}")
    if entry.get("auth"):
        try:
            username, colon, password = base64.b64decode(entry["auth"]).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            colon = ""
        if not colon:
            raise CredentialsError(f"{source}: the auth of {host} is not base64 user:password")
        return Credentials(username, password)
    if entry.get("username") and entry.get("password"):
        return Credentials(entry["username"], entry["password"])
    if config.get("credsStore"):
        raise CredentialsError(
            f"{source}: {host} is in the {config['credsStore']!r} credential store; {use_flags}"
        )
    return None


def _host_of(key: str) -> str:
    """host[:port] of an `auths` key: `host:port`, `https://host/v1/` and the like."""
    key = key.strip().lower()
    if "://" in key:
        key = key.split("://", 1)[1]
    return key.split("/", 1)[0]


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """The scheme (lowercase) and parameters of a WWW-Authenticate header (RFC 9110 11.6.1)."""
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), {
        key.lower(): quoted or bare for key, quoted, bare in _PARAM.findall(rest)
    }


class Authorizer:
    """The Authorization header for each repository, from the credentials (or anonymous).

    After a 401, answer() reads its challenge: Basic sends the credentials, Bearer gets a pull
    token from the realm (distribution's token auth: GET realm?service=&scope=, Basic auth with
    the credentials) and remembers it for the repository.
    """

    def __init__(self, credentials: Credentials | None):
        self._credentials = credentials
        self._headers: dict[str, str] = {}  # repository -> Authorization
        self._session = requests.Session()
        self._session.trust_env = False  # no ~/.netrc, no proxy variables

    def headers(self, name: str) -> list[tuple[str, str]]:
        """The Authorization header to send for repository name, if any yet."""
        value = self._headers.get(name)
        return [("Authorization", value)] if value else []

    def answer(self, name: str, challenge: str) -> None:
        """Prepare credentials for repository name after a 401 with challenge; raise
        CredentialsError when there is nothing (more) to try."""
        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            if self._credentials is None:
                raise CredentialsError(
                    "the registry asks for credentials: pass --username and --password-stdin, "
                    "or `docker login` it"
                )
            if self._headers.get(name, "").startswith("Basic "):
                raise CredentialsError("the registry refused the credentials (401)")
            self._headers[name] = "Basic " + _basic(self._credentials)
        elif scheme == "bearer" and "realm" in params:
            self._headers[name] = "Bearer " + self._token(name, params)
        else:
            raise CredentialsError(f"unsupported authentication challenge {scheme!r}")

    def _token(self, name: str, params: dict[str, str]) -> str:
        query = {"scope": f"repository:{name}:pull"}
        if "service" in params:
            query["service"] = params["service"]
        creds = self._credentials
        auth = (creds.username, creds.password) if creds else None
        try:
            answer = self._session.get(
                params["realm"], params=query, auth=auth, timeout=TOKEN_TIMEOUT
            )
        except requests.RequestException as exc:
            reason = f"{type(exc).__name__} at {params['realm']}"
            raise CredentialsError(f"the token service cannot be reached: {reason}") from None
        with answer:
            if answer.status_code in (401, 403):
                raise CredentialsError(
                    f"the registry's token service refused the credentials ({answer.status_code})"
                )
            try:
                body = answer.json() if answer.status_code == 200 else {}
            except ValueError:
                body = {}
        if not isinstance(body, dict):
            body = {}
        token = body.get("token") or body.get("access_token")
        if not isinstance(token, str) or not token:
            raise CredentialsError(
                f"the registry's token service answered {answer.status_code} without a token"
            )
        return token

    def close(self) -> None:
        """Close the token service's connections."""
        self._session.close()


def _basic(credentials: Credentials) -> str:
    return base64.b64encode(f"{credentials.username}:{credentials.password}".encode()).decode()
