"""Issue #8, part 2: `bloblo warm REF ...` fills the bucket with an image's blobs before any
client asks, through the proxy's verified fills, so that the first pull is already redirected."""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import pty
import struct
import subprocess
import termios
import uuid
from pathlib import Path

import pytest

from tests.stack.bloblo import REPO, bloblo_env
from tests.stack.cache import bucket_keys, cached
from tests.stack.fake_upstream import FakeUpstream, Reply, Seen
from tests.stack.images import push, push_index
from tests.stack.procs import free_port, local_session
from tests.stack.regclient import DOCKER_LIST, OCI_INDEX, OCI_MANIFEST, RegistryClient

BLOBLO = REPO / ".venv" / "bin" / "bloblo"


def _warm(
    registry, s3, bucket: str, tmp_path: Path, *args: str, stdin: str = "", **extra: str
) -> subprocess.CompletedProcess:
    """Run `bloblo warm ARGS` against registry and bucket; HOME is tmp_path (no docker login
    of this machine's user leaks in), extra is more environment."""
    return subprocess.run(
        [str(BLOBLO), "warm", *args],
        env=_env(registry, s3, bucket, tmp_path, extra),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


def _env(registry, s3, bucket: str, tmp_path: Path, extra: dict[str, str]) -> dict[str, str]:
    env = bloblo_env(free_port(), registry.url, s3.endpoint_url, bucket, 1, tmp_path, extra)
    if "DOCKER_CONFIG" not in extra:
        env.pop("DOCKER_CONFIG", None)
    return env


def _warm_on_a_terminal(registry, s3, bucket: str, tmp_path: Path, *args: str) -> tuple[str, str]:
    """Run `bloblo warm ARGS` with stderr on a pseudo-terminal: (stdout, what the terminal got)."""
    terminal, stderr = pty.openpty()
    # A new terminal is 0 columns wide, and tqdm draws a 0-column bar: give it 120.
    fcntl.ioctl(stderr, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    try:
        result = subprocess.run(
            [str(BLOBLO), "warm", *args],
            env=_env(registry, s3, bucket, tmp_path, {}),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            timeout=120,
            cwd=REPO,
        )
        os.close(stderr)
        shown = b""
        while True:
            try:
                chunk = os.read(terminal, 65536)
            except OSError:  # EIO: the terminal's other side is closed and drained
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(terminal)
    assert result.returncode == 0, shown
    return result.stdout, shown.decode(errors="replace")


def _repo() -> str:
    return f"warm/r{uuid.uuid4().hex[:10]}"


def _digests(image) -> list[str]:
    return [image.config_digest, *image.layer_digests]


def _assert_cached(s3, bucket: str, image) -> None:
    for digest in _digests(image):
        data = cached(s3, bucket, digest)
        assert data is not None, f"{digest} is not in the bucket"
        assert "sha256:" + hashlib.sha256(data).hexdigest() == digest


def _summary(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_warm_copies_every_blob_then_finds_them_cached_and_bloblo_redirects_to_them(
    plain_registry, s3, bucket, make_image, start_bloblo, tmp_path
):
    image, repo = make_image(layers=[3000, 70_000]), _repo()
    push(image, plain_registry.host, repo)
    total = sum(layer.size for layer in image.layers) + len(image.blob_bytes(image.config_digest))

    first = _warm(plain_registry, s3, bucket, tmp_path, f"{repo}:{image.tag}", "--jobs", "2")
    assert first.returncode == 0, first.stderr
    assert _summary(first) == f"3 blobs: 3 copied, 0 already cached, 0 failed; {total} bytes copied"
    _assert_cached(s3, bucket, image)
    assert len(bucket_keys(s3, bucket)) == 3

    again = _warm(plain_registry, s3, bucket, tmp_path, f"{repo}@{image.manifest_digest}")
    assert again.returncode == 0, again.stderr
    assert _summary(again) == "3 blobs: 0 copied, 3 already cached, 0 failed; 0 bytes copied"

    bloblo = start_bloblo(plain_registry)
    with local_session() as session:
        for digest in _digests(image):
            answer = session.get(f"{bloblo.url}/v2/{repo}/blobs/{digest}", allow_redirects=False)
            assert answer.status_code == 307, digest


def test_warm_draws_a_progress_bar_of_bytes_and_blobs_on_a_terminal(
    plain_registry, s3, bucket, make_image, tmp_path
):
    image, repo = make_image(layers=[5000]), _repo()
    push(image, plain_registry.host, repo)
    stdout, terminal = _warm_on_a_terminal(plain_registry, s3, bucket, tmp_path, repo + ":latest")
    assert stdout.startswith("2 blobs: 2 copied")
    assert "blobs 2/2" in terminal and "100%" in terminal and "B/s" in terminal
    assert "blobs:" not in terminal  # the summary goes to stdout only


def test_warm_of_an_index_fills_the_platforms_asked_for_or_all(
    plain_registry, s3, bucket, make_image, tmp_path
):
    amd64, arm64, repo = make_image(layers=[2000]), make_image(layers=[2500]), _repo()
    client = RegistryClient(plain_registry.url)
    push_index(client, repo, "multi", [(amd64, "linux/amd64"), (arm64, "linux/arm64/v8")])
    client.close()

    only = _warm(plain_registry, s3, bucket, tmp_path, f"{repo}:multi", "--platform", "linux/amd64")
    assert only.returncode == 0, only.stderr
    assert _summary(only).startswith("2 blobs: 2 copied, 0 already cached, 0 failed")
    assert sorted(bucket_keys(s3, bucket)) == sorted(
        "blobs/" + d.replace(":", "/") for d in _digests(amd64)
    )

    every = _warm(plain_registry, s3, bucket, tmp_path, f"{repo}:multi")
    assert every.returncode == 0, every.stderr
    assert _summary(every).startswith("4 blobs: 2 copied, 2 already cached, 0 failed")
    _assert_cached(s3, bucket, arm64)

    # A platform the index lacks is a failure, as with `docker pull --platform`: not silence.
    none = _warm(plain_registry, s3, bucket, tmp_path, f"{repo}:multi", "--platform", "linux/s390x")
    assert none.returncode == 1
    assert "no manifest for linux/s390x" in none.stderr and "linux/arm64/v8" in none.stderr
    assert _summary(none).startswith("1 blobs: 0 copied, 0 already cached, 1 failed")


def test_warm_pulls_with_a_password_from_stdin_or_docker_login_and_never_shows_it(
    token_registry, alice, s3, bucket, make_image, tmp_path
):
    image = make_image(layers=[1000])
    push(image, token_registry.host, "team/app", tag="warm", creds=alice)
    user, password = alice

    with_stdin = _warm(
        token_registry, s3, bucket, tmp_path, "team/app:warm", "--username", user,
        "--password-stdin", stdin=password + "\n",
    )  # fmt: skip
    assert with_stdin.returncode == 0, with_stdin.stderr
    assert _summary(with_stdin).startswith("2 blobs: 2 copied")
    _assert_cached(s3, bucket, image)

    docker = tmp_path / "docker"
    docker.mkdir()
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    config = {"auths": {"https://index.docker.io/v1/": {"auth": "eDp5"}, token_registry.url: {}}}
    config["auths"][token_registry.url] = {"auth": auth}
    (docker / "config.json").write_text(json.dumps(config))
    logged_in = _warm(
        token_registry, s3, bucket, tmp_path, "team/app:warm", DOCKER_CONFIG=str(docker)
    )
    assert logged_in.returncode == 0, logged_in.stderr
    assert _summary(logged_in).startswith("2 blobs: 0 copied, 2 already cached, 0 failed")

    wrong = _warm(
        token_registry, s3, bucket, tmp_path, "team/app:warm", "--username", user,
        "--password-stdin", stdin="not-" + password,
    )  # fmt: skip
    assert wrong.returncode == 1
    assert "refused the credentials" in wrong.stderr
    assert _summary(wrong) == "1 blobs: 0 copied, 0 already cached, 1 failed; 0 bytes copied"
    for result in (with_stdin, logged_in, wrong):
        assert password not in result.stdout + result.stderr
        assert auth not in result.stdout + result.stderr


def test_a_missing_tag_fails_with_the_registrys_reason(plain_registry, s3, bucket, tmp_path):
    result = _warm(plain_registry, s3, bucket, tmp_path, f"{_repo()}:nope")
    assert result.returncode == 1
    assert _summary(result) == "1 blobs: 0 copied, 0 already cached, 1 failed; 0 bytes copied"
    assert "MANIFEST_UNKNOWN" in result.stderr or "NAME_UNKNOWN" in result.stderr
    assert bucket_keys(s3, bucket) == []


def test_a_blob_the_registry_lost_fails_and_the_others_are_still_copied(
    plain_registry, s3, bucket, make_image, tmp_path
):
    image, repo = make_image(layers=[1500, 2500]), _repo()
    push(image, plain_registry.host, repo)
    lost = image.layers[0].digest
    algorithm, hex_ = lost.split(":")
    storage = plain_registry.workdir / "storage" / "docker" / "registry" / "v2" / "blobs"
    (storage / algorithm / hex_[:2] / hex_ / "data").unlink()

    result = _warm(plain_registry, s3, bucket, tmp_path, f"{repo}:{image.tag}")
    assert result.returncode == 1
    assert _summary(result).startswith("3 blobs: 2 copied, 0 already cached, 1 failed")
    assert f"FAIL {lost}" in result.stderr
    assert cached(s3, bucket, lost) is None
    assert cached(s3, bucket, image.layers[1].digest) is not None
    assert cached(s3, bucket, image.config_digest) is not None


@pytest.mark.parametrize(
    "ref", ["registry.example.com:5000/team/app:1", "Team/App:1", "team/app@sha256:123"]
)
def test_a_reference_warm_cannot_use_is_a_usage_error(plain_registry, s3, tmp_path, ref):
    result = _warm(plain_registry, s3, "unused", tmp_path, ref)
    assert result.returncode == 2
    assert ref in result.stderr and "Traceback" not in result.stderr


def test_warm_answers_a_basic_challenge_and_says_when_credentials_are_missing(
    basic_registry, alice, s3, bucket, make_image, tmp_path
):
    image = make_image(layers=[1200])
    push(image, basic_registry.host, "team/app", tag="warm-basic", creds=alice)
    user, password = alice
    logged_in = _warm(
        basic_registry, s3, bucket, tmp_path, "team/app:warm-basic", "--username", user,
        "--password-stdin", stdin=password,
    )  # fmt: skip
    assert logged_in.returncode == 0, logged_in.stderr
    assert _summary(logged_in).startswith("2 blobs: 2 copied")

    anonymous = _warm(basic_registry, s3, bucket, tmp_path, "team/app:warm-basic")
    assert anonymous.returncode == 1
    assert "--password-stdin" in anonymous.stderr


def test_a_blob_redirected_to_another_origin_is_not_cacheable(s3, bucket, tmp_path):
    config = b'{"architecture": "amd64", "os": "linux"}'
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "c", "digest": config_digest, "size": len(config)},
            "layers": [],
        }
    ).encode()

    def answer(seen: Seen) -> Reply:
        if "/manifests/" in seen.target:
            return Reply(200, [("Content-Type", OCI_MANIFEST)], manifest)
        return Reply(307, [("Location", "http://127.0.0.2:9/elsewhere")])

    with FakeUpstream(answer) as upstream:
        result = _warm(upstream, s3, bucket, tmp_path, "team/app:1")
    assert result.returncode == 1
    assert "another origin" in result.stderr and "not cacheable" in result.stderr
    assert _summary(result).startswith("1 blobs: 0 copied, 0 already cached, 1 failed")
    manifest_get, blob_get = upstream.seen  # the redirect was not followed
    accepted = manifest_get.header_values("Accept")[0]
    assert all(media_type in accepted for media_type in (OCI_MANIFEST, OCI_INDEX, DOCKER_LIST))
    assert blob_get.target == f"/v2/team/app/blobs/{config_digest}"
    assert blob_get.header_values("Accept-Encoding") == ["identity"]


