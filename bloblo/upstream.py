"""The HTTP connection to the upstream registry: one connection pool per worker."""

from __future__ import annotations

import http.client
import logging
import re
from collections.abc import Callable, Iterable
from urllib.parse import urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ProtocolError, ReadTimeoutError
from urllib3.util.retry import Retry

from . import metrics
from .config import Settings
from .errors import UpstreamTimeout, UpstreamUnavailable
from .headers import origin

LOG = logging.getLogger(__name__)

# A header the connection takes as the request target instead of sending it: urllib3 re-quotes
# the target it is given (`%2f` becomes `%2F`, `|` becomes `%7C`); the client's bytes must reach
# the registry as sent (issue #6, part 3).
RAW_TARGET = "X-Bloblo-Raw-Target"
# What a fill asks of the upstream, and what it follows (issues #6 and #7): the blob's plain
# bytes, through redirects that stay at the upstream, at most MAX_SAME_ORIGIN_HOPS of them.
IDENTITY = [("Accept-Encoding", "identity")]
REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_SAME_ORIGIN_HOPS = 3
# Requests sent again when a kept-alive connection turns out closed (issue #13, item 7).
IDEMPOTENT = frozenset({"GET", "HEAD"})


class DroppedWhenIdle(ConnectionResetError):
    """The upstream closed a kept-alive connection before any byte of the answer to a GET or
    HEAD without a body: its idle timer and the request crossed. Safe to send again."""


# In the upstream's header section, what RFC 9110 §5.5 and RFC 9112 §2.2 let a recipient replace
# with SP: a bare CR (http.client would end the line there, and a value holding "\rX-Header: v"
# would reach the client as two header lines), NUL and the other control characters but HTAB
# (gunicorn refuses to send them: the client would get a 500).
_CONTROLS = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def _clean_line(line: bytes) -> bytes:
    """A line of a header section with its control characters replaced with SP; its line end
    (CRLF, or a bare LF) kept."""
    end = b"\r\n" if line.endswith(b"\r\n") else b"\n" if line.endswith(b"\n") else b""
    return _CONTROLS.sub(b" ", line[: len(line) - len(end)]) + end


class _HeaderSection:
    """The connection's socket file while http.client reads the status line and headers."""

    def __init__(self, fp):
        self._fp = fp

    def readline(self, limit: int = -1) -> bytes:
        """The next line, cleaned (_clean_line)."""
        return _clean_line(self._fp.readline(limit))

    def __getattr__(self, name: str):
        return getattr(self._fp, name)


class UpstreamResponse(http.client.HTTPResponse):
    """http.client's response, whose header lines are exactly the upstream's lines, each value
    cleaned of control characters (issue #14 §3). The body is read untouched."""

    def begin(self):
        body = self.fp
        self.fp = _HeaderSection(body)
        try:
            super().begin()
        finally:
            if self.fp is not None:
                self.fp = body


def _raw_target_request(connection_class):
    class RawTarget(connection_class):
        response_class = UpstreamResponse
        answered = 0  # responses the open socket has carried: more than none means reused
        _resendable = False

        def close(self):
            self.answered = 0  # the next socket (urllib3 may reconnect this object) is new
            super().close()

        def request(self, method, url, body=None, headers=None, **kwargs):
            if headers is not None:  # a copy: a retry sends the same headers again
                headers = headers.copy()
                url = headers.pop(RAW_TARGET, None) or url
            self._resendable = method in IDEMPOTENT and body is None and self.answered > 0
            super().request(method, url, body, headers, **kwargs)

        def getresponse(self, *args, **kwargs):
            try:
                response = super().getresponse(*args, **kwargs)
            except (ConnectionResetError, BrokenPipeError) as exc:  # also RemoteDisconnected
                if self._resendable:
                    raise DroppedWhenIdle(*exc.args) from exc
                raise
            self.answered += 1
            return response

    RawTarget.__name__ = f"RawTarget{connection_class.__name__}"
    return RawTarget


class _RetryDroppedWhenIdle(Retry):
    """urllib3's retries, letting through only a DroppedWhenIdle: any other error is raised as
    it would be without retries (read errors as they are, the rest as MaxRetryError)."""

    def increment(self, method=None, url=None, response=None, error=None, **kwargs):
        cause = error.args[-1] if isinstance(error, ProtocolError) and error.args else None
        if isinstance(error, (ReadTimeoutError, ProtocolError)) and not isinstance(
            cause, DroppedWhenIdle
        ):
            raise error  # a read timeout above all: sending again would double the wait
        return super().increment(method, url, response, error, **kwargs)


# One more try of a GET or HEAD without a body that met a kept-alive connection the upstream
# had closed (issue #13, item 7); never a request with a body, a timeout, or a status.
RETRY_DROPPED_WHEN_IDLE = _RetryDroppedWhenIdle(
    total=1,
    connect=0,
    read=1,
    other=0,
    status=0,
    redirect=False,
    allowed_methods=IDEMPOTENT,
    respect_retry_after_header=False,  # a 503 with Retry-After is the registry's answer
    raise_on_status=False,
)


class _RawTargetPool(HTTPConnectionPool):
    ConnectionCls = _raw_target_request(HTTPConnection)


class _RawTargetTLSPool(HTTPSConnectionPool):
    ConnectionCls = _raw_target_request(HTTPSConnection)


class _RawTargetAdapter(HTTPAdapter):
    """requests' bare adapter whose connections send the request target byte for byte."""

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _RawTargetPool,
            "https": _RawTargetTLSPool,
        }


