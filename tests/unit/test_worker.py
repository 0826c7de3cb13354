"""What bloblo's gunicorn worker says about a request gunicorn refused (issue #14 §3)."""

import json
from types import SimpleNamespace

import pytest
from gunicorn.http.errors import (
    InvalidHeader,
    InvalidRequestLine,
    InvalidResponseHeader,
    LimitRequestHeaders,
)

from bloblo.worker import JsonErrorsWorker, _told_safely


@pytest.mark.parametrize(
    ("refused", "told"),
    [
        pytest.param(
            InvalidRequestLine("GET /v2/?access_token=secret\x00 HTTP/1.1"),
            "Invalid HTTP request line: 'GET /v2/?<query> HTTP/1.1'",
            id="request-line",
        ),
        pytest.param(
            InvalidHeader("Authorization Bearer secret"),
            "Invalid HTTP Header: '<a line that is not name: value>'",
            id="line-without-colon",
        ),
        pytest.param(
            InvalidHeader("CONTENT-LENGTH"), "Invalid HTTP Header: 'CONTENT-LENGTH'", id="name"
        ),
        pytest.param(
            InvalidHeader("bare LF as line terminator"),
            "Invalid HTTP Header: 'bare LF as line terminator'",
            id="gunicorns-own-words",
        ),
    ],
)
def test_a_refusal_never_repeats_a_query_or_a_line_that_is_no_header(refused, told):
    safe = _told_safely(refused)
    assert (type(safe), str(safe)) == (type(refused), told)


def test_a_header_bloblo_answered_stays_bloblos_error():
    refused = InvalidResponseHeader("'X-Odd'")
    assert _told_safely(refused) is refused  # gunicorn answers it 500, not 400


def _worker() -> JsonErrorsWorker:
    worker = JsonErrorsWorker.__new__(JsonErrorsWorker)  # no sockets, no arbiter
    worker.cfg = SimpleNamespace(
        limit_request_line=8190, limit_request_field_size=65536, limit_request_fields=100
    )
    return worker


def _errors(answer: bytes) -> tuple[str, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"\r\nContent-Type: application/json\r\n" in head
    assert f"\r\nContent-Length: {len(body)}\r\n".encode() in head
    return head.split(b"\r\n", 1)[0].decode(), json.loads(body)["errors"][0]


def test_gunicorns_refusals_are_registry_json_errors_naming_the_bound():
    status, error = _errors(
        _worker().json_error(431, "Request Header Fields Too Large", LimitRequestHeaders("x"))
    )
    assert status == "HTTP/1.1 431 Request Header Fields Too Large"
    assert error["code"] == "REQUEST_TOO_LARGE"
    assert "65536 bytes" in error["message"] and "100 header fields" in error["message"]
    status, error = _errors(_worker().json_error(500, "Internal Server Error", ValueError()))
    assert (status, error["code"]) == ("HTTP/1.1 500 Internal Server Error", "UNKNOWN")
