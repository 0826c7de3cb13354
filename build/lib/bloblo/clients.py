"""Who the client is: its address, scheme and host, seen through trusted load balancers.

A load balancer in front of bloblo terminates TLS and says so in X-Forwarded-* headers. Those
are believed only from peers in BLOBLO_TRUSTED_PROXIES (issue #6, part 4); from any other peer
every X-Forwarded-* and Forwarded header is dropped and bloblo describes the connection itself.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from .config import Network

Headers = list[tuple[str, str]]
ENVIRON_KEY = "bloblo.client"


@dataclass(frozen=True)
class Client:
    """The client behind a request, and the forwarding headers that describe it upstream."""

    address: str  # the first untrusted address of the chain, read from the right
    scheme: str  # the scheme the client used: http or https
    host: str  # the Host the client used
    forwarded: Headers  # X-Forwarded-Proto/-Host/-For (and a trusted peer's others) for upstream

    @property
    def base_url(self) -> str:
        """scheme://host the client used, for URLs handed back to it."""
        return f"{self.scheme}://{self.host}"


def is_forwarding_header(name: str) -> bool:
    """Whether a header carries forwarding information (X-Forwarded-*, Forwarded)."""
    lowered = name.lower()
    return lowered == "forwarded" or lowered.startswith("x-forwarded-")


def in_networks(address: str | None, networks: Sequence[Network]) -> bool:
    """Whether address is an IP address inside one of networks (False when it is no address)."""
    try:
        ip = ipaddress.ip_address((address or "").strip().strip("[]"))
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:  # a dual-stack listener
        ip = ip.ipv4_mapped
    return any(ip in network for network in networks)


def identify(
    peer: str,
    scheme: str,
    host: str,
    headers: Iterable[tuple[str, str]],
    trusted: Sequence[Network],
) -> Client:
    """The client of a request that arrived from TCP peer over scheme with this Host header.

    When peer is trusted, its X-Forwarded-Proto/-Host describe the client (the first value of
    each; a scheme other than http or https counts as absent), its X-Forwarded-For chain is
    extended with peer and its other forwarding headers pass; otherwise all of them are ignored.
    The client address is the first untrusted address reading the chain from the right, or its
    leftmost when every address is trusted (issue #6, part 4).
    """
    if not in_networks(peer, trusted):
        forwarded = [
            ("X-Forwarded-Proto", scheme),
            ("X-Forwarded-Host", host),
            ("X-Forwarded-For", peer),
        ]
        return Client(peer, scheme, host, forwarded)

    lines = [(name, value) for name, value in headers if is_forwarding_header(name)]
    proto = (_first(lines, "x-forwarded-proto") or "").lower()
    client_scheme = proto if proto in ("http", "https") else scheme
    client_host = _first(lines, "x-forwarded-host") or host
    chain = [
        hop.strip()
        for name, value in lines
        if name.lower() == "x-forwarded-for"
        for hop in value.split(",")
        if hop.strip()
    ] + [peer]
    described = {"x-forwarded-proto", "x-forwarded-host", "x-forwarded-for"}
    forwarded = [(n, v) for n, v in lines if n.lower() not in described] + [
        ("X-Forwarded-Proto", client_scheme),
        ("X-Forwarded-Host", client_host),
        ("X-Forwarded-For", ", ".join(chain)),
    ]
    return Client(_client_address(chain, trusted), client_scheme, client_host, forwarded)


def _first(lines: Headers, name: str) -> str | None:
    for header, value in lines:
        if header.lower() == name:
            return value.split(",")[0].strip() or None
    return None


def _client_address(chain: list[str], trusted: Sequence[Network]) -> str:
    for address in reversed(chain):
        if not in_networks(address, trusted):
            return address
    return chain[0]


class ClientMiddleware:
    """WSGI middleware: puts the Client in the environ and makes REMOTE_ADDR its address, so
    the access log, authorization memory and BLOBLO_STREAM_NETWORKS all see the client."""

    def __init__(self, app: Callable, trusted: Sequence[Network]):
        self._app = app
        self._trusted = tuple(trusted)

    def __call__(self, environ: dict, start_response: Callable):
        headers = [
            (key[5:].replace("_", "-").title(), value)
            for key, value in environ.items()
            if key.startswith("HTTP_")
        ]
        peer = environ.get("REMOTE_ADDR") or ""
        client = identify(
            peer,
            environ.get("wsgi.url_scheme", "http"),
            environ.get("HTTP_HOST") or environ.get("SERVER_NAME", ""),
            headers,
            self._trusted,
        )
        environ[ENVIRON_KEY] = client
        environ["bloblo.peer"] = peer
        environ["REMOTE_ADDR"] = client.address
        return self._app(environ, start_response)
