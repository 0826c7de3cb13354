"""Issue #8, part 1: bloblo serves HTTPS on its own port with BLOBLO_TLS_CERT and BLOBLO_TLS_KEY,
and a real client that trusts the certificate's CA pulls through it."""

from __future__ import annotations

import ssl

import pytest
import requests

from tests.stack.bloblo import try_start
from tests.stack.images import SKOPEO, push, read_image, unique_tag
from tests.stack.procs import local_session, run
from tests.stack.tls import make_server_tls


@pytest.fixture
def server_tls(tmp_path):
    return make_server_tls(tmp_path / "tls")


def test_skopeo_pulls_through_bloblo_over_https_trusting_the_ca(
    basic_registry, alice, start_bloblo, make_image, server_tls, tmp_path
):
    image = make_image([300_000])
    tag = unique_tag()
    push(image, basic_registry.host, "team/app", tag, alice)
    bloblo = start_bloblo(
        basic_registry, BLOBLO_TLS_CERT=str(server_tls.cert), BLOBLO_TLS_KEY=str(server_tls.key)
    )
    assert bloblo.url.startswith("https://")
    run(
        [
            SKOPEO,
            "--insecure-policy",
            "copy",
            f"--src-cert-dir={server_tls.ca_dir}",
            "--src-tls-verify=true",
            f"--src-creds={alice[0]}:{alice[1]}",
            f"docker://{bloblo.host}/team/app:{tag}",
            f"oci:{tmp_path / 'out'}:{tag}",
        ],
        timeout=300,
    )
    assert read_image(tmp_path / "out", tag).layer_digests == image.layer_digests
    with local_session() as session:
        upload = session.post(
            f"{bloblo.url}/v2/team/app/blobs/uploads/",
            auth=alice,
            verify=str(server_tls.ca_cert),
            timeout=30,
        )
    assert upload.status_code == 202
    assert upload.headers["Location"].startswith(f"https://{bloblo.host}/")  # stays on TLS


def test_the_https_port_refuses_plain_http_and_untrusted_clients(
    recording_upstream, start_bloblo, server_tls
):
    bloblo = start_bloblo(
        recording_upstream.url,
        BLOBLO_TLS_CERT=str(server_tls.cert),
        BLOBLO_TLS_KEY=str(server_tls.key),
    )
    with local_session() as session:
        assert session.get(f"{bloblo.url}/livez", verify=str(server_tls.ca_cert)).ok
        with pytest.raises(requests.exceptions.SSLError):
            session.get(f"{bloblo.url}/livez", timeout=10)  # the system CAs do not know it
        with pytest.raises(requests.exceptions.ConnectionError):
            session.get(f"http://{bloblo.host}/livez", timeout=10)
    presented = ssl.get_server_certificate(("127.0.0.1", bloblo.port))
    assert presented.strip() == server_tls.cert.read_text().strip()


def test_a_certificate_without_its_key_stops_start_up(tmp_path, server_tls):
    result = try_start(tmp_path, "http://127.0.0.1:1", {"BLOBLO_TLS_CERT": str(server_tls.cert)})
    assert result.returncode != 0
    assert "BLOBLO_TLS_KEY" in result.stderr and "Traceback" not in result.stderr
