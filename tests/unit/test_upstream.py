"""Which upstream answers carry a blob's plain bytes of a known length (issues #6, #13 §6)."""

import io

import pytest

from bloblo.upstream import UpstreamResponse, plain_length


class Answer:
    def __init__(self, status=200, **headers):
        self.status_code = status
        self.headers = {name.replace("_", "-"): value for name, value in headers.items()}


def test_the_content_length_is_the_length_whatever_else_is_known():
    assert plain_length(Answer(Content_Length="42")) == 42
    assert plain_length(Answer(Content_Length="42"), 7) == 42


def test_without_content_length_the_size_known_elsewhere_is_the_length():
    assert plain_length(Answer(Transfer_Encoding="chunked"), 7) == 7
    assert plain_length(Answer(Transfer_Encoding="chunked")) is None


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(Answer(Content_Length="-1"), id="malformed-length"),
        pytest.param(Answer(Content_Length="4, 4"), id="two-lengths"),
        pytest.param(Answer(Content_Encoding="gzip"), id="encoded"),
        pytest.param(Answer(206), id="partial"),
        pytest.param(Answer(404), id="not-found"),
    ],
)
def test_other_answers_have_no_plain_length_even_with_a_known_size(answer):
    assert plain_length(answer, 7) is None


class _Socket:
    """Stands for a connection whose peer sent `data`."""

    def __init__(self, data: bytes):
        self.data = data

    def makefile(self, mode):
        return io.BytesIO(self.data)


@pytest.mark.parametrize(
    ("sent", "value"),
    [
        pytest.param("a\rX-Injected: 1", "a X-Injected: 1", id="bare-CR"),
        pytest.param("a\x00X-Injected: 1", "a X-Injected: 1", id="NUL"),
        pytest.param("a\x7f\x01b", "a  b", id="DEL-and-SOH"),
        pytest.param("a\tb", "a\tb", id="HTAB-kept"),
        pytest.param("caf\xe9", "caf\xe9", id="obs-text-kept"),
    ],
)
def test_control_characters_in_an_upstream_header_value_are_read_as_spaces(sent, value):
    head = f"HTTP/1.1 200 OK\r\nX-Odd: {sent}\r\nContent-Length: 4\r\n\r\nbody"
    response = UpstreamResponse(_Socket(head.encode("latin-1")))
    response.begin()
    assert response.getheaders() == [("X-Odd", value), ("Content-Length", "4")]
    assert response.read() == b"body"  # the body untouched
