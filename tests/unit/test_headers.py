"""Which headers cross the proxy in each direction."""

import ipaddress

import pytest

from bloblo.clients import Client, identify
from bloblo.headers import (
    client_response_headers,
    end_to_end,
    origin,
    rebase_url,
    upstream_request_headers,
)

TRUSTED = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("10.0.0.0/8"))
UP = "http://up:5000"
ME = "http://me:7777"


def _up(headers, preserve_host=False, peer="198.51.100.3"):
    """The headers sent upstream for a request from peer over https to proxy.example:7777."""
    client = identify(peer, "https", "proxy.example:7777", headers, TRUSTED)
    return upstream_request_headers(headers, client, preserve_host=preserve_host)


def _down(headers, upstream_url=UP, client_base=ME):
    return client_response_headers(headers, upstream_url=upstream_url, client_base=client_base)


def _one(name, value, upstream_url=UP, client_base=ME):
    [(got_name, got)] = _down([(name, value)], upstream_url, client_base)
    assert got_name == name
    return got


# --- towards the upstream (ported) -----------------------------------------------------------


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


def test_forwarded_headers_from_a_trusted_balancer_extend_an_existing_chain():
    sent = dict(_up([("X-Forwarded-For", "192.0.2.1")], peer="10.1.2.3"))
    assert sent["X-Forwarded-For"] == "192.0.2.1, 10.1.2.3"
    assert sent["X-Forwarded-Host"] == "proxy.example:7777"
    assert sent["X-Forwarded-Proto"] == "https"
    assert "Host" not in sent


def test_forwarded_headers_from_an_untrusted_client_are_replaced_by_its_description():
    sent = _up(
        [
            ("X-Forwarded-For", "192.0.2.1"),
            ("X-Forwarded-Host", "spoofed"),
            ("X-Forwarded-Proto", "http"),
            ("Forwarded", "for=192.0.2.1"),
            ("X-Forwarded-Port", "1"),
        ],
        peer="203.0.113.7",
    )
    assert sent == [
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "proxy.example:7777"),
        ("X-Forwarded-For", "203.0.113.7"),
    ]


def test_preserve_host_sends_the_clients_host():
    assert ("Host", "proxy.example:7777") in _up([], preserve_host=True)


def test_location_at_the_upstream_moves_to_the_clients_address():
    up = "http://registry.internal:5000"
    assert (
        rebase_url(f"{up}/v2/app/blobs/uploads/1?_state=x%3D", up, "https://proxy.example")
        == "https://proxy.example/v2/app/blobs/uploads/1?_state=x%3D"
    )
    assert rebase_url("https://s3.example/bucket/key?sig", up, "https://p") == (
        "https://s3.example/bucket/key?sig"
    )
    assert rebase_url("/v2/app/blobs/uploads/1", up, "https://p") == "/v2/app/blobs/uploads/1"


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


# --- towards the upstream (new) --------------------------------------------------------------


def test_the_clients_forwarding_headers_are_replaced_by_the_clients_description():
    client = Client(
        "203.0.113.7",
        "https",
        "public.example",
        [("X-Forwarded-Proto", "https"), ("X-Forwarded-For", "203.0.113.7, 127.0.0.2")],
    )
    sent = upstream_request_headers(
        [
            ("x-forwarded-for", "6.6.6.6"),
            ("Authorization", "Basic YQ=="),
            ("FORWARDED", "for=6.6.6.6"),
            ("X-Forwarded-Host", "evil.example"),
        ],
        client,
        preserve_host=False,
    )
    assert sent == [
        ("Authorization", "Basic YQ=="),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-For", "203.0.113.7, 127.0.0.2"),
    ]


def test_a_trusted_balancers_https_and_host_reach_the_upstream():
    sent = dict(
        _up(
            [
                ("X-Forwarded-Proto", "https"),
                ("X-Forwarded-Host", "public.example"),
                ("X-Forwarded-For", "203.0.113.7"),
            ],
            peer="127.0.0.2",
        )
    )
    assert sent == {
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "public.example",
        "X-Forwarded-For": "203.0.113.7, 127.0.0.2",
    }


def test_without_preserve_host_no_host_goes_upstream():
    sent = _up([("Host", "proxy.example:7777"), ("Authorization", "x")])
    assert not any(name.lower() == "host" for name, _ in sent)


def test_preserve_host_sends_exactly_one_host_the_one_the_client_used():
    sent = _up(
        [("Host", "127.0.0.1:7777"), ("X-Forwarded-Host", "public.example")],
        preserve_host=True,
        peer="127.0.0.2",
    )
    assert [v for n, v in sent if n.lower() == "host"] == ["public.example"]


