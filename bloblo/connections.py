"""How long a client's connection may hold a worker without moving (issue #14 §2): each piece of
an answer (up to 1 MiB) must be taken within BLOBLO_CLIENT_STALL_SECONDS. So no slow or stalled
client holds a worker's connection slot, an upstream or S3 connection, or a fill's spool for
ever.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable


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
