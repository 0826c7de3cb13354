"""Who the client is, seen through trusted load balancers (issue #6, part 4)."""

import ipaddress

import pytest

from bloblo.clients import ENVIRON_KEY, Client, ClientMiddleware, identify, in_networks
from bloblo.clients import is_forwarding_header as forwarding
from bloblo.config import DEFAULT_TRUSTED_PROXIES

DEFAULT = tuple(ipaddress.ip_network(n) for n in DEFAULT_TRUSTED_PROXIES)
LB_NETS = (*DEFAULT, ipaddress.ip_network("10.0.0.0/8"))
SPOOFED = [
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "evil.example"),
    ("X-Forwarded-For", "10.0.0.1"),
    ("X-Forwarded-Port", "443"),
    ("X-Forwarded-Prefix", "/admin"),
    ("Forwarded", "for=10.0.0.1;proto=https;host=evil.example"),
]


def _forwarded(client: Client) -> dict[str, str]:
    names = [n.lower() for n, _ in client.forwarded]
    assert len(names) == len(set(names)), f"a forwarding header repeated: {client.forwarded}"
    return {n.lower(): v for n, v in client.forwarded}


# --- is_forwarding_header, in_networks -------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["X-Forwarded-For", "x-forwarded-proto", "X-FORWARDED-HOST", "Forwarded"]
)
def test_x_forwarded_and_forwarded_headers_are_forwarding_headers(name):
    assert forwarding(name)


@pytest.mark.parametrize("name", ["Authorization", "X-Forwarded", "X-Real-Ip", "Forwarded-For"])
def test_other_headers_are_not_forwarding_headers(name):
    assert not forwarding(name)


@pytest.mark.parametrize("address", ["127.0.0.1", "127.255.0.9", "::1", " 127.0.0.2 ", "[::1]"])
def test_loopback_addresses_are_in_the_default_trusted_networks(address):
    assert in_networks(address, DEFAULT)


@pytest.mark.parametrize(
    "address", ["128.0.0.1", "10.0.0.1", "::2", "", None, "localhost", "unknown", "127.0.0.1:80"]
)
def test_other_addresses_and_non_addresses_are_not_in_the_default_trusted_networks(address):
    assert not in_networks(address, DEFAULT)


def test_no_address_is_in_no_network():
    assert not in_networks("127.0.0.1", ())


# --- an untrusted peer ------------------------------------------------------------------------


def test_an_untrusted_peers_forwarding_headers_are_all_dropped():
    client = identify("203.0.113.7", "http", "bloblo.example:7777", SPOOFED, DEFAULT)
    assert client == Client(
        address="203.0.113.7",
        scheme="http",
        host="bloblo.example:7777",
        forwarded=[
            ("X-Forwarded-Proto", "http"),
            ("X-Forwarded-Host", "bloblo.example:7777"),
            ("X-Forwarded-For", "203.0.113.7"),
        ],
    )


def test_an_untrusted_peer_is_described_by_its_own_connection_over_https():
    client = identify("198.51.100.4", "https", "reg.example", [], DEFAULT)
    assert (client.address, client.scheme, client.host) == ("198.51.100.4", "https", "reg.example")
    assert client.base_url == "https://reg.example"


def test_an_untrusted_ipv6_peer_is_its_own_address():
    client = identify("2001:db8::5", "http", "h", [("X-Forwarded-For", "::1")], DEFAULT)
    assert client.address == "2001:db8::5"
    assert _forwarded(client)["x-forwarded-for"] == "2001:db8::5"


def test_a_peer_outside_custom_trusted_networks_is_not_believed_even_from_loopback():
    nets = (ipaddress.ip_network("10.0.0.0/8"),)
    client = identify("127.0.0.1", "http", "h", [("X-Forwarded-For", "203.0.113.7")], nets)
    assert client.address == "127.0.0.1"
    assert _forwarded(client)["x-forwarded-for"] == "127.0.0.1"


# --- a trusted balancer -----------------------------------------------------------------------


def test_a_trusted_balancers_https_reaches_the_upstream():
    client = identify(
        "127.0.0.2",
        "http",
        "127.0.0.1:7777",
        [
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "public.example"),
            ("X-Forwarded-For", "203.0.113.7"),
        ],
        DEFAULT,
    )
    assert client.scheme == "https"
    assert client.host == "public.example"
    assert client.address == "203.0.113.7"
    assert client.base_url == "https://public.example"
    assert _forwarded(client) == {
        "x-forwarded-proto": "https",
        "x-forwarded-host": "public.example",
        "x-forwarded-for": "203.0.113.7, 127.0.0.2",
    }


def test_a_trusted_balancer_without_forwarding_headers_is_described_by_the_connection():
    client = identify("127.0.0.2", "http", "bloblo:7777", [("Authorization", "x")], DEFAULT)
    assert (client.address, client.scheme, client.host) == ("127.0.0.2", "http", "bloblo:7777")
    assert _forwarded(client) == {
        "x-forwarded-proto": "http",
        "x-forwarded-host": "bloblo:7777",
        "x-forwarded-for": "127.0.0.2",
    }


