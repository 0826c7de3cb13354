"""A blob GET answered beside a fill, on its own: a fill that ended published (issue #13 §2).
What an answer leaves on the client's connection (issue #13, item 6) is test_connections.py's."""

from flask import Flask

from bloblo.blobs import BlobPolicy
from bloblo.clients import ENVIRON_KEY, Client
from bloblo.config import Settings
from bloblo.evidence import Evidence
from bloblo.fills import Fills
from bloblo.names import BlobRef
from bloblo.proxy import Forwarder
from bloblo.upstream import Upstream
from tests.unit.test_fills import DATA, FakeResponse, RecordingStore, _chunks, _digest

TARGET = f"/v2/team/app/blobs/{_digest(DATA)}"


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
