"""The record a filling worker publishes for the host's other workers (host.py): one typed,
versioned state, written whole and parsed in one place that rejects anything unexpected (issue
#13, part 2: a rolling upgrade may meet states of another version)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

STATE_VERSION = 1  # FillState's layout; a worker of another version's states are ignored
_STATES = frozenset({"running", "verified", "broken", "refuted"})
_FIELDS = frozenset({"version", "spool", "size", "headers", "state", "reason", "canonical"})


class BadState(ValueError):
    """A state file's content is not a FillState of this version for this blob."""


@dataclass(frozen=True)
class FillState:
    """How far a fill got, as its worker tells the host's other workers: the one record they
    share (version STATE_VERSION)."""

    spool: str  # the spool's file name in the spool directory
    size: int  # the blob's size in bytes
    headers: tuple[tuple[str, str], ...]  # the upstream's answer, for every client
    state: str  # running, verified, broken, or refuted (the upstream's bytes were wrong)
    reason: str | None = None  # why it broke
    canonical: str | None = None  # the registry's digest of the blob in another algorithm, which
    # the fill verifies too (issue #13 §6; evidence.py)

    def encode(self) -> bytes:
        """The state as its file holds it."""
        record = {
            "version": STATE_VERSION,
            "spool": self.spool,
            "size": self.size,
            "headers": [list(pair) for pair in self.headers],
            "state": self.state,
            "reason": self.reason,
            "canonical": self.canonical,
        }
        return json.dumps(record).encode()

    @classmethod
    def parse(cls, data: bytes, spool_prefix: str) -> FillState:
        """The state data holds, for a blob whose spools are named `<spool_prefix><12 hex>.spool`.

        Raises BadState for anything else: not JSON, another version, a missing or unknown
        field, a value of the wrong type, or a spool of another blob or directory.
        """
        try:
            record = json.loads(data)
        except ValueError:
            raise BadState("not JSON") from None
        if not isinstance(record, dict) or set(record) != _FIELDS:
            raise BadState("not a fill's state")
        if record["version"] != STATE_VERSION:
            raise BadState(f"version {record['version']!r}, not {STATE_VERSION}")
        spool, size, headers = record["spool"], record["size"], record["headers"]
        state, reason, canonical = record["state"], record["reason"], record["canonical"]
        pattern = re.escape(spool_prefix) + r"[0-9a-f]{12}\.spool"
        if not (isinstance(spool, str) and re.fullmatch(pattern, spool)):
            raise BadState(f"spool {spool!r} is not this blob's")
        if type(size) is not int or size < 0:
            raise BadState(f"size {size!r}")
        if not isinstance(headers, list) or not all(_is_header(pair) for pair in headers):
            raise BadState("headers")
        if state not in _STATES or not (reason is None or isinstance(reason, str)):
            raise BadState(f"state {state!r}")
        if not (canonical is None or isinstance(canonical, str)):
            raise BadState(f"canonical {canonical!r}")
        pairs = tuple((name, value) for name, value in headers)
        return cls(spool, size, pairs, state, reason, canonical)


def _is_header(pair) -> bool:
    return isinstance(pair, list) and len(pair) == 2 and all(isinstance(part, str) for part in pair)
