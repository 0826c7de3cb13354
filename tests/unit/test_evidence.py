"""What a blob HEAD proves (issues #6 and #13 §6): the blob's own digest, or a valid digest of
another registered algorithm that the fill must verify too; nothing else authorizes."""

import hashlib

import pytest

from bloblo.evidence import Evidence, evidence_of, vouches_for_cached
from bloblo.names import Digest

DATA = b"a sha512 blob"
SHA512 = Digest("sha512", hashlib.sha512(DATA).hexdigest())
SHA256 = Digest("sha256", hashlib.sha256(DATA).hexdigest())


def test_the_digest_itself_is_plain_evidence_with_the_heads_size():
    assert evidence_of(SHA512, str(SHA512), "13") == Evidence(canonical=None, size=13)


def test_a_digest_of_another_registered_algorithm_is_a_canonical_digest_to_verify_too():
    assert evidence_of(SHA512, str(SHA256), "13") == Evidence(canonical=SHA256, size=13)
    assert evidence_of(SHA256, str(SHA512), None) == Evidence(canonical=SHA512, size=None)


@pytest.mark.parametrize(
    "requested, named",
    [
        pytest.param(SHA512, None, id="none"),
        pytest.param(SHA512, "", id="empty"),
        pytest.param(SHA256, "sha256:" + "0" * 64, id="another-blob-of-the-same-algorithm"),
        pytest.param(SHA512, "sha512:" + "0" * 128, id="another-sha512-blob"),
        pytest.param(SHA512, str(SHA256).upper(), id="upper-case"),
        pytest.param(SHA512, "sha256:" + "0" * 63, id="short"),
        pytest.param(SHA512, "md5:" + "0" * 32, id="unregistered-algorithm"),
        pytest.param(SHA512, "sha384:" + "0" * 96, id="sha384-not-registered"),
        pytest.param(SHA512, f"{SHA256}, {SHA512}", id="two"),
    ],
)
def test_anything_else_never_authorizes(requested, named):
    assert evidence_of(requested, named, "13") is None


@pytest.mark.parametrize("length", [None, "", "-1", "1e3", " 13", "abc"])
def test_a_missing_or_malformed_content_length_is_an_unknown_size(length):
    assert evidence_of(SHA512, str(SHA512), length).size is None


@pytest.mark.parametrize(
    "evidence, cached_canonical, vouches",
    [
        pytest.param(Evidence(), None, True, id="digest-itself-no-pair"),
        pytest.param(Evidence(), str(SHA256), True, id="digest-itself-with-pair"),
        pytest.param(Evidence(SHA256), str(SHA256), True, id="same-canonical"),
        pytest.param(Evidence(SHA256), None, False, id="object-without-pair"),
        pytest.param(Evidence(SHA256), "sha256:" + "0" * 64, False, id="another-canonical"),
    ],
)
def test_a_cached_object_is_vouched_for_only_by_the_digest_or_its_own_pair(
    evidence, cached_canonical, vouches
):
    assert vouches_for_cached(evidence, cached_canonical) is vouches
