"""Request IDs: every request carries one, to the upstream and back, and into its access line.

The client's X-Request-Id when it sent a usable one, else a new one. It goes upstream as the
client's header would, and back to the client in X-Request-Id unless the upstream's answer
already carries one, which then passes unchanged (issue #8, part 5).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable

from .logs import REQUEST_ID

_USABLE = re.compile(r"[\x21-\x7e]{1,200}")  # visible ASCII: it ends up in logs and headers


class RequestIds:
    """WSGI middleware that gives each request its ID (environ["bloblo.request_id"])."""

    def __init__(self, app: Callable):
        self._app = app

    def __call__(self, environ: dict, start_response: Callable):
        request_id = environ.get("HTTP_X_REQUEST_ID", "")
        if not _USABLE.fullmatch(request_id):
            request_id = uuid.uuid4().hex
            environ["HTTP_X_REQUEST_ID"] = request_id  # so that it goes upstream too
        environ[REQUEST_ID] = request_id

        def start(status, headers, exc_info=None):
            if not any(name.lower() == "x-request-id" for name, _ in headers):
                headers.append(("X-Request-Id", request_id))
            return start_response(status, headers, exc_info)

        return self._app(environ, start)