def test_a_trusted_balancers_chain_is_extended_never_replaced():
    client = identify(
        "10.0.0.9", "http", "h", [("X-Forwarded-For", "198.51.100.1,  10.0.0.3")], LB_NETS
    )
    assert _forwarded(client)["x-forwarded-for"] == "198.51.100.1, 10.0.0.3, 10.0.0.9"


def test_repeated_x_forwarded_for_lines_from_a_trusted_balancer_form_one_chain_in_order():
    client = identify(
        "10.0.0.9",
        "http",
        "h",
        [("X-Forwarded-For", "198.51.100.1"), ("x-forwarded-for", "10.0.0.3")],
        LB_NETS,
    )
    assert _forwarded(client)["x-forwarded-for"] == "198.51.100.1, 10.0.0.3, 10.0.0.9"
    assert client.address == "198.51.100.1"


def test_a_trusted_balancers_other_forwarding_headers_are_kept():
    client = identify("127.0.0.2", "http", "h", SPOOFED, DEFAULT)
    forwarded = _forwarded(client)
    assert forwarded["x-forwarded-port"] == "443"
    assert forwarded["x-forwarded-prefix"] == "/admin"
    assert forwarded["forwarded"] == "for=10.0.0.1;proto=https;host=evil.example"


def test_only_forwarding_headers_of_a_trusted_balancer_are_passed_on():
    headers = [("Authorization", "Bearer t"), ("X-Forwarded-Proto", "https"), ("Cookie", "c")]
    client = identify("127.0.0.2", "http", "h", headers, DEFAULT)
    assert all(forwarding(name) for name, _ in client.forwarded)


def test_the_client_is_the_first_untrusted_address_behind_several_trusted_hops():
    client = identify(
        "10.0.0.9",
        "http",
        "h",
        [("X-Forwarded-For", "203.0.113.7, 10.1.1.1, 127.0.0.5")],
        LB_NETS,
    )
    assert client.address == "203.0.113.7"


def test_when_every_hop_is_trusted_the_leftmost_is_the_client():
    client = identify(
        "127.0.0.2", "http", "h", [("X-Forwarded-For", "10.0.0.4, 10.0.0.5")], LB_NETS
    )
    assert client.address == "10.0.0.4"


def test_a_spoofed_entry_left_of_the_real_client_is_not_believed():
    client = identify(
        "127.0.0.2", "http", "h", [("X-Forwarded-For", "1.1.1.1, 203.0.113.7")], DEFAULT
    )
    assert client.address == "203.0.113.7"
    assert _forwarded(client)["x-forwarded-for"] == "1.1.1.1, 203.0.113.7, 127.0.0.2"


def test_a_spoofed_trusted_entry_left_of_the_real_client_is_not_believed():
    client = identify(
        "127.0.0.2", "http", "h", [("X-Forwarded-For", "127.0.0.1, 203.0.113.7")], DEFAULT
    )
    assert client.address == "203.0.113.7"


def test_a_trusted_ipv6_loopback_balancer_is_believed():
    client = identify(
        "::1",
        "http",
        "[::1]:7777",
        [("X-Forwarded-For", "2001:db8::7"), ("X-Forwarded-Proto", "https")],
        DEFAULT,
    )
    assert client.address == "2001:db8::7"
    assert client.scheme == "https"
    assert _forwarded(client)["x-forwarded-for"] == "2001:db8::7, ::1"


def test_an_ipv6_loopback_hop_in_the_chain_is_skipped_as_trusted():
    client = identify("127.0.0.2", "http", "h", [("X-Forwarded-For", "2001:db8::7, ::1")], DEFAULT)
    assert client.address == "2001:db8::7"


def test_empty_and_blank_x_forwarded_for_entries_are_skipped():
    client = identify("127.0.0.2", "http", "h", [("X-Forwarded-For", " , 203.0.113.7,, ")], DEFAULT)
    assert client.address == "203.0.113.7"
    assert _forwarded(client)["x-forwarded-for"] == "203.0.113.7, 127.0.0.2"


@pytest.mark.parametrize("garbage", ["unknown", "not-an-ip", "203.0.113.7:5555", "_hidden", "::g"])
def test_a_garbage_hop_is_never_trusted_so_entries_left_of_it_are_not_believed(garbage):
    chain = f"198.51.100.1, {garbage}"
    client = identify("127.0.0.2", "http", "h", [("X-Forwarded-For", chain)], DEFAULT)
    assert client.address == garbage
    assert _forwarded(client)["x-forwarded-for"] == f"{chain}, 127.0.0.2"


def test_garbage_left_of_the_real_client_changes_nothing():
    client = identify(
        "127.0.0.2", "http", "h", [("X-Forwarded-For", "<script>, ???, 203.0.113.7")], DEFAULT
    )
    assert client.address == "203.0.113.7"


@pytest.mark.parametrize("proto", ["ftp", "", "javascript", "https://x"])
def test_an_x_forwarded_proto_other_than_http_or_https_is_ignored(proto):
    client = identify("127.0.0.2", "http", "h", [("X-Forwarded-Proto", proto)], DEFAULT)
    assert client.scheme == "http"
    assert client.base_url == "http://h"


