"""The request target: hostile ones are refused, the rest say what they name (issue #6)."""

import re
from urllib.parse import unquote

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from bloblo.errors import DigestInvalid, NameInvalid, PathInvalid, RegistryError
from bloblo.names import NAME_RE, BlobRef, Digest
from bloblo.targets import Route, check_target, route, target_path

HEX = "a" * 64
DIGEST = f"sha256:{HEX}"
BLOB = BlobRef("team/app", Digest("sha256", HEX))
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "get"]

# Every spelling of a dot segment: raw, percent-encoded in either case, half-encoded, followed
# by an encoded slash or by a ';parameter'.
DOTS = [".", "..", "%2e", "%2E", "%2e%2e", "%2E%2E", "%2e%2E", ".%2e", ".%2E", "%2e.", "%2E."]
DOTS += ["..%2f", "..%2F", "%2e%2e%2fx", "..;", "..;x=1", "%2e%2e;x", ".%2e%3bx", ".;"]


@pytest.mark.parametrize("dots", DOTS)
@pytest.mark.parametrize(
    "template", ["/v2/{}/admin/", "/v2/team/{}/app/manifests/x", "/v2/team/app/blobs/{}"]
)
def test_dot_segments_under_v2_are_name_invalid(dots, template):
    with pytest.raises(NameInvalid):
        route(template.format(dots), "GET")


@pytest.mark.parametrize("dots", DOTS)
@pytest.mark.parametrize("template", ["/{}/etc/passwd", "/service/{}/admin", "/a/{}"])
def test_dot_segments_elsewhere_are_path_invalid(dots, template):
    with pytest.raises(PathInvalid) as caught:
        route(template.format(dots), "GET")
    assert (caught.value.status, caught.value.code) == (400, "PATH_INVALID")


@pytest.mark.parametrize(
    ("target", "error"),
    [
        ("/v2/../admin/", NameInvalid),
        ("/v2/..", NameInvalid),
        ("/v2/.", NameInvalid),
        ("/..", PathInvalid),
        ("/.", PathInvalid),
        ("/v2%2f..", PathInvalid),  # not under /v2/ as sent, and the decoded path has '..'
        ("/v2/x/..#/y", NameInvalid),  # the fragment is dropped: the upstream would see /v2/x/..
        ("/v2/team/app/manifests/x#/../..", NameInvalid),  # some servers keep what follows '#'
        ("/service/x#/../admin", PathInvalid),
    ],
)
def test_dot_segments_at_either_end(target, error):
    with pytest.raises(error):
        route(target, "GET")


@pytest.mark.parametrize(
    ("target", "error"),
    [
        ("/v2/team%2Fapp/manifests/x", NameInvalid),
        ("/v2/team%2fapp/manifests/x", NameInvalid),
        ("/v2/team/app/tags/list%2F", NameInvalid),
        ("/v2/team/app/blobs/uploads/uuid%2Fx", NameInvalid),
        ("/v2/team/app/blobs/sha256%3Aabc%2Fdef", DigestInvalid),
        ("/v2/team/app/blobs/%2F", DigestInvalid),
        (f"/v2/team/app/blob%73/{DIGEST}%2f", DigestInvalid),
    ],
)
def test_encoded_slash_under_v2_is_refused(target, error):
    with pytest.raises(error):
        route(target, "GET")


@pytest.mark.parametrize(
    "target", ["", "*", "http://host/v2/", "https://host/../x", "v2/", "?x=1", "#x", " /v2/"]
)
def test_a_target_that_is_not_a_path_is_path_invalid(target):
    with pytest.raises(PathInvalid):
        route(target, "GET")


def test_the_detail_names_the_path_and_never_the_query():
    with pytest.raises(NameInvalid) as caught:
        route("/v2/../admin?_state=SECRET", "GET")
    assert caught.value.detail == {"path": "/v2/../admin"}
    assert "SECRET" not in caught.value.message


@pytest.mark.parametrize(
    ("target", "registry_api"),
    [
        ("/service/token?x=..", False),
        ("/service/token?scope=repository:a/../b:pull&x=%2e%2e%2f", False),
        ("/v2/team/app/manifests/latest?ns=../x", True),
        ("/v2/team/app/blobs/uploads/uuid", True),
        ("/v2/team/app/blobs/uploads/uuid?_state=a%2Fb..&digest=sha256%3Ax", True),
        ("/v2/team/app/tags/list?n=10&last=..", True),
        ("/v2/team/app/manifests/a..b", True),
        ("/v2/team/app/manifests/...", True),
        ("/v2/", True),
        ("/v2/?x=1", True),
        ("/v2//x/manifests/y", True),
        ("/v2", False),
        ("/v2?x", False),
        ("/", False),
        ("/healthz", False),
        ("/a%2Fb", False),  # an encoded slash outside /v2/ is the registry's to judge
        ("/%zz/%/%e9/\u00e9", False),
    ],
)
def test_targets_that_pass_are_forwarded(target, registry_api):
    for method in METHODS:
        assert route(target, method) == Route(registry_api=registry_api)


def test_a_blob_get_names_its_blob():
    assert route(f"/v2/team/app/blobs/{DIGEST}", "GET") == Route(registry_api=True, blob=BLOB)
    assert route(f"/v2/team/app/blobs/{DIGEST}?ns=x", "GET").blob == BLOB
    assert route(f"/v2/team/app/blobs/sha256%3A{HEX}", "GET").blob == BLOB
    assert route(f"/v2/te%61m/app/blobs/{DIGEST}", "GET").blob == BLOB


