"""Issue #8, part 5 (the part built so far): clients that try HTTPS first on bloblo's plain-HTTP
port leave an INFO line that says so, not a warning an operator would chase."""

from __future__ import annotations

import socket
import ssl

import pytest

from tests.stack.images import pull, push, unique_tag
from tests.stack.procs import LOOPBACK, poll


def test_a_tls_handshake_on_the_plain_port_is_logged_as_what_it_is(
    recording_upstream, start_bloblo
):
    bloblo = start_bloblo(recording_upstream.url)
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with (
        socket.create_connection((LOOPBACK, bloblo.port), timeout=10) as sock,
        pytest.raises(ssl.SSLError),
    ):
        context.wrap_socket(sock, server_hostname="registry.example")
    assert poll(lambda: "TLS handshake on the plain-HTTP port from 127.0.0.1" in bloblo.log_text())
    assert "Invalid request" not in bloblo.log_text()
    assert recording_upstream.seen == []


def test_a_skopeo_pull_leaves_no_warning_in_the_log(
    plain_registry, start_bloblo, make_image, tmp_path
):
    image = make_image([2000])
    tag = unique_tag()
    push(image, plain_registry.host, "team/app", tag)
    bloblo = start_bloblo(plain_registry)
    pull(bloblo.host, "team/app", tag, tmp_path / "out")
    log = bloblo.log_text()
    assert "TLS handshake on the plain-HTTP port" in log  # skopeo tried HTTPS first
    assert "[WARNING]" not in log and "[ERROR]" not in log
