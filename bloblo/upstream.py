"""The HTTP connection to the upstream registry: one connection pool per worker."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import requests
from requests.adapters import HTTPAdapter

from .config import Settings
from .errors import UpstreamTimeout, UpstreamUnavailable

LOG = logging.getLogger(__name__)


class Upstream:
    """Sends requests to the upstream registry exactly as given, and never follows redirects."""

    def __init__(self, settings: Settings, pool_size: int = 256):
        self.url = settings.upstream_url
        self._timeout = (settings.upstream_connect_timeout, settings.upstream_read_timeout)
        # The bare adapter, not a Session: a Session would keep one client's cookies for the
        # next, read ~/.netrc and proxy settings, and consume redirect bodies even when told
        # not to follow them.
        self._adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_size, max_retries=0)

    def send(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: Iterable[bytes] | None = None,
        content_length: int | None = None,
    ) -> requests.Response:
        """Send `method target` upstream and return the response with its body unread.

        target is the request path and query, passed byte for byte. A body with a known
        content_length is sent as is, one without as chunked. Raises UpstreamUnavailable when
        the registry cannot be reached and UpstreamTimeout when it does not answer in time.
        """
        prepared = requests.Request(method, self.url, data=body).prepare()
        # Set after prepare(): requests would re-quote the path; it must stay the client's bytes.
        prepared.url = self.url + target
        prepared.headers.clear()
        for name, value in headers:
            if name in prepared.headers:  # repeated header: one comma-joined line (RFC 9110 5.3)
                prepared.headers[name] += ", " + value
            else:
                prepared.headers[name] = value
        if content_length is not None:  # never Transfer-Encoding and Content-Length together
            prepared.headers["Content-Length"] = str(content_length)
        elif body is not None:
            prepared.headers["Transfer-Encoding"] = "chunked"
        try:
            return self._adapter.send(prepared, stream=True, timeout=self._timeout)
        except (requests.ConnectTimeout, requests.ReadTimeout) as exc:
            LOG.warning(
                "upstream %s timed out on %s %s: %s", self.url, method, _path(target), _reason(exc)
            )
            raise UpstreamTimeout(
                f"the upstream registry did not answer in time ({self.url})"
            ) from None
        except requests.RequestException as exc:
            LOG.warning(
                "upstream %s unreachable on %s %s: %s",
                self.url,
                method,
                _path(target),
                _reason(exc),
            )
            raise UpstreamUnavailable(
                f"the upstream registry cannot be reached ({self.url})"
            ) from None


def release(response: requests.Response) -> None:
    """Done with a response: its connection goes back to the pool if the body was read to the
    end, and is closed otherwise (a client that left mid-blob must not leave it half-read).

    Safe to call more than once. requests' own close() would always close the connection.
    """
    raw = response.raw
    if raw.length_remaining == 0 or raw.closed:
        raw.release_conn()
    else:
        response.close()


def _reason(exc: requests.RequestException) -> object:
    """What went wrong, without the request URL (its query may carry signed upload state)."""
    inner = exc.args[0] if exc.args else exc
    return getattr(inner, "reason", inner)


def _path(target: str) -> str:
    """The path of a request target, for logs: query strings may carry signed upload state."""
    return target.split("?", 1)[0]
