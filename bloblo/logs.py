"""What bloblo's server log says: gunicorn's logger, with the noise an operator should not chase
turned into what it is (issue #8, part 5).

Loaded by path from gunicorn.conf.py in the master: it imports only the standard library and
gunicorn, never the bloblo package (see config.py for why).
"""

from __future__ import annotations

import re

from gunicorn.glogging import Logger

# skopeo and docker try HTTPS first on a plain-HTTP port: gunicorn reads their TLS ClientHello as
# a request line. Its bytes hold a line feed (then: "bare LF"), or start with 0x16 0x03.
_TLS_PROBE = re.compile(
    r"Invalid request from ip=(?P<ip>\S+): Invalid HTTP request line: "
    r"(?:'bare LF as line terminator'|'\\x16\\x03)"
)


class BlobloLogger(Logger):
    """gunicorn's logger; a TLS handshake on the plain-HTTP port is an INFO line saying so."""

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
