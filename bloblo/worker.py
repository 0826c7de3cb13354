"""gunicorn's gevent worker, answering what gunicorn refuses itself in the registry's format.

gunicorn refuses a request it cannot take before bloblo sees it: a malformed request line or
header, a control character in a header value, a Content-Length that is negative, not a number
or given twice, a request line or header field beyond limit_request_line or
limit_request_field_size, more than limit_request_fields fields. Its answer is an HTML page;
this worker keeps gunicorn's decision, status, log and access lines, and sends a registry JSON
error instead (issue #14 §3). What gunicorn repeats of the refused request, in its log line and
in the answer, never includes a query or a line that is no header (either may hold a
credential).

Loaded by path from gunicorn.conf.py in the master: it imports only the standard library and
gunicorn (whose gevent worker gunicorn imports there anyway), never the bloblo package.
"""

from __future__ import annotations

import json
import re

from gunicorn import util
from gunicorn.http.errors import InvalidHeader, InvalidRequestLine
from gunicorn.workers.ggevent import GeventWorker

API_VERSION = "registry/2.0"
# Registry error codes for the statuses gunicorn answers itself; any other is a 500.
_CODES = {
    400: "REQUEST_INVALID",
    403: "DENIED",
    414: "REQUEST_TOO_LARGE",
    417: "UNSUPPORTED",
    431: "REQUEST_TOO_LARGE",
    501: "UNSUPPORTED",
}
_QUERY = re.compile(r"\?\S*")
_HEADER_NAME = re.compile(r"[-!#$%&'*+.^_`|~0-9A-Z]+")  # as gunicorn reports one: upper case
_OWN_WORDS = frozenset({"bare LF as line terminator"})  # gunicorn's, not the request's


class JsonErrorsWorker(GeventWorker):
    """gunicorn's gevent worker whose own error answers are registry JSON errors."""

    def handle_error(self, req, client, addr, exc):
        """Log and count the request as gunicorn does, and answer with the status gunicorn
        chose, in the registry's JSON format."""
        exc = _told_safely(exc)
        page = _StatusLine(client)
        super().handle_error(req, page, addr, exc)
        if page.status is None:  # gunicorn sent nothing
            return
        try:
            util.write_nonblock(client, self.json_error(page.status, page.reason, exc))
        except Exception:
            self.log.debug("Failed to send error message.")

    def json_error(self, status: int, reason: str, exc: BaseException) -> bytes:
        """The whole HTTP response: {"errors": [{"code", "message", "detail"}]}."""
        code = _CODES.get(status)
        if code is None:
            code, message = "UNKNOWN", "internal error in bloblo; see its log"
        else:
            message = self._refusal(status, exc)
        detail = {"status": status, "reason": reason}
        body = json.dumps({"errors": [{"code": code, "message": message, "detail": detail}]})
        head = (
            f"HTTP/1.1 {status} {reason}\r\n"
            "Connection: close\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"Docker-Distribution-API-Version: {API_VERSION}\r\n"
            "\r\n"
        )
        return (head + body).encode("latin-1")  # json.dumps writes ASCII

    def _refusal(self, status: int, exc: BaseException) -> str:
        cfg = self.cfg
        if status == 414:
            return f"the request line is longer than {cfg.limit_request_line} bytes"
        if status == 431:
            return (
                f"a header field is longer than {cfg.limit_request_field_size} bytes, or the "
                f"request has more than {cfg.limit_request_fields} header fields"
            )
        return f"the request is not valid HTTP/1.1: {exc}"


class _StatusLine:
    """Stands for the client's socket while gunicorn writes its error page: it keeps the
    status and reason of the page and sends nothing."""

    def __init__(self, sock):
        self._sock = sock
        self.status: int | None = None
        self.reason = ""

    def __getattr__(self, name: str):
        return getattr(self._sock, name)

    def sendall(self, data: bytes) -> None:
        """Keep the status line of what gunicorn would send."""
        line = data.split(b"\r\n", 1)[0].decode("latin-1")
        _, status, self.reason = (line.split(" ", 2) + [""])[:3]
        self.status = int(status)


def _told_safely(exc: BaseException) -> BaseException:
    """exc, or the same refusal without what it repeats of the request that may be secret: the
    query of a request line, a header line without ':' (gunicorn names a header it refuses by
    its upper-cased name; a line it cannot split is repeated whole)."""
    # The classes themselves: InvalidResponseHeader, a header bloblo answered, is a subclass.
    if type(exc) is InvalidRequestLine and isinstance(exc.req, str):
        return InvalidRequestLine(_QUERY.sub("?<query>", exc.req))
    said = str(exc.hdr) if type(exc) is InvalidHeader else ""
    if said and not (_HEADER_NAME.fullmatch(said) or said in _OWN_WORDS):
        return InvalidHeader("<a line that is not name: value>", req=exc.req)
    return exc