def test_expect_is_not_forwarded_upstream():
    assert _up([("Expect", "100-continue"), ("Authorization", "x")])[0] == ("Authorization", "x")


def test_end_to_end_drops_hop_by_hop_connection_tokens_and_the_extra_names():
    got = end_to_end(
        [
            ("Connection", "close, X-Hop"),
            ("connection", "Other"),
            ("x-hop", "1"),
            ("Other", "2"),
            ("TE", "trailers"),
            ("Upgrade", "h2c"),
            ("Trailer", "x"),
            ("Proxy-Connection", "keep-alive"),
            ("Proxy-Authenticate", "Basic"),
            ("Date", "d"),
            ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"),
        ],
        frozenset({"date"}),
    )
    assert got == [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")]


# --- towards the client: which URLs move ------------------------------------------------------


@pytest.mark.parametrize("name", ["Location", "Content-Location", "location", "CONTENT-LOCATION"])
def test_location_headers_at_the_upstream_move_to_the_client(name):
    assert _one(name, "http://up:5000/v2/app/blobs/uploads/u?_state=a%2Bb") == (
        "http://me:7777/v2/app/blobs/uploads/u?_state=a%2Bb"
    )


def test_a_link_at_the_upstream_moves_to_the_client():
    assert _one("Link", '<http://up:5000/v2/_catalog?last=b&n=2>; rel="next"') == (
        '<http://me:7777/v2/_catalog?last=b&n=2>; rel="next"'
    )


def test_several_links_in_one_header_each_move_when_at_the_upstream():
    got = _one(
        "Link",
        '<http://up:5000/v2/a/tags/list?n=1&last=x>; rel="next", '
        '<https://elsewhere.example/doc>; rel="help", '
        '</v2/a/tags/list?n=1>; rel="first", '
        '<http://up:5000/v2/a/tags/list>; rel="prev"',
    )
    assert got == (
        '<http://me:7777/v2/a/tags/list?n=1&last=x>; rel="next", '
        '<https://elsewhere.example/doc>; rel="help", '
        '</v2/a/tags/list?n=1>; rel="first", '
        '<http://me:7777/v2/a/tags/list>; rel="prev"'
    )


def test_the_bearer_realm_at_the_upstream_moves_to_the_client():
    assert _one("WWW-Authenticate", 'Bearer realm="http://up:5000/token",service="x"') == (
        'Bearer realm="http://me:7777/token",service="x"'
    )


def test_only_the_realm_moves_in_www_authenticate():
    value = 'Bearer service="http://up:5000/s",realm="http://up:5000/token",scope="repo:a:pull"'
    assert _one("Www-Authenticate", value) == (
        'Bearer service="http://up:5000/s",realm="http://me:7777/token",scope="repo:a:pull"'
    )


def test_a_realm_that_is_no_url_or_elsewhere_is_unchanged():
    assert (
        _one("Www-Authenticate", 'Basic realm="Registry Realm"') == 'Basic realm="Registry Realm"'
    )
    value = 'Bearer realm="https://auth.example/token",service="registry"'
    assert _one("Www-Authenticate", value) == value


@pytest.mark.parametrize(
    "url",
    [
        "https://s3.example/bucket/key?X-Amz-Signature=abc",
        "http://up:5001/v2/x",  # another port
        "https://up:5000/v2/x",  # another scheme
        "http://upx:5000/v2/x",
        "http://up.example:5000/v2/x",
        "ftp://up:5000/v2/x",
        "//up:5000/v2/x",  # scheme-relative: left alone
        "/v2/app/blobs/uploads/1",
        "v2/relative",
        "?n=1",
        "",
        "http://up:99999/v2/x",  # malformed port
    ],
)
def test_urls_elsewhere_and_relative_urls_are_unchanged(url):
    assert rebase_url(url, UP, ME) == url
    assert _one("Location", url) == url
    assert _one("Content-Location", url) == url
    assert _one("Link", f'<{url}>; rel="next"') == f'<{url}>; rel="next"'


def test_urls_in_other_headers_are_unchanged():
    headers = [
        ("Docker-Upload-Uuid", "http://up:5000/v2/x"),
        ("X-Custom", "<http://up:5000/v2/x>"),
        ("Refresh", "0; url=http://up:5000/v2/x"),
    ]
    assert _down(headers) == headers


def test_without_a_client_base_nothing_moves():
    headers = [
        ("Location", "http://up:5000/v2/x"),
        ("Link", '<http://up:5000/v2/x>; rel="next"'),
        ("Www-Authenticate", 'Bearer realm="http://up:5000/token"'),
        ("Date", "dropped"),
    ]
    assert _down(headers, client_base=None) == headers[:3]


# --- towards the client: how URLs move --------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://UP:5000/v2/x",
        "HTTP://up:5000/v2/x",
    ],
)
def test_the_upstream_origin_is_compared_without_case(url):
    assert rebase_url(url, UP, ME) == "http://me:7777/v2/x"


