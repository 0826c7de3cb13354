"""The catch-all: every request goes upstream, blob GETs through the blob policy.

bloblo's own endpoints (health.py) are registered before this catch-all and never forwarded;
every other path is the registry's (issue #6, part 3: token realms and blob redirects live
outside /v2/).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

import requests
from flask import Blueprint, Request, Response, request
from werkzeug.routing import PathConverter

from . import headers, metrics, targets
from .clients import ENVIRON_KEY, Client
from .config import Settings
from .errors import AbortResponse, SizeInvalid
from .loop import cooperative
from .upstream import Upstream, release

LOG = logging.getLogger(__name__)

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
CHUNK = 1024 * 1024  # large reads: a quarter of the CPU per byte of 64 KiB ones
Body = Iterator[bytes]
# The longest body a registry takes: Go's net/http (distribution, Harbor, ...) refuses a
# Content-Length beyond a signed 64-bit integer (issue #14 §3).
MAX_CONTENT_LENGTH = 2**63 - 1


class Forwarder:
    """Forwards a client's request upstream and streams the answer back, byte for byte."""

    def __init__(self, settings: Settings, upstream: Upstream):
        self._settings = settings
        self._upstream = upstream

    def call(
        self,
        req: Request,
        method: str | None = None,
        target: str | None = None,
        body: bool = True,
        drop: frozenset[str] = frozenset(),
        add: headers.Headers = (),
    ) -> requests.Response:
        """Send the client's request upstream (optionally another method, target or no body).

        Headers named in drop (lowercase) are left out, those in add are added. Returns the
        response, body unread. Raises UpstreamUnavailable or UpstreamTimeout.
        """
        upstream_headers = self.upstream_headers(req, drop, add)
        data, length = request_body(req) if body else (None, None)
        return self._upstream.send(
            method or req.method, target or raw_target(req), upstream_headers, data, length
        )

    def upstream_headers(
        self, req: Request, drop: frozenset[str] = frozenset(), add: headers.Headers = ()
    ) -> headers.Headers:
        """The headers the client's request carries upstream (drop: lowercase names left out)."""
        client_headers = [(n, v) for n, v in req.headers.items() if n.lower() not in drop]
        return headers.upstream_request_headers(
            [*client_headers, *add], client_of(req), preserve_host=self._settings.preserve_host
        )

    def respond(
        self, req: Request, upstream: requests.Response, on_bytes: Callable[[int], None] = None
    ) -> Response:
        """The client's response: the upstream's status, headers and raw bytes (on_bytes is
        told the size of each chunk sent)."""
        body = raw_body(upstream)
        if on_bytes is not None:
            body = metrics.count_body(body, on_bytes)
        response = self.answer(req, upstream.status_code, upstream.raw.headers.items(), body)
        response.call_on_close(lambda: release(upstream))  # also when the body never started
        return response

    def answer(
        self,
        req: Request,
        status: int,
        upstream_headers: Iterable[tuple[str, str]],
        body: Iterable[bytes],
    ) -> Response:
        """A response to the client with the upstream's headers (URLs moved to bloblo)."""
        client_base = None if self._settings.preserve_host else client_of(req).base_url
        response_headers = headers.client_response_headers(
            upstream_headers, upstream_url=self._upstream.url, client_base=client_base
        )
        response = Response(body, status=status, headers=response_headers)
        if not any(name.lower() == "content-type" for name, _ in response_headers):
            del response.headers["Content-Type"]  # Flask adds text/html by default
        return response

    def forward(self, req: Request) -> Response:
        """Pass the request through to the upstream and its answer back to the client."""
        return self.respond(req, self.call(req))


def client_of(req: Request) -> Client:
    """The client behind req (clients.ClientMiddleware put it there)."""
    return req.environ[ENVIRON_KEY]


def raw_target(req: Request) -> str:
    """The request target exactly as the client sent it (upload _state tokens are signed).

    Also when it is no path: an absolute-form target (`http://host/v2/...`) is returned as sent,
    for targets.check_target to refuse, never rebuilt from the path the server decoded (where a
    %2F would be a slash and a %3F a query; issue #13, item 5).
    """
    raw = req.environ.get("RAW_URI") or req.environ.get("REQUEST_URI")
    if raw:
        return raw
    query = req.query_string.decode("latin-1")
    return req.full_path if query else req.path  # development server: rebuilt, not raw


def raw_body(upstream: requests.Response) -> Body:
    """The upstream's body as sent: not decoded, not buffered. Cut short if the upstream fails."""
    try:
        yield from cooperative(upstream.raw.stream(CHUNK, decode_content=False))
    except Exception as exc:  # urllib3's ProtocolError, timeouts, resets
        LOG.warning("upstream body broke off: %s", exc)
        raise AbortResponse("upstream body broke off") from None
    finally:
        release(upstream)


def request_body(req: Request) -> tuple[Body | None, int | None]:
    """The client's body as chunks, and its length (None when it comes chunked)."""
    length = req.content_length
    if length is None and "chunked" not in req.headers.get("Transfer-Encoding", "").lower():
        return None, None  # no body at all
    if length == 0:
        return None, 0
    return cooperative(iter(lambda: req.stream.read(CHUNK), b"")), length


def refuse_oversized_content_length() -> None:
    """Refuse a request whose Content-Length no registry takes (more than MAX_CONTENT_LENGTH
    bytes) with SizeInvalid, before anything reaches the upstream (issue #14 §3). gunicorn
    refused the malformed ones already: negative, not a number, given twice."""
    length = request.content_length
    if length is not None and length > MAX_CONTENT_LENGTH:
        raise SizeInvalid(f"Content-Length is more than {MAX_CONTENT_LENGTH} bytes")


class AnyPath(PathConverter):
    """Werkzeug's path converter, also across a percent-encoded line feed (%0a), which its `.`
    does not match: such a path is the registry's to answer, not a 404 of bloblo's."""

    regex = f"(?s:{PathConverter.regex})"


def create_blueprint(
    forwarder: Forwarder, blob_get: Callable[[Request, object], Response]
) -> Blueprint:
    """The catch-all: blob GETs go to blob_get, the rest upstream.

    Every request target is checked first (targets.route): a hostile one is answered with a
    registry error and reaches neither the upstream nor S3.
    """
    blueprint = Blueprint("proxy", __name__)
    blueprint.record_once(lambda state: state.app.url_map.converters.update(anypath=AnyPath))

    @blueprint.route("/", defaults={"rest": ""}, methods=METHODS, provide_automatic_options=False)
    @blueprint.route("/<anypath:rest>", methods=METHODS, provide_automatic_options=False)
    def upstream(rest: str) -> Response:
        """Any other request: the registry's API, its token realm, its redirects."""
        route = targets.route(raw_target(request), request.method)
        if route.blob is not None:
            return blob_get(request, route.blob)
        return forwarder.forward(request)

    return blueprint
