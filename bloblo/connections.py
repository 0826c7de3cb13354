"""How long a client's connection may hold a worker without moving (issue #14 §2): each piece of
an answer (up to 1 MiB) must be taken within BLOBLO_CLIENT_STALL_SECONDS, and on bloblo's HTTPS
port the TLS handshake must end within gunicorn's keep-alive, as the request head must after it
(gunicorn bounds that itself). So no slow, stalled or slowloris client holds a worker's
connection slot, an upstream or S3 connection, or a fill's spool for ever.

Loaded by path from gunicorn.conf.py in the master (the handshake's bound): it imports only the
standard library, never the bloblo package, requests or boto3 (see config.py for why).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

LOG = logging.getLogger("gunicorn.error")


class StallLimit:
    """WSGI middleware: from the moment an answer starts until it is closed, sending to the
    client (gunicorn's socket) times out after `seconds` for each piece of the body; then the
    socket's own timeout is back, so that a kept-alive connection waits for its next request
    as gunicorn has it wait. gunicorn closes a connection whose send timed out."""

    def __init__(self, app: Callable, seconds: float):
        self._app = app
        self._seconds = seconds

    def __call__(self, environ: dict, start_response: Callable):
        client_socket = environ.get("gunicorn.socket")
        if client_socket is None:  # not gunicorn: nothing to bound
            return self._app(environ, start_response)
        previous = client_socket.gettimeout()

        def start(status, headers, exc_info=None):
            client_socket.settimeout(self._seconds)
            return start_response(status, headers, exc_info)

        def restore() -> None:
            client_socket.settimeout(previous)

        try:
            body = self._app(environ, start)
        except BaseException:
            restore()
            raise
        return _ThenClose(body, restore)


class _ThenClose:
    """An answer's body as it is; closing it closes the body, then calls `then`."""

    def __init__(self, body: Iterable[bytes], then: Callable[[], None]):
        self._body = body
        self._then = then

    def __iter__(self):
        return iter(self._body)

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._then()


def bounded_handshakes(context, seconds: float):
    """gunicorn's server SSLContext, whose wrap_socket ends the TLS handshake within `seconds`
    or ends the connection (a line in the log, never a traceback). gunicorn's gevent worker
    has every accepted connection wrapped there, with no time limit of its own: a client that
    never sends its ClientHello would hold a worker's connection slot for ever."""
    return _BoundedHandshakes(context, seconds)


class _BoundedHandshakes:
    """An SSLContext (everything but wrap_socket is the context's own)."""

    def __init__(self, context, seconds: float):
        self._context = context
        self._seconds = seconds

    def wrap_socket(self, sock, *args, **kwargs):
        previous, peer = sock.gettimeout(), _peer(sock)  # the wrapping detaches sock
        sock.settimeout(self._seconds)
        try:
            wrapped = self._context.wrap_socket(sock, *args, **kwargs)  # the handshake
        except OSError as exc:  # timed out, reset, or no TLS at all (ssl.SSLError)
            from gevent import GreenletExit  # in a worker: gevent is there, and ends quietly

            _log_failed_handshake(peer, exc)
            raise GreenletExit from None  # gevent's server then closes the connection
        wrapped.settimeout(previous)
        return wrapped

    def __getattr__(self, name: str):
        return getattr(self._context, name)


def _peer(sock) -> str:
    try:
        address = sock.getpeername()
    except OSError:  # gone already
        return "a client"
    return address[0] if isinstance(address, tuple) else "a client"


def _log_failed_handshake(peer: str, exc: OSError) -> None:
    """One line, never a traceback: at DEBUG for a client that did not finish in time (a
    slowloris one would flood the log), at INFO for one that spoke no TLS or hung up."""
    if isinstance(exc, TimeoutError):
        LOG.debug("TLS handshake from %s not finished in time: connection closed", peer)
    else:
        LOG.info("TLS handshake from %s failed: %s", peer, exc)