class Upstream:
    """Sends requests to the upstream registry exactly as given, and never follows redirects."""

    def __init__(self, settings: Settings, pool_size: int = 256):
        self.url = settings.upstream_url
        self._timeout = (settings.upstream_connect_timeout, settings.upstream_read_timeout)
        # The bare adapter, not a Session: a Session would keep one client's cookies for the
        # next, read ~/.netrc and proxy settings, and consume redirect bodies even when told
        # not to follow them.
        self._adapter = _RawTargetAdapter(
            pool_connections=4, pool_maxsize=pool_size, max_retries=RETRY_DROPPED_WHEN_IDLE
        )
        self._origin = origin(self.url)
        self._prefix = urlsplit(self.url).path  # an upstream URL may have a path

    def send(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: Iterable[bytes] | None = None,
        content_length: int | None = None,
        timeout: float | None = None,
    ) -> requests.Response:
        """Send `method target` upstream and return the response with its body unread.

        target is the request path and query, passed byte for byte. A body with a known
        content_length is sent as is, one without as chunked. timeout (seconds) replaces the
        configured connect and read timeouts. Raises UpstreamUnavailable when the registry
        cannot be reached and UpstreamTimeout when it does not answer in time.
        """
        prepared = requests.Request(method, self.url, data=body).prepare()
        prepared.url = self.url + "/"  # where to connect: the target itself goes raw, below
        prepared.headers.clear()
        for name, value in headers:
            if name in prepared.headers:  # repeated header: one comma-joined line (RFC 9110 5.3)
                prepared.headers[name] += ", " + value
            else:
                prepared.headers[name] = value
        prepared.headers[RAW_TARGET] = self._prefix + target  # replaces any a client sent
        if content_length is not None:  # never Transfer-Encoding and Content-Length together
            prepared.headers["Content-Length"] = str(content_length)
        elif body is not None:
            prepared.headers["Transfer-Encoding"] = "chunked"
        try:
            with metrics.UPSTREAM_DURATION.labels(method).time():
                answer = self._adapter.send(prepared, stream=True, timeout=timeout or self._timeout)
        except (requests.ConnectTimeout, requests.ReadTimeout) as exc:
            metrics.UPSTREAM_REQUESTS.labels(method, "timeout").inc()
            LOG.warning(
                "upstream %s timed out on %s %s: %s", self.url, method, _path(target), _reason(exc)
            )
            raise UpstreamTimeout("the upstream registry did not answer in time") from None
        except requests.RequestException as exc:
            metrics.UPSTREAM_REQUESTS.labels(method, "unreachable").inc()
            LOG.warning(
                "upstream %s unreachable on %s %s: %s",
                self.url,
                method,
                _path(target),
                _reason(exc),
            )
            raise UpstreamUnavailable("the upstream registry cannot be reached") from None
        metrics.UPSTREAM_REQUESTS.labels(method, str(answer.status_code)).inc()
        return answer

    def follow(self, send: Callable[[str], requests.Response], target: str) -> requests.Response:
        """send(target)'s final answer, following the redirects that stay at the upstream
        (same_origin_target) with send, at most MAX_SAME_ORIGIN_HOPS of them; a redirect
        elsewhere, or one hop too many, is the answer returned. The fills of the proxy and
        of `bloblo warm` both follow this way (issues #6, #7)."""
        for hop in range(MAX_SAME_ORIGIN_HOPS + 1):
            answer = send(target)
            location = answer.headers.get("Location")
            if answer.status_code not in REDIRECTS or location is None:
                return answer
            following = self.same_origin_target(location, target)
            if following is None or hop == MAX_SAME_ORIGIN_HOPS:
                return answer
            release(answer)
            target = following
        raise AssertionError("unreachable")

    def same_origin_target(self, location: str, base_target: str) -> str | None:
        """The request target a Location leads to when it stays at the upstream, else None.

        location may be relative (resolved against base_target) or absolute; it stays at the
        upstream when scheme, host and port are the upstream's and the path is under its URL.
        """
        absolute = urljoin(self.url + base_target, location)
        if origin(absolute) != self._origin:
            return None
        parts = urlsplit(absolute)
        if not parts.path.startswith(self._prefix + "/"):
            return None
        target = parts.path[len(self._prefix) :]
        return f"{target}?{parts.query}" if parts.query else target


def release(response: requests.Response) -> None:
    """Done with a response: its connection goes back to the pool if the body was read to the
    end, and is closed otherwise (a client that left mid-blob must not leave it half-read).

    Safe to call more than once. requests' own close() would always close the connection.
    """
    raw = response.raw
    if raw.closed:
        raw.release_conn()
    elif raw.length_remaining == 0:  # e.g. a HEAD: read the empty rest, or the connection
        raw.drain_conn()  # could not carry the next request
    else:
        response.close()


def plain_length(answer: requests.Response, known_size: int | None = None) -> int | None:
    """The length in bytes of a 200 that carries a blob's plain bytes (no Content-Encoding),
    else None: only such an answer can be verified and cached.

    The length is the answer's Content-Length or, when it has none (a chunked body, as some
    registries send blobs: containerd#5124), known_size (the blob's size learnt elsewhere, e.g.
    from the authorizing HEAD; issue #13 §6). The fill then checks that the body is exactly
    that long. A malformed Content-Length is never replaced by known_size.
    """
    encoding = answer.headers.get("Content-Encoding", "identity").strip().lower()
    if answer.status_code != 200 or encoding != "identity":
        return None
    length = answer.headers.get("Content-Length")
    if length is None:
        return known_size
    return int(length) if length.isascii() and length.isdigit() else None


def _reason(exc: requests.RequestException) -> object:
    """What went wrong, without the request URL (its query may carry signed upload state)."""
    inner = exc.args[0] if exc.args else exc
    return getattr(inner, "reason", inner)


def _path(target: str) -> str:
    """The path of a request target, for logs: query strings may carry signed upload state."""
    return target.split("?", 1)[0]
