"""Fixtures that start the real stack: S3 (LocalStack), docker-registry in each auth mode, a
token issuer, dockerd, and bloblo itself. Every process is stopped by PID at teardown."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable, Iterator, Sequence

import pytest

from tests.stack.bloblo import BlobloServer
from tests.stack.dockerd import Dockerd
from tests.stack.fake_upstream import FakeUpstream, Reply
from tests.stack.images import (  # noqa: F401 (helpers re-exported for test modules)
    Image,
    assert_same_image,
    build_image,
    unique_tag,
)
from tests.stack.procs import stop_all
from tests.stack.registry import Registry
from tests.stack.s3 import S3Server
from tests.stack.tokens import TokenIssuer

ALICE = ("alice", "alice-password")
BOB = ("bob", "bob-password")
TOKEN_USERS = {
    ALICE[0]: {
        "password": ALICE[1],
        "grants": {"team/app": ["pull", "push"], "shared/base": ["pull", "push"]},
    },
    BOB[0]: {"password": BOB[1], "grants": {"other/thing": ["pull", "push"]}},
}


def pytest_configure(config: pytest.Config) -> None:
    """Register the `slow` marker (deselect with -m 'not slow')."""
    config.addinivalue_line("markers", "slow: a long test (big blobs, many clients)")


@pytest.fixture(scope="session")
def alice() -> tuple[str, str]:
    """alice's (user, password): she may pull/push team/app and shared/base."""
    return ALICE


@pytest.fixture(scope="session")
def bob() -> tuple[str, str]:
    """bob's (user, password): he may pull/push other/thing only (token registry)."""
    return BOB


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One S3 server (LocalStack, or moto without LocalStack's venv) for the session."""
    with S3Server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture
def bucket(s3: S3Server) -> str:
    """A fresh, empty bucket for this test."""
    return s3.create_bucket(f"bloblo-{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="session")
def plain_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A docker-registry without auth."""
    with Registry(tmp_path_factory.mktemp("registry-plain")) as registry:
        yield registry


@pytest.fixture(scope="session")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A docker-registry with htpasswd (basic) auth for alice and bob."""
    users = dict([ALICE, BOB])
    with Registry(tmp_path_factory.mktemp("registry-basic"), users=users) as registry:
        yield registry


@pytest.fixture(scope="session")
def token_issuer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenIssuer]:
    """A token issuer: alice may pull/push team/app and shared/base, bob other/thing."""
    with TokenIssuer(tmp_path_factory.mktemp("token-issuer"), TOKEN_USERS) as issuer:
        yield issuer


@pytest.fixture(scope="session")
def token_registry(
    tmp_path_factory: pytest.TempPathFactory, token_issuer: TokenIssuer
) -> Iterator[Registry]:
    """A docker-registry with token auth trusting `token_issuer`."""
    with Registry(tmp_path_factory.mktemp("registry-token"), token=token_issuer) as registry:
        yield registry


@pytest.fixture(params=["plain", "basic", "token"])
def any_registry(request: pytest.FixtureRequest) -> tuple[Registry, tuple[str, str] | None]:
    """(registry, creds) for each auth mode in turn: creds may push and pull team/app
    (None for the registry without auth)."""
    registry = request.getfixturevalue(f"{request.param}_registry")
    return registry, None if request.param == "plain" else ALICE


@pytest.fixture(scope="session")
def dockerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dockerd]:
    """A private dockerd, started the first time a test asks for it."""
    with Dockerd(tmp_path_factory.mktemp("dockerd")) as daemon:
        yield daemon


@pytest.fixture
def make_image(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Image]:
    """Factory: make_image(layers=[sizes], tag="latest", seed=None) builds a fresh image of
    random layers (so no client has any of its layers yet) in a new temp dir."""
    counter = itertools.count()

    def make(layers: Sequence[int] = (4096, 8192), tag: str = "latest", **kwargs) -> Image:
        directory = tmp_path_factory.mktemp(f"image{next(counter)}")
        return build_image(directory, layers, tag=tag, **kwargs)

    return make


@pytest.fixture
def recording_upstream() -> Iterator[FakeUpstream]:
    """A fake upstream that records every request and answers each with 200 "ok"."""
    with FakeUpstream(lambda seen: Reply(200, [("Content-Type", "text/plain")], b"ok")) as up:
        yield up


@pytest.fixture
def start_bloblo(
    tmp_path_factory: pytest.TempPathFactory, s3: S3Server, bucket: str
) -> Iterator[Callable[..., BlobloServer]]:
    """Factory: start_bloblo(registry, workers=1, bucket_name=None, command_prefix=(), **env)
    starts bloblo in front of `registry` (a Registry or a URL), caching in this test's `bucket`
    unless another is named, uploading at once (BLOBLO_UPLOAD_HOLD_SECONDS=0) unless `env`
    says otherwise, with extra environment `env` (and gunicorn run through
    command_prefix, e.g. limits.file_size_limit()); all of them stop at teardown."""
    servers: list[BlobloServer] = []

    def start(
        registry,
        workers: int = 1,
        bucket_name: str | None = None,
        command_prefix: Sequence[str] = (),
        **env: str,
    ) -> BlobloServer:
        server = BlobloServer(
            tmp_path_factory.mktemp("bloblo"),
            upstream_url=getattr(registry, "url", registry),
            s3_endpoint_url=s3.endpoint_url,
            bucket=bucket_name or bucket,
            workers=workers,
            # Uploads at once unless a test says otherwise: most tests wait for the bucket,
            # and the hold (a quiet second at least) cost the suite 2.5 minutes. The hold's
            # own tests and the end-to-end pull in test_offload set it.
            env={"BLOBLO_UPLOAD_HOLD_SECONDS": "0", **env},
            command_prefix=command_prefix,
        )
        servers.append(server)
        return server

    try:
        yield start
    finally:
        stop_all(servers)