@pytest.mark.parametrize("method", ["HEAD", "DELETE", "PUT", "get"])
def test_only_a_get_of_a_blob_path_is_a_blob(method):
    assert route(f"/v2/team/app/blobs/{DIGEST}", method) == Route(registry_api=True)


@pytest.mark.parametrize(
    ("target", "error"),
    [
        (f"/v2//x/blobs/{DIGEST}", NameInvalid),
        (f"/v2/Team/app/blobs/{DIGEST}", NameInvalid),
        ("/v2/team/app/blobs/sha256:abc", DigestInvalid),
        (f"/v2/team/app/blobs/md5:{HEX}", DigestInvalid),
    ],
)
def test_a_malformed_blob_get_is_refused(target, error):
    with pytest.raises(error):
        route(target, "GET")


def test_target_path_stops_at_query_or_fragment():
    assert target_path("/v2/a?b#c") == "/v2/a"
    assert target_path("/v2/a#b?c") == "/v2/a"
    assert target_path("") == ""
    assert check_target("/v2/a/b?c=..") == "/v2/a/b"


# Properties. A target route lets through has a path with no dot segment once decoded, and a
# blob it names is exactly the decoded path; whatever it refuses, it refuses with a 400.


def check(target: str, method: str) -> None:
    path = re.split(r"[?#]", target, maxsplit=1)[0]
    secret = target[len(path) :]
    try:
        result = route(target, method)
    except RegistryError as exc:
        assert exc.status == 400
        if secret and secret not in path:
            assert secret not in repr(exc.detail) + exc.message
        return
    decoded = unquote(path)
    assert "#" not in target, f"a fragment let through: {target!r}"
    assert path.startswith("/")
    assert not {".", ".."} & set(decoded.split("/")), f"dot segment let through: {target!r}"
    assert result.registry_api == path.startswith("/v2/")
    if result.registry_api:
        assert all("/" not in unquote(segment) for segment in path.split("/"))
    if result.blob is not None:
        assert method == "GET"
        assert decoded == f"/v2/{result.blob.name}/blobs/{result.blob.digest}"


SEGMENTS = [".", "..", "%2e", "%2E", ".%2e", "%2E.", "%2e%2e", "..;x", "%2f", "%2F", "a%2Fb"]
SEGMENTS += ["..%2f", "", "v2", "team", "app", "Team", "blobs", "uploads", "manifests", "latest"]
SEGMENTS += [DIGEST, f"sha256%3A{HEX}", f"sha256%3a{HEX}", "sha256:abc", "%zz", "%", "%e9", "\x00"]
QUERIES = ["", "?", "?ns=x", "?_state=SECRET..%2F", "?x=/../", "#/../", "#frag?_state=SECRET"]


@st.composite
def plausible_targets(draw) -> str:
    prefixes = ["/v2/", "/v2/team/app/blobs/", f"/v2/team/app/blobs/{DIGEST}", "/", "/v2", ""]
    prefix = draw(st.sampled_from([*prefixes, "/service/"]))
    segments = draw(st.lists(st.sampled_from(SEGMENTS), max_size=6))
    return prefix + "/".join(segments) + draw(st.sampled_from(QUERIES))


@settings(max_examples=400, deadline=None)
@given(st.text(), st.sampled_from(METHODS))
@example("/v2/%2e%2e/x", "GET")
def test_any_text_is_routed_or_refused_with_a_400(target, method):
    check(target, method)


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet="/.%2eEfF3aA?#;v:bs"), st.sampled_from(METHODS))
def test_text_of_the_hostile_characters_is_routed_or_refused_with_a_400(target, method):
    check(target, method)


@settings(max_examples=500, deadline=None)
@given(plausible_targets(), st.sampled_from(["GET", "GET", "HEAD", "POST"]))
def test_plausible_targets_are_routed_or_refused_with_a_400(target, method):
    check(target, method)


@st.composite
def names(draw) -> str:
    """Repository names of the spec's grammar: components joined by '.', '_', '__' or '-'s."""
    components = []
    for _ in range(draw(st.integers(1, 3))):
        words = draw(st.lists(st.text("az09", min_size=1, max_size=4), min_size=1, max_size=3))
        joined = words[0]
        for word in words[1:]:
            joined += draw(st.sampled_from([".", "_", "__", "-", "--"])) + word
        components.append(joined)
    name = "/".join(components)
    assert NAME_RE.fullmatch(name)
    return name


@st.composite
def encoded(draw, text: str) -> str:
    """text with some characters other than '/' percent-encoded, in either case."""
    out = []
    for char in text:
        spelling = draw(st.sampled_from(["", "%{:02x}", "%{:02X}"]))
        out.append(spelling.format(ord(char)) if spelling and char != "/" else char)
    return "".join(out)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_every_spelling_of_a_valid_blob_get_names_that_blob(data):
    name = data.draw(names())
    digest = Digest(
        "sha256", data.draw(st.text(alphabet="0123456789abcdef", min_size=64, max_size=64))
    )
    target = "/v2/" + data.draw(encoded(f"{name}/blobs/{digest}"))
    query = data.draw(st.sampled_from([q for q in QUERIES if "#" not in q]))
    assert route(target + query, "GET") == Route(registry_api=True, blob=BlobRef(name, digest))
