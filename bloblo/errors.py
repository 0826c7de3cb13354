"""Errors in the registry's JSON format, and the exceptions that carry them out of the code."""

from __future__ import annotations

import errno

from flask import Flask, Response, json
from werkzeug.exceptions import HTTPException

API_VERSION_HEADER = ("Docker-Distribution-API-Version", "registry/2.0")


class RegistryError(Exception):
    """An error a client can meet; the view answers it in the registry's JSON format."""

    status = 500
    code = "UNKNOWN"

    def __init__(self, message: str, detail: object = None):
        super().__init__(message)
        self.message = message
        self.detail = detail

    def response(self) -> Response:
        """The JSON error response for this error."""
        return error_response(self.status, self.code, self.message, self.detail)


class NameInvalid(RegistryError):
    status, code = 400, "NAME_INVALID"


class DigestInvalid(RegistryError):
    status, code = 400, "DIGEST_INVALID"


class PathInvalid(RegistryError):
    status, code = 400, "PATH_INVALID"


class SizeInvalid(RegistryError):
    status, code = 400, "SIZE_INVALID"


class UpstreamUnavailable(RegistryError):
    status, code = 502, "UNAVAILABLE"


class UpstreamTimeout(RegistryError):
    status, code = 504, "UNAVAILABLE"


class AbortResponse(ConnectionResetError):
    """Raised from a response body to cut the client's connection mid-body.

    The client sees a short read, which every registry client rejects; gunicorn treats a
    connection reset as routine and logs no traceback (the code that raises logs why).
    """

    def __init__(self, reason: str):
        super().__init__(errno.ECONNRESET, reason)


def error_response(
    status: int, code: str, message: str, detail: object = None, headers: dict | None = None
) -> Response:
    """A response with body {"errors": [{"code", "message", "detail"}]} (OCI distribution spec)."""
    body = {"errors": [{"code": code, "message": message, "detail": detail}]}
    response = Response(json.dumps(body), status=status, mimetype="application/json")
    response.headers.update(headers or {})
    response.headers.setdefault(*API_VERSION_HEADER)
    return response


def install_error_handlers(app: Flask) -> None:
    """Make every error bloblo itself answers a registry JSON error, never an HTML page."""

    @app.errorhandler(RegistryError)
    def _registry_error(exc: RegistryError) -> Response:
        return exc.response()

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        if exc.code == 404:
            return error_response(
                404, "NOT_FOUND", "bloblo serves the registry API under /v2/ only"
            )
        if exc.code == 405:
            return error_response(405, "UNSUPPORTED", "method not allowed on this path")
        return error_response(exc.code or 500, "UNKNOWN", exc.name)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        app.logger.exception("unexpected error")
        return error_response(500, "UNKNOWN", "internal error in bloblo; see its log")