def _one_layer_upstream(layer: bytes, served: bytes, size: int | None = None):
    """A fake upstream with one image: its layer's descriptor names layer's digest (and size,
    unless another is given), and its blob GET sends served."""
    config = b'{"architecture": "amd64", "os": "linux"}'
    digests = {
        "config": "sha256:" + hashlib.sha256(config).hexdigest(),
        "layer": "sha256:" + hashlib.sha256(layer).hexdigest(),
    }
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "c", "digest": digests["config"], "size": len(config)},
            "layers": [{"mediaType": "l", "digest": digests["layer"], "size": size or len(layer)}],
        }
    ).encode()

    def answer(seen: Seen) -> Reply:
        if "/manifests/" in seen.target:
            return Reply(200, [("Content-Type", OCI_MANIFEST)], manifest)
        body = config if seen.target.endswith(digests["config"]) else served
        return Reply(200, [("Content-Type", "application/octet-stream")], body)

    return FakeUpstream(answer), digests


def test_a_registry_that_sends_a_wrong_blob_gets_nothing_published(s3, bucket, tmp_path):
    layer = os.urandom(300_000)
    wrong = bytearray(layer)
    wrong[1000] ^= 1  # one bit: the same length, another digest
    upstream, digests = _one_layer_upstream(layer, bytes(wrong))
    with upstream:
        result = _warm(upstream, s3, bucket, tmp_path, "team/app:1")
    assert result.returncode == 1
    assert f"FAIL {digests['layer']}" in result.stderr and "content hashes to" in result.stderr
    assert _summary(result).startswith("2 blobs: 1 copied, 0 already cached, 1 failed")
    assert cached(s3, bucket, digests["layer"]) is None  # the fill verified it: not published
    assert cached(s3, bucket, digests["config"]) is not None


def test_a_blob_whose_size_is_not_the_manifests_fails(s3, bucket, tmp_path):
    layer = os.urandom(10_000)
    upstream, digests = _one_layer_upstream(layer, layer, size=20_000)
    with upstream:
        result = _warm(upstream, s3, bucket, tmp_path, "team/app:1")
    assert result.returncode == 1
    assert "the registry sends 10000 bytes, the manifest says 20000" in result.stderr
    assert _summary(result).endswith("1 failed; 40 bytes copied")  # the config alone
    assert cached(s3, bucket, digests["layer"]) is None


def test_blobs_wait_for_spool_room_instead_of_failing(
    plain_registry, s3, bucket, make_image, tmp_path
):
    mib = 1024 * 1024
    image = make_image(layers=[3 * mib, 3 * mib, 3 * mib, 3 * mib])
    repo = _repo()
    push(image, plain_registry.host, repo, tag="big")
    result = _warm(
        plain_registry, s3, bucket, tmp_path, f"{repo}:big", "--jobs", "4",
        BLOBLO_SPOOL_MAX_MB="7",  # room for two layers at once, of four
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert _summary(result).startswith("5 blobs: 5 copied, 0 already cached, 0 failed")
    _assert_cached(s3, bucket, image)
