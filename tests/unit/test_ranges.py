"""One byte range of a blob, as RFC 9110 §14 reads a Range header (issue #13, item 2)."""

import pytest

from bloblo.ranges import single_range


@pytest.mark.parametrize(
    ("header", "span"),
    [
        ("bytes=-500", (0, 100)),  # a suffix longer than the blob: the whole blob (§14.1.2)
        ("bytes=-101", (0, 100)),
        ("bytes=-100", (0, 100)),
        ("bytes=-99", (1, 100)),
        ("bytes=-1", (99, 100)),
        ("bytes=0-", (0, 100)),
        ("bytes=50-", (50, 100)),
        ("bytes=99-", (99, 100)),
        ("bytes=0-0", (0, 1)),
        ("bytes=10-19", (10, 20)),
        ("bytes=0-1000", (0, 100)),  # a last position past the end: up to the end
    ],
)
def test_one_satisfiable_range_is_its_start_and_stop(header, span):
    assert single_range(header, 100) == span


@pytest.mark.parametrize(
    "header",
    [
        "bytes=100-",  # starts past the end: unsatisfiable
        "bytes=1000-2000",
        "bytes=-0",  # a suffix of nothing: unsatisfiable
        "bytes=5-1",  # malformed
        "bytes=0-9,20-29",  # several ranges: the upstream answers those
        "items=0-9",
        "garbage",
        "",
    ],
)
def test_anything_but_one_satisfiable_range_is_none(header):
    assert single_range(header, 100) is None


def test_no_range_of_an_empty_blob_is_satisfiable():
    assert single_range("bytes=-5", 0) is None
    assert single_range("bytes=0-", 0) is None
