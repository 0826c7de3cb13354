"""Byte ranges: which bytes of a blob a Range header asks for (RFC 9110 §14)."""

from __future__ import annotations

from werkzeug.http import parse_range_header


def single_range(value: str, size: int) -> tuple[int, int] | None:
    """(start, stop) of the one byte range a Range header asks of a blob of size bytes.

    stop is exclusive and at most size (RFC 9110 §14.1.2): a last position past the end stops
    at the end, and a suffix range longer than the blob (`bytes=-500` of 100 bytes) is the whole
    blob. None when the header is malformed, names several ranges, or names none that is
    satisfiable (a start at or past the end, `bytes=-0`, any range of an empty blob): the
    upstream answers those itself.
    """
    parsed = parse_range_header(value)
    if parsed is None or len(parsed.ranges) != 1 or size <= 0:
        return None
    start, _ = parsed.ranges[0]
    if start < 0:  # a suffix range: the last -start bytes, all of them when there are fewer
        return max(size + start, 0), size
    return parsed.range_for_length(size)
