"""Remembered authorizations: keyed on what identifies the request (issue #6, part 1)."""

import pytest

from bloblo.clients import Client
from bloblo.grants import NO_IDENTITY, Grants

TARGET = "/v2/team/app/blobs/sha256:" + "a" * 64
ALICE = Client("203.0.113.7", "https", "reg.example", [])
MALLORY = Client("198.51.100.66", "https", "reg.example", [])
FORWARDING = [
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "reg.example"),
    ("X-Forwarded-For", "203.0.113.7"),
]
COOKIE = [("Cookie", "session=s3cr3t-cookie-value"), *FORWARDING]
BEARER = [("Authorization", "Bearer tok.en.one"), *FORWARDING]


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def grants(clock):
    return Grants(30, clock)


def test_a_cookie_authorized_request_is_remembered(grants):
    key = grants.key(COOKIE, ALICE, TARGET)
    assert key is not None
    assert not grants.allows(key)
    grants.grant(key)
    assert grants.allows(key)
    assert grants.allows(grants.key(list(COOKIE), ALICE, TARGET))


def test_a_request_without_credentials_is_never_remembered(grants):
    grants.grant(grants.key(COOKIE, ALICE, TARGET))
    assert grants.key(FORWARDING, ALICE, TARGET) is None
    assert not grants.allows(grants.key(FORWARDING, ALICE, TARGET))


@pytest.mark.parametrize(
    "headers",
    [
        [],
        FORWARDING,
        [("Forwarded", "for=203.0.113.7"), ("X-Forwarded-Port", "443")],
        [
            ("User-Agent", "docker/27.0"),
            ("Accept", "*/*"),
            ("Accept-Encoding", "gzip"),
            ("Accept-Language", "en"),
            ("Cache-Control", "no-cache"),
            ("Pragma", "no-cache"),
            ("X-Request-Id", "r1"),
            ("Traceparent", "00-abc-def-01"),
            ("Tracestate", "x=1"),
            ("Host", "reg.example"),
            ("Content-Length", "0"),
            ("Content-Type", "application/json"),
            *FORWARDING,
        ],
    ],
    ids=["nothing", "forwarding", "other-forwarding", "no-identity-headers"],
)
def test_headers_that_carry_no_identity_are_no_credentials(grants, headers):
    assert grants.key(headers, ALICE, TARGET) is None


def test_a_ttl_of_zero_never_remembers(clock):
    grants = Grants(0, clock)
    key = grants.key(COOKIE, ALICE, TARGET)
    assert key is None
    grants.grant(key)
    assert not grants.allows(key)


def test_granting_no_key_remembers_nothing(grants):
    grants.grant(None)
    assert not grants.allows(None)


def test_a_different_authorization_is_a_different_key(grants):
    other = [("Authorization", "Bearer tok.en.two"), *FORWARDING]
    assert grants.key(BEARER, ALICE, TARGET) != grants.key(other, ALICE, TARGET)
    grants.grant(grants.key(BEARER, ALICE, TARGET))
    assert not grants.allows(grants.key(other, ALICE, TARGET))


def test_a_cookie_and_an_authorization_are_different_keys(grants):
    assert grants.key(COOKIE, ALICE, TARGET) != grants.key(BEARER, ALICE, TARGET)


def test_the_same_credentials_from_another_client_address_are_a_different_key(grants):
    grants.grant(grants.key(BEARER, ALICE, TARGET))
    key = grants.key(BEARER, MALLORY, TARGET)
    assert key != grants.key(BEARER, ALICE, TARGET)
    assert not grants.allows(key)


def test_the_same_credentials_for_another_target_are_a_different_key(grants):
    grants.grant(grants.key(BEARER, ALICE, TARGET))
    other = "/v2/team/other/blobs/sha256:" + "a" * 64
    assert not grants.allows(grants.key(BEARER, ALICE, other))


def test_another_identity_carrying_header_is_a_different_key(grants):
    with_tenant = [*BEARER, ("X-Tenant", "blue")]
    assert grants.key(with_tenant, ALICE, TARGET) != grants.key(BEARER, ALICE, TARGET)


