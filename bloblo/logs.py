"""What bloblo's server log says: gunicorn's logger, as text or one JSON object per line, with one
access line per request and the noise an operator should not chase named for what it is
(issue #8, part 5).

Loaded by path from gunicorn.conf.py in the master: it imports only the standard library,
gunicorn and python-json-logger, never the bloblo package (see config.py for why).
"""

from __future__ import annotations

import logging
import re
import sys

from gunicorn.glogging import Logger
from pythonjsonlogger.json import JsonFormatter

# skopeo and docker try HTTPS first on a plain-HTTP port: gunicorn reads their TLS ClientHello as
# a request line. Its bytes hold a line feed (then: "bare LF"), or start with 0x16 0x03.
_TLS_PROBE = re.compile(
    r"Invalid request from ip=(?P<ip>\S+): Invalid HTTP request line: "
    r"(?:'bare LF as line terminator'|'\\x16\\x03)"
)
# What gunicorn logs, with a traceback, when sending to a client timed out: bloblo's bound on a
# client that stopped taking its answer (connections.StallLimit).
_SEND_FAILED = "Socket error processing request."
# Where bloblo's request handling leaves what the access line reports (set by the app).
REQUEST_ID = "bloblo.request_id"
OUTCOME = "bloblo.outcome"


def json_formatter() -> logging.Formatter:
    """One JSON object per line: time, level, logger, message (and any extra fields)."""
    return JsonFormatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        timestamp=False,
    )


class BlobloLogger(Logger):
    """gunicorn's logger: a TLS handshake on the plain-HTTP port and a client cut off for
    taking its answer too slowly are INFO lines saying so, and with json set every line,
    access lines included, is one JSON object."""

    json = False

    def setup(self, cfg) -> None:
        super().setup(cfg)
        if self.json:
            for log in (self.error_log, self.access_log):
                for handler in log.handlers:
                    handler.setFormatter(json_formatter())

    def warning(self, msg, *args, **kwargs):
        probe = _TLS_PROBE.match(str(msg))
        if probe is None:
            super().warning(msg, *args, **kwargs)
            return
        self.info(
            "TLS handshake on the plain-HTTP port from %s: a client trying HTTPS first "
            "(docker and skopeo do, then use plain HTTP); nothing to do",
            probe.group("ip"),
        )

    def atoms(self, resp, req, environ, request_time) -> dict:
        """gunicorn's atoms for the text access line, its path (%(U)s) as the client sent it:
        gunicorn's own is percent-decoded, and a %0d%0a there would start a forged line."""
        atoms = super().atoms(resp, req, environ, request_time)
        atoms["U"] = path_as_sent(environ)
        return atoms

    def exception(self, msg, *args, **kwargs):
        if msg == _SEND_FAILED and isinstance(sys.exc_info()[1], TimeoutError):
            self.info(
                "a client stopped taking its answer: no piece of it (up to 1 MiB) was taken "
                "within BLOBLO_CLIENT_STALL_SECONDS, so its connection was closed (the access "
                "line before says what it had got)"
            )
            return
        super().exception(msg, *args, **kwargs)

    def access(self, resp, req, environ, request_time) -> None:
        if not self.json:
            super().access(resp, req, environ, request_time)
            return
        if not self.access_log_enabled:
            return
        status = resp.status.split(None, 1)[0] if isinstance(resp.status, str) else resp.status
        fields = {
            "method": environ.get("REQUEST_METHOD"),
            "path": path_as_sent(environ),
            "status": int(status),
            "bytes": getattr(resp, "sent", None),
            "duration_ms": round(request_time.total_seconds() * 1000, 1),
            "outcome": environ.get(OUTCOME),
            "client": environ.get("REMOTE_ADDR"),
            "user_agent": environ.get("HTTP_USER_AGENT"),
            "request_id": environ.get(REQUEST_ID),
        }
        self.access_log.info("request", extra=fields)


def path_as_sent(environ: dict) -> str:
    """The request's path as the client sent it (percent-encoded, printable ASCII: gunicorn
    refuses anything else in a request target), without its query: queries may carry signed
    upload state or tokens."""
    return environ.get("RAW_URI", environ.get("PATH_INFO") or "-").split("?", 1)[0]


def logger_class(log_format: str) -> type[BlobloLogger]:
    """The logger class for BLOBLO_LOG_FORMAT (text or json)."""
    return (
        type("BlobloJsonLogger", (BlobloLogger,), {"json": True})
        if log_format == "json"
        else BlobloLogger
    )
