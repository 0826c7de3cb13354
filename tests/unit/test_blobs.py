"""A blob GET answered beside a fill, on its own: what it leaves on the client's connection
(issue #13, item 6), and a fill that ended published (issue #13 §2)."""

from flask import Flask

from bloblo.blobs import CLIENT_STALL_SECONDS, BlobPolicy
from bloblo.clients import ENVIRON_KEY, Client
from bloblo.config import Settings
from bloblo.evidence import Evidence
from bloblo.fills import Fills
from bloblo.names import BlobRef
from bloblo.proxy import Forwarder
from bloblo.upstream import Upstream
from tests.unit.test_fills import DATA, FakeResponse, RecordingStore, _chunks, _digest

TARGET = f"/v2/team/app/blobs/{_digest(DATA)}"


class ClientSocket:
    """The client's connection as gunicorn hands it to the app: only its timeout matters here."""

    def __init__(self, timeout: float | None):
        self.timeout = timeout

    def gettimeout(self) -> float | None:
        return self.timeout

    def settimeout(self, timeout: float | None) -> None:
        self.timeout = timeout


def _policy_and_fill(tmp_path):
    settings = Settings(spool_dir=str(tmp_path))
    upstream = Upstream(settings)
    fills = Fills(settings, RecordingStore())
    fill = fills.reserve(_digest(DATA))
    assert fill.begin(FakeResponse(_chunks()), len(DATA), [("Content-Type", "x")])
    policy = BlobPolicy(settings, Forwarder(settings, upstream), upstream, store=None, fills=fills)
    return policy, fill


def _answer_from_fill(tmp_path, client_socket, headers=()):
    policy, fill = _policy_and_fill(tmp_path)
    environ = {"gunicorn.socket": client_socket, ENVIRON_KEY: Client("192.0.2.1", "http", "b", [])}
    with Flask(__name__).test_request_context(TARGET, headers=headers, environ_base=environ):
        from flask import request

        response = policy._from_fill(request, fill, TARGET, joiner=False)
    timeout_while_sent = client_socket.timeout
    body = b"".join(response.response)
    response.close()  # what gunicorn does once the body is sent
    fill.done.wait(10)
    return response, body, timeout_while_sent


def test_a_fill_response_bounds_client_stalls_while_it_is_sent_only(tmp_path):
    client_socket = ClientSocket(None)  # gunicorn's gevent worker: a blocking socket
    response, body, timeout_while_sent = _answer_from_fill(tmp_path, client_socket)
    assert (response.status_code, body) == (200, DATA)
    assert timeout_while_sent == CLIENT_STALL_SECONDS
    assert client_socket.timeout is None  # the keep-alive connection is as gunicorn made it


def test_a_ranged_fill_response_gives_the_socket_its_own_timeout_back(tmp_path):
    client_socket = ClientSocket(7.5)
    response, body, _ = _answer_from_fill(tmp_path, client_socket, {"Range": "bytes=10-19"})
    assert (response.status_code, body) == (206, DATA[10:20])
    assert client_socket.timeout == 7.5


class PublishedStore(RecordingStore):
    """A bucket that holds what was uploaded to it, as storage.BlobStore answers for it."""

    def contains(self, digest):
        return str(digest) in self.published

    def canonical_digest(self, digest):
        return None

    def refresh_if_old(self, digest):
        pass

    def presigned_url(self, digest):
        return f"https://s3.example/{digest}"

    def size(self, digest):
        return len(self.published[str(digest)])


def test_a_blob_published_while_its_fill_is_still_listed_is_redirected(tmp_path, monkeypatch):
    """The flaky test of issue #13 §2: the bucket holds the blob a moment before the fill's
    bookkeeping ends (and a follower in another worker keeps it a second longer); a GET then
    must be redirected, not served from the fill."""
    settings = Settings(spool_dir=str(tmp_path), upload_hold_seconds=0)
    upstream, store = Upstream(settings), PublishedStore()
    fills = Fills(settings, store)
    fill = fills.reserve(_digest(DATA))
    assert fill.begin(FakeResponse(_chunks()), len(DATA), [("Content-Type", "x")])
    policy = BlobPolicy(settings, Forwarder(settings, upstream), upstream, store, fills)
    monkeypatch.setattr(policy, "_authorized", lambda req, blob, target: Evidence())
    monkeypatch.setattr(fills, "forget", lambda fill: None)  # its bookkeeping, not over yet
    fill.done.wait(10)
    assert fills.running(fill.digest) is fill and fill.verified
    assert str(fill.digest) in store.published

    environ = {ENVIRON_KEY: Client("192.0.2.1", "http", "b", [])}
    with Flask(__name__).test_request_context(TARGET, environ_base=environ):
        from flask import request

        response = policy.get(request, BlobRef("team/app", fill.digest))
    assert response.status_code == 307
    assert response.headers["Location"] == f"https://s3.example/{fill.digest}"