def test_requests_differing_only_in_headers_without_identity_share_a_key(grants):
    first = [
        *BEARER,
        ("User-Agent", "docker/27.0"),
        ("Accept", "application/vnd.oci.image.layer.v1.tar"),
        ("Accept-Encoding", "gzip"),
        ("X-Request-Id", "1"),
    ]
    second = [
        *BEARER,
        ("user-agent", "containerd/2.0"),
        ("ACCEPT", "*/*"),
        ("Traceparent", "00-1-2-01"),
    ]
    grants.grant(grants.key(first, ALICE, TARGET))
    assert grants.key(first, ALICE, TARGET) == grants.key(second, ALICE, TARGET)
    assert grants.allows(grants.key(second, ALICE, TARGET))


def test_header_names_are_compared_without_case_and_order_does_not_matter(grants):
    upper = [("AUTHORIZATION", "Bearer tok.en.one"), *reversed(FORWARDING)]
    assert grants.key(upper, ALICE, TARGET) == grants.key(BEARER, ALICE, TARGET)


def test_no_identity_names_are_lowercase():
    assert all(name == name.lower() for name in NO_IDENTITY)


def test_a_remembered_authorization_expires_after_the_ttl(grants, clock):
    key = grants.key(BEARER, ALICE, TARGET)
    grants.grant(key)
    clock.now += 29.9
    assert grants.allows(key)
    clock.now += 0.1
    assert not grants.allows(key)


def test_granting_again_extends_a_remembered_authorization(grants, clock):
    key = grants.key(BEARER, ALICE, TARGET)
    grants.grant(key)
    clock.now += 20
    grants.grant(key)
    clock.now += 20
    assert grants.allows(key)


def test_grants_are_per_instance(clock):
    first, second = Grants(30, clock), Grants(30, clock)
    key = first.key(BEARER, ALICE, TARGET)
    first.grant(key)
    assert not second.allows(key)


@pytest.mark.parametrize(
    "headers",
    [COOKIE, BEARER, [("Authorization", "Basic YWxpY2U6YWxpY2UtcGFzc3dvcmQ="), *FORWARDING]],
)
def test_a_key_never_holds_a_credential_in_the_clear(grants, headers):
    key = grants.key(headers, ALICE, TARGET)
    assert isinstance(key, bytes)
    assert len(key) == 32
    credential = headers[0][1]
    secrets = {credential, credential.split(" ", 1)[-1], credential.split("=", 1)[-1]}
    for secret in (s for s in secrets if len(s) > 8):
        assert secret.encode() not in key
        assert secret.encode() not in key.hex().encode()
    assert ALICE.address.encode() not in key


def test_a_non_utf8_header_value_still_makes_a_key(grants):
    headers = [("Authorization", "Bearer \udcff\udcfe"), *FORWARDING]
    assert grants.key(headers, ALICE, TARGET) is not None


def _keys(grants, prefix, count):
    return [grants.key([("Authorization", f"Bearer {prefix}{i}")], ALICE, TARGET) for i in count]


def test_fresh_authorizations_beyond_the_bound_never_grow_the_memory(clock):
    grants = Grants(30, clock, maxsize=3)
    for key in _keys(grants, "tok", range(10)):
        grants.grant(key)
        assert len(grants) <= 3
    assert len(grants) == 3


def test_the_least_recently_used_authorization_is_forgotten_first(clock):
    grants = Grants(30, clock, maxsize=3)
    first, second, third, fourth = _keys(grants, "tok", range(4))
    for key in (first, second, third):
        grants.grant(key)
    assert grants.allows(first)  # used: now the second is the least recently used
    grants.grant(fourth)
    assert not grants.allows(second)
    assert all(grants.allows(key) for key in (first, third, fourth))


def test_a_full_memory_still_forgets_expired_authorizations(clock):
    grants = Grants(30, clock, maxsize=3)
    stale = _keys(grants, "old", range(3))
    for key in stale:
        grants.grant(key)
    clock.now += 20
    fresh = _keys(grants, "new", range(2))
    for key in fresh:
        grants.grant(key)
    clock.now += 15
    assert len(grants) == 2
    assert all(grants.allows(key) for key in fresh)
    assert not any(grants.allows(key) for key in stale)
