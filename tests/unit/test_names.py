"""Repository names and digests follow the OCI distribution spec's grammar."""

import pytest

from bloblo.errors import DigestInvalid, NameInvalid
from bloblo.names import parse_blob_path, parse_digest, parse_name

HEX = "a" * 64


@pytest.mark.parametrize(
    "name", ["app", "team/app", "a/b/c", "my-app", "my__app", "a.b_c--d", "x1"]
)
def test_valid_names_are_accepted(name):
    assert parse_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "App", "a//b", "a/./b", "a/../b", "..", "/a", "a/", "-a", "a_", "a___b", "a" * 256]
)
def test_invalid_names_are_refused(name):
    with pytest.raises(NameInvalid):
        parse_name(name)


def test_registered_digests_are_parsed():
    assert str(parse_digest(f"sha256:{HEX}")) == f"sha256:{HEX}"
    assert parse_digest("sha512:" + "0" * 128).algorithm == "sha512"


@pytest.mark.parametrize(
    "digest",
    [
        "sha256:" + "a" * 63,  # too short
        "sha256:" + "A" * 64,  # uppercase hex
        "sha256:" + "g" * 64,  # not hex
        "md5:" + "a" * 32,  # unregistered algorithm
        "sha256",
        ":" + HEX,
    ],
)
def test_malformed_or_unregistered_digests_are_refused(digest):
    with pytest.raises(DigestInvalid):
        parse_digest(digest)


def test_blob_paths_are_recognised_and_other_paths_are_not():
    blob = parse_blob_path(f"team/app/blobs/sha256:{HEX}")
    assert (blob.name, str(blob.digest)) == ("team/app", f"sha256:{HEX}")
    assert blob.path == f"/v2/team/app/blobs/sha256:{HEX}"
    assert parse_blob_path("team/app/blobs/uploads/") is None
    assert parse_blob_path("team/app/blobs/uploads/1234-abcd") is None
    assert parse_blob_path("team/app/manifests/latest") is None


@pytest.mark.parametrize("name", ["team\napp", "team\r\napp", "team\x00app", "team/app\n"])
def test_a_blob_path_whose_name_holds_a_control_character_is_refused(name):
    with pytest.raises(NameInvalid):  # a line feed too: it is a blob path (issue #14 §3)
        parse_blob_path(f"{name}/blobs/sha256:{HEX}")


def test_a_blob_path_with_dot_dot_is_refused_before_reaching_anything():
    with pytest.raises(NameInvalid):
        parse_blob_path(f"team/../secret/blobs/sha256:{HEX}")
