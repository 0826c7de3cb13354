"""What docker-registry's own log says it served: a test counts the upstream requests bloblo
made (distribution logs one `msg="response completed"` line per request it answered)."""

from __future__ import annotations

from tests.stack.registry import Registry


def requests_served(registry: Registry, method: str, path: str) -> int:
    """How many `method` requests of exactly `path` (no query) the registry has answered so far.

    A line reads: time=... level=info msg="response completed" ... http.request.method=GET
    ... http.request.uri="/v2/team/app/blobs/sha256:..." ... http.response.status=200 ...
    (logged when the response ends, also when the client left half-way).
    """
    method_field = f"http.request.method={method} "
    uri_field = f'http.request.uri="{path}"'
    return sum(
        'msg="response completed"' in line and method_field in line and uri_field in line
        for line in registry.log_text().splitlines()
    )