@pytest.mark.parametrize(
    ("url", "upstream_url"),
    [
        ("http://UP:80/v2/x", "http://up"),
        ("http://up/v2/x", "http://up:80"),
        ("https://up:443/v2/x", "https://up"),
        ("https://up/v2/x", "https://Up:443"),
    ],
)
def test_default_ports_are_the_same_origin(url, upstream_url):
    got = rebase_url(url, upstream_url, "https://me")
    assert got == "https://me/v2/x"


def test_origin_is_scheme_host_and_port_lowercased_with_the_default_port():
    assert origin("http://UP/x") == ("http", "up", 80)
    assert origin("HTTPS://Up.Example/x") == ("https", "up.example", 443)
    assert origin("http://up:5000") == ("http", "up", 5000)
    assert origin("http://[::1]:7777/v2/") == ("http", "::1", 7777)
    assert origin("http://UP:80") == origin("http://up")


@pytest.mark.parametrize(
    "url", ["/v2/x", "ftp://up/x", "http://", "http://up:99999/", "http://up:x/", "mailto:a@b"]
)
def test_origin_of_a_relative_or_non_http_or_malformed_url_is_none(url):
    assert origin(url) is None


def test_an_https_upstream_url_keeps_https_when_the_client_used_http():
    assert rebase_url("https://up/v2/x?y=1", "https://up", "http://me:7777") == (
        "https://me:7777/v2/x?y=1"
    )
    got = _one(
        "Www-Authenticate",
        'Bearer realm="https://up/token"',
        upstream_url="https://up",
        client_base="http://me:7777",
    )
    assert got == 'Bearer realm="https://me:7777/token"'


def test_an_http_upstream_url_takes_the_clients_https():
    assert rebase_url("http://up:5000/v2/x", UP, "https://public.example") == (
        "https://public.example/v2/x"
    )


def test_the_upstream_path_prefix_is_stripped():
    up = "http://up:5000/registry"
    assert rebase_url("http://up:5000/registry/v2/x?n=1", up, ME) == "http://me:7777/v2/x?n=1"
    assert rebase_url("http://up:5000/registry", up, ME) == "http://me:7777"
    assert rebase_url("http://up:5000/registry?x", up, ME) == "http://me:7777?x"


@pytest.mark.parametrize(
    "url", ["http://up:5000/v2/x", "http://up:5000/registryx/v2/x", "http://up:5000/"]
)
def test_a_url_at_the_upstream_outside_its_path_prefix_is_unchanged(url):
    assert rebase_url(url, "http://up:5000/registry", ME) == url


def test_a_path_prefix_is_stripped_in_every_url_header():
    up = "http://up:5000/registry"
    got = _down(
        [
            ("Location", "http://up:5000/registry/v2/a/blobs/uploads/1"),
            ("Link", '<http://up:5000/registry/v2/_catalog?n=1>; rel="next"'),
            ("Www-Authenticate", 'Bearer realm="http://up:5000/registry/token"'),
        ],
        upstream_url=up,
    )
    assert got == [
        ("Location", "http://me:7777/v2/a/blobs/uploads/1"),
        ("Link", '<http://me:7777/v2/_catalog?n=1>; rel="next"'),
        ("Www-Authenticate", 'Bearer realm="http://me:7777/token"'),
    ]


def test_the_query_and_fragment_of_a_moved_url_are_kept_verbatim():
    url = "http://up:5000/v2/a/blobs/uploads/1?_state=AbC%2F%3D%3D&digest=sha256%3Aab#frag"
    assert rebase_url(url, UP, "https://public.example") == (
        "https://public.example/v2/a/blobs/uploads/1?_state=AbC%2F%3D%3D&digest=sha256%3Aab#frag"
    )


def test_userinfo_in_an_upstream_url_does_not_reach_the_client():
    assert rebase_url("http://u:p@up:5000/v2/x", UP, ME) == "http://me:7777/v2/x"


def test_an_ipv6_upstream_moves_to_the_client():
    up = "http://[::1]:5000"
    assert rebase_url("http://[::1]:5000/v2/x", up, ME) == "http://me:7777/v2/x"
    assert rebase_url("http://[::2]:5000/v2/x", up, ME) == "http://[::2]:5000/v2/x"


def test_a_client_base_from_a_trusted_balancer_is_used_for_moved_urls():
    client = identify(
        "127.0.0.2",
        "http",
        "127.0.0.1:7777",
        [("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "public.example")],
        TRUSTED,
    )
    assert _one("Location", "http://up:5000/v2/x", client_base=client.base_url) == (
        "https://public.example/v2/x"
    )
