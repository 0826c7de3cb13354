"""Which headers cross the proxy, in each direction (RFC 9110 section 7.6.1)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import urlsplit

from .clients import Client, is_forwarding_header

# Hop-by-hop headers (RFC 9110 7.6.1) plus what the WSGI server or the HTTP client sets itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_NOT_FORWARDED_UP = frozenset({"host", "content-length", "expect"})  # gunicorn answered Expect
_NOT_FORWARDED_DOWN = frozenset({"date", "server"})  # gunicorn sends its own

Headers = list[tuple[str, str]]


def _connection_tokens(headers: Iterable[tuple[str, str]]) -> set[str]:
    """Header names listed in Connection, which are hop-by-hop too."""
    return {
        token.strip().lower()
        for name, value in headers
        if name.lower() == "connection"
        for token in value.split(",")
    }


def end_to_end(headers: Iterable[tuple[str, str]], also_drop: frozenset[str]) -> Headers:
    """The headers a proxy passes on, repeated ones kept in order."""
    headers = list(headers)
    drop = HOP_BY_HOP | also_drop | _connection_tokens(headers)
    return [(name, value) for name, value in headers if name.lower() not in drop]


def upstream_request_headers(
    client_headers: Iterable[tuple[str, str]], client: Client, *, preserve_host: bool
) -> Headers:
    """Upstream request headers: the client's own (Authorization untouched), its forwarding
    headers replaced by the client's description (see clients.identify).

    With preserve_host the client's Host goes upstream; otherwise the HTTP client sets the
    upstream's Host and X-Forwarded-Host tells the registry the address the client used.
    """
    headers = [
        (name, value)
        for name, value in end_to_end(client_headers, _NOT_FORWARDED_UP)
        if not is_forwarding_header(name)
    ]
    headers += client.forwarded
    if preserve_host:
        headers.append(("Host", client.host))
    return headers


_DEFAULT_PORTS = {"http": 80, "https": 443}
# Response headers that carry URLs a client follows (issue #6, part 3).
_URL_HEADERS = frozenset({"location", "content-location"})
_LINK_URL = re.compile(r"<([^>]*)>")
_REALM = re.compile(r'(\brealm=")([^"]*)(")', re.IGNORECASE)


def client_response_headers(
    upstream_headers: Iterable[tuple[str, str]], *, upstream_url: str, client_base: str | None
) -> Headers:
    """Client response headers: the upstream's end-to-end ones, its own URLs moved to bloblo.

    URLs at the upstream's address in Location, Content-Location, Link and the realm of
    WWW-Authenticate become URLs at client_base (the scheme://host the client used), so upload
    sessions, pagination and token requests come back through bloblo. With client_base None
    (Host preserved) they pass unchanged.
    """
    headers = end_to_end(upstream_headers, _NOT_FORWARDED_DOWN)
    if client_base is None:
        return headers

    def rebase(url: str) -> str:
        return rebase_url(url, upstream_url, client_base)

    def moved(name: str, value: str) -> str:
        lowered = name.lower()
        if lowered in _URL_HEADERS:
            return rebase(value)
        if lowered == "link":
            return _LINK_URL.sub(lambda m: f"<{rebase(m.group(1))}>", value)
        if lowered == "www-authenticate":
            return _REALM.sub(lambda m: m.group(1) + rebase(m.group(2)) + m.group(3), value)
        return value

    return [(name, moved(name, value)) for name, value in headers]


def rebase_url(url: str, upstream_url: str, client_base: str) -> str:
    """url moved from under upstream_url to under client_base; any other URL unchanged.

    A URL under the upstream's https address keeps https, whatever scheme client_base has: a
    rewrite never downgrades (issue #6, part 4).
    """
    at = origin(url)
    if at is None or at != origin(upstream_url):
        return url
    parts, prefix = urlsplit(url), urlsplit(upstream_url).path
    if prefix and not (parts.path == prefix or parts.path.startswith(prefix + "/")):
        return url
    rest = url[len(parts.scheme) + len("://") + len(parts.netloc) + len(prefix) :]
    if at[0] == "https" and client_base.startswith("http://"):
        client_base = "https://" + client_base[len("http://") :]
    return client_base + rest


def origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an absolute http(s) URL, lowercased, default port filled in;
    None for any other URL, or one whose port is malformed."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if not parts.hostname or scheme not in _DEFAULT_PORTS:
        return None
    return scheme, parts.hostname.lower(), port or _DEFAULT_PORTS[scheme]