def test_x_forwarded_proto_is_read_case_insensitively_and_first_value_wins():
    client = identify("127.0.0.2", "http", "h", [("X-Forwarded-Proto", "HTTPS, http")], DEFAULT)
    assert client.scheme == "https"


def test_the_first_x_forwarded_host_value_is_the_clients_host():
    client = identify(
        "127.0.0.2", "http", "h", [("X-Forwarded-Host", "public.example, inner:80")], DEFAULT
    )
    assert client.host == "public.example"


def test_base_url_is_the_scheme_and_host_the_client_used():
    assert Client("1.2.3.4", "https", "reg.example:8443", []).base_url == (
        "https://reg.example:8443"
    )
    assert Client("::1", "http", "[::1]:7777", []).base_url == "http://[::1]:7777"


# --- ClientMiddleware -------------------------------------------------------------------------


class _App:
    def __init__(self):
        self.environ = None

    def __call__(self, environ, start_response):
        self.environ = dict(environ)
        start_response("200 OK", [])
        return [b"body"]


def _call(environ, trusted=DEFAULT):
    app = _App()
    started = []
    body = ClientMiddleware(app, trusted)(environ, lambda *a: started.append(a))
    assert body == [b"body"]
    assert started == [("200 OK", [])]
    return app.environ


def test_the_middleware_makes_remote_addr_the_client_behind_a_trusted_balancer():
    seen = _call(
        {
            "REMOTE_ADDR": "127.0.0.2",
            "wsgi.url_scheme": "http",
            "HTTP_HOST": "127.0.0.1:7777",
            "HTTP_X_FORWARDED_FOR": "1.1.1.1, 203.0.113.7",
            "HTTP_X_FORWARDED_PROTO": "https",
            "HTTP_X_FORWARDED_HOST": "public.example",
        }
    )
    assert seen["REMOTE_ADDR"] == "203.0.113.7"
    assert seen["bloblo.peer"] == "127.0.0.2"
    client = seen[ENVIRON_KEY]
    assert isinstance(client, Client)
    assert (client.address, client.scheme, client.host) == (
        "203.0.113.7",
        "https",
        "public.example",
    )
    assert _forwarded(client)["x-forwarded-for"] == "1.1.1.1, 203.0.113.7, 127.0.0.2"


def test_the_middleware_ignores_an_untrusted_peers_forwarding_headers():
    seen = _call(
        {
            "REMOTE_ADDR": "198.51.100.4",
            "wsgi.url_scheme": "https",
            "HTTP_HOST": "reg.example",
            "HTTP_X_FORWARDED_FOR": "127.0.0.1",
            "HTTP_X_FORWARDED_PROTO": "http",
            "HTTP_X_FORWARDED_HOST": "evil.example",
            "HTTP_FORWARDED": "for=127.0.0.1",
        }
    )
    assert seen["REMOTE_ADDR"] == "198.51.100.4"
    assert seen["bloblo.peer"] == "198.51.100.4"
    assert seen[ENVIRON_KEY] == Client(
        "198.51.100.4",
        "https",
        "reg.example",
        [
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "reg.example"),
            ("X-Forwarded-For", "198.51.100.4"),
        ],
    )


def test_the_middleware_uses_server_name_without_a_host_header():
    seen = _call({"REMOTE_ADDR": "198.51.100.4", "SERVER_NAME": "bloblo.local"})
    client = seen[ENVIRON_KEY]
    assert (client.scheme, client.host) == ("http", "bloblo.local")


def test_the_middleware_honours_its_trusted_networks():
    environ = {
        "REMOTE_ADDR": "10.0.0.9",
        "wsgi.url_scheme": "http",
        "HTTP_HOST": "h",
        "HTTP_X_FORWARDED_FOR": "203.0.113.7",
    }
    assert _call(dict(environ), trusted=DEFAULT)["REMOTE_ADDR"] == "10.0.0.9"
    assert _call(dict(environ), trusted=LB_NETS)["REMOTE_ADDR"] == "203.0.113.7"


def test_the_middleware_passes_the_trusted_peers_other_headers_through_untouched():
    seen = _call(
        {
            "REMOTE_ADDR": "127.0.0.1",
            "wsgi.url_scheme": "http",
            "HTTP_HOST": "h",
            "HTTP_AUTHORIZATION": "Bearer t",
        }
    )
    assert seen["HTTP_AUTHORIZATION"] == "Bearer t"
    assert seen["REMOTE_ADDR"] == "127.0.0.1"


def test_a_trusted_balancers_unusable_scheme_is_replaced_by_bloblos_own():
    for proto in ("ftp", ""):
        client = identify(
            "127.0.0.2",
            "http",
            "h",
            [("X-Forwarded-Proto", proto)],
            [ipaddress.ip_network("127.0.0.0/8")],
        )
        assert [v for n, v in client.forwarded if n == "X-Forwarded-Proto"] == ["http"]


def test_an_ipv4_mapped_loopback_peer_is_trusted_like_loopback():
    assert in_networks("::ffff:127.0.0.2", [ipaddress.ip_network("127.0.0.0/8")])
