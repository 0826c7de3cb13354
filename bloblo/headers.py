"""Which headers cross the proxy, in each direction (RFC 9110 section 7.6.1)."""

from __future__ import annotations

from collections.abc import Iterable

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
    client_headers: Iterable[tuple[str, str]],
    *,
    client_host: str,
    client_scheme: str,
    client_addr: str | None,
    preserve_host: bool,
) -> Headers:
    """Upstream request headers: the client's own (Authorization untouched) plus X-Forwarded-*.

    With preserve_host the client's Host goes upstream; otherwise the HTTP client sets the
    upstream's Host and X-Forwarded-Host tells the registry the address the client used.
    """
    headers = end_to_end(client_headers, _NOT_FORWARDED_UP)
    forwarded_for = [value for name, value in headers if name.lower() == "x-forwarded-for"]
    headers = [(n, v) for n, v in headers if not n.lower().startswith("x-forwarded-")] + [
        ("X-Forwarded-Proto", client_scheme),
        ("X-Forwarded-Host", client_host),
    ]
    if client_addr:
        headers.append(("X-Forwarded-For", ", ".join([*forwarded_for, client_addr])))
    if preserve_host:
        headers.append(("Host", client_host))
    return headers


def client_response_headers(
    upstream_headers: Iterable[tuple[str, str]], *, upstream_url: str, client_base: str | None
) -> Headers:
    """Client response headers: the upstream's end-to-end ones, Location moved to the client's.

    An absolute Location under the upstream's URL becomes one under client_base (the
    scheme://host the client used), so upload sessions continue through bloblo. With
    client_base None (Host preserved) Location is passed on unchanged.
    """
    headers = end_to_end(upstream_headers, _NOT_FORWARDED_DOWN)
    if client_base is None:
        return headers
    return [
        (
            name,
            rebase_location(value, upstream_url, client_base)
            if name.lower() == "location"
            else value,
        )
        for name, value in headers
    ]


def rebase_location(location: str, upstream_url: str, client_base: str) -> str:
    """location with the upstream_url prefix replaced by client_base; other URLs unchanged."""
    if location.lower().startswith(upstream_url.lower() + "/"):
        return client_base + location[len(upstream_url) :]
    return location
