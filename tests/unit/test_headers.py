"""Which headers cross the proxy in each direction."""

from bloblo.headers import client_response_headers, rebase_location, upstream_request_headers


def _up(headers, preserve_host=False):
    return upstream_request_headers(
        headers,
        client_host="proxy.example:7777",
        client_scheme="https",
        client_addr="10.1.2.3",
        preserve_host=preserve_host,
    )


def test_authorization_and_repeated_accept_headers_reach_the_upstream_unchanged():
    sent = _up(
        [
            ("Authorization", "Bearer abc.def"),
            ("Accept", "application/vnd.oci.image.manifest.v1+json"),
            ("Accept", "application/vnd.docker.distribution.manifest.v2+json"),
        ]
    )
    assert ("Authorization", "Bearer abc.def") in sent
    assert [v for n, v in sent if n == "Accept"] == [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]


def test_hop_by_hop_headers_and_those_named_in_connection_are_dropped():
    sent = _up(
        [
            ("Connection", "keep-alive, X-Secret-Hop"),
            ("X-Secret-Hop", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Transfer-Encoding", "chunked"),
            ("Proxy-Authorization", "Basic eA=="),
            ("Host", "proxy.example:7777"),
            ("Content-Length", "5"),
            ("User-Agent", "docker/20.10"),
        ]
    )
    assert [n for n, _ in sent if not n.startswith("X-Forwarded")] == ["User-Agent"]


def test_forwarded_headers_describe_the_client_and_extend_an_existing_chain():
    sent = dict(_up([("X-Forwarded-For", "192.0.2.1"), ("X-Forwarded-Host", "spoofed")]))
    assert sent["X-Forwarded-For"] == "192.0.2.1, 10.1.2.3"
    assert sent["X-Forwarded-Host"] == "proxy.example:7777"
    assert sent["X-Forwarded-Proto"] == "https"
    assert "Host" not in sent


def test_preserve_host_sends_the_clients_host():
    assert ("Host", "proxy.example:7777") in _up([], preserve_host=True)


def test_location_at_the_upstream_moves_to_the_clients_address():
    up = "http://registry.internal:5000"
    assert (
        rebase_location(f"{up}/v2/app/blobs/uploads/1?_state=x%3D", up, "https://proxy.example")
        == "https://proxy.example/v2/app/blobs/uploads/1?_state=x%3D"
    )
    assert rebase_location("https://s3.example/bucket/key?sig", up, "https://p") == (
        "https://s3.example/bucket/key?sig"
    )
    assert rebase_location("/v2/app/blobs/uploads/1", up, "https://p") == "/v2/app/blobs/uploads/1"


def test_response_headers_keep_repeats_and_drop_hop_by_hop_and_server_date():
    got = client_response_headers(
        [
            ("Www-Authenticate", 'Bearer realm="a"'),
            ("Www-Authenticate", 'Basic realm="b"'),
            ("Transfer-Encoding", "chunked"),
            ("Date", "x"),
            ("Server", "y"),
            ("Location", "http://up:5000/v2/x"),
        ],
        upstream_url="http://up:5000",
        client_base="http://me:7777",
    )
    assert got == [
        ("Www-Authenticate", 'Bearer realm="a"'),
        ("Www-Authenticate", 'Basic realm="b"'),
        ("Location", "http://me:7777/v2/x"),
    ]
