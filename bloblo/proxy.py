"""The /v2/ catch-all: registry API calls go upstream; blob GETs go through the blob policy."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import requests
from flask import Blueprint, Request, Response, request

from . import headers
from .config import Settings
from .errors import AbortResponse
from .names import parse_blob_path
from .upstream import Upstream, release

LOG = logging.getLogger(__name__)

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
CHUNK = 1024 * 1024  # large reads: a quarter of the CPU per byte of 64 KiB ones
Body = Iterator[bytes]


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
    ) -> requests.Response:
        """Send the client's request upstream (optionally another method, target or no body).

        Headers named in drop (lowercase) are left out. Returns the response, body unread.
        """
        client_headers = [(n, v) for n, v in req.headers.items() if n.lower() not in drop]
        upstream_headers = headers.upstream_request_headers(
            client_headers,
            client_host=req.host,
            client_scheme=req.scheme,
            client_addr=req.remote_addr,
            preserve_host=self._settings.preserve_host,
        )
        data, length = request_body(req) if body else (None, None)
        return self._upstream.send(
            method or req.method, target or raw_target(req), upstream_headers, data, length
        )

    def respond(
        self, req: Request, upstream: requests.Response, body: Callable[[], Body] | None = None
    ) -> Response:
        """The client's response: the upstream's status and headers, and body() or its raw bytes."""
        client_base = None if self._settings.preserve_host else f"{req.scheme}://{req.host}"
        response_headers = headers.client_response_headers(
            upstream.raw.headers.items(), upstream_url=self._upstream.url, client_base=client_base
        )
        stream = body() if body else raw_body(upstream)
        response = Response(stream, status=upstream.status_code, headers=response_headers)
        if not any(name.lower() == "content-type" for name, _ in response_headers):
            del response.headers["Content-Type"]  # Flask adds text/html by default
        response.call_on_close(lambda: release(upstream))  # also when the body never started
        return response

    def forward(self, req: Request) -> Response:
        """Pass the request through to the upstream and its answer back to the client."""
        return self.respond(req, self.call(req))


def raw_target(req: Request) -> str:
    """The request target exactly as the client sent it (upload _state tokens are signed)."""
    raw = req.environ.get("RAW_URI") or req.environ.get("REQUEST_URI")
    if raw and raw.startswith("/"):
        return raw
    query = req.query_string.decode("latin-1")
    return req.full_path if query else req.path  # development server: rebuilt, not raw


def raw_body(upstream: requests.Response) -> Body:
    """The upstream's body as sent: not decoded, not buffered. Cut short if the upstream fails."""
    try:
        yield from upstream.raw.stream(CHUNK, decode_content=False)
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
    return iter(lambda: req.stream.read(CHUNK), b""), length


def create_blueprint(
    forwarder: Forwarder, blob_get: Callable[[Request, object], Response]
) -> Blueprint:
    """The /v2/ routes: blob GETs go to blob_get, everything else to the forwarder."""
    blueprint = Blueprint("proxy", __name__)

    @blueprint.route("/v2/", defaults={"rest": ""}, methods=METHODS)
    @blueprint.route("/v2/<path:rest>", methods=METHODS)
    def v2(rest: str) -> Response:
        """Any registry API call."""
        blob = parse_blob_path(rest) if request.method == "GET" else None
        if blob is not None:
            return blob_get(request, blob)
        return forwarder.forward(request)

    @blueprint.route("/healthz")
    def healthz() -> Response:
        """Liveness: the process is up and serving."""
        return Response("ok\n", mimetype="text/plain")

    return blueprint
