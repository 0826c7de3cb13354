"""What the S3 side of a fill costs on its own: CPU seconds per GiB of one 512 MiB upload to
LocalStack, in one gevent-patched process as in a worker, four ways.

    .venv/bin/python -m bench.upload_cpu [ROUNDS]

- `pipe+verify`: as a fill uploads: the spool spliced into a Pipe, read by boto3's
  upload_fileobj through the VerifiedReader (SHA-256 of what S3 receives);
- `pipe`: the same without the hash;
- `memory`: upload_fileobj from an in-memory reader (boto3 alone);
- `plain PUT`: one presigned PUT of the same bytes with http.client (the sockets alone);
- `sha256`: hashlib over the bytes.

Not part of `make bench`: a diagnosis of the CPU target of issue #7 (docs/benchmarks.md).
"""

from gevent import monkey

monkey.patch_all()

import hashlib  # noqa: E402
import http.client  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import urllib.parse  # noqa: E402
from pathlib import Path  # noqa: E402

import boto3  # noqa: E402
import gevent  # noqa: E402
from boto3.s3.transfer import TransferConfig  # noqa: E402

from bloblo.names import parse_digest  # noqa: E402
from bloblo.storage import _client_config, part_size  # noqa: E402
from bloblo.uploads import Pipe, VerifiedReader  # noqa: E402
from tests.stack.s3 import ACCESS_KEY, REGION, SECRET_KEY, S3Server  # noqa: E402

SIZE = 512 * 1024 * 1024
BUCKET = "bench-upload-cpu"
MIB = 1024 * 1024


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _Memory:
    """A non-seekable reader over bytes in memory."""

    def __init__(self, data: bytes):
        self._view, self._at = memoryview(data), 0

    def read(self, size: int = -1) -> bytes:
        size = len(self._view) if size < 0 else size
        chunk = bytes(self._view[self._at : self._at + size])
        self._at += len(chunk)
        return chunk


def main(rounds: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="bloblo-upload-cpu-"))
    try:
        with S3Server(work / "s3") as s3:
            s3.create_bucket(BUCKET)
            client = boto3.session.Session().client(
                "s3",
                endpoint_url=s3.endpoint_url,
                aws_access_key_id=ACCESS_KEY,
                aws_secret_access_key=SECRET_KEY,
                region_name=REGION,
                config=_client_config(path_style=True),
            )
            data = os.urandom(SIZE)
            digest = parse_digest("sha256:" + hashlib.sha256(data).hexdigest())
            spool = work / "spool"
            spool.write_bytes(data)
            part = part_size(SIZE)
            config = TransferConfig(
                multipart_threshold=part, multipart_chunksize=part, max_concurrency=4
            )
            config.max_in_memory_upload_chunks = 4

            def via_pipe(verify: bool) -> None:
                pipe, fd = Pipe(), os.open(spool, os.O_RDONLY)

                def feed() -> None:
                    position = 0
                    while position < SIZE:
                        position += pipe.splice(fd, position, min(8 * MIB, SIZE - position))
                    pipe.finish()

                feeder = gevent.spawn(feed)
                reader = VerifiedReader(pipe, digest, SIZE) if verify else pipe
                client.upload_fileobj(reader, BUCKET, "blob", Config=config)
                feeder.join()
                os.close(fd)
                pipe.close()

            def plain_put() -> None:
                url = urllib.parse.urlsplit(
                    client.generate_presigned_url(
                        "put_object", Params={"Bucket": BUCKET, "Key": "blob"}, ExpiresIn=600
                    )
                )
                connection = http.client.HTTPConnection(url.hostname, url.port)
                connection.putrequest("PUT", f"{url.path}?{url.query}")
                connection.putheader("Content-Length", str(SIZE))
                connection.endheaders()
                view = memoryview(data)
                for at in range(0, SIZE, MIB):
                    connection.send(view[at : at + MIB])
                answer = connection.getresponse()
                answer.read()
                assert answer.status == 200, answer.status
                connection.close()

            ways = {
                "pipe+verify": lambda: via_pipe(True),
                "pipe": lambda: via_pipe(False),
                "memory": lambda: client.upload_fileobj(
                    _Memory(data), BUCKET, "blob", Config=config
                ),
                "plain PUT": plain_put,
                "sha256": lambda: hashlib.sha256(data).hexdigest(),
            }
            for index in range(rounds):
                for name, way in ways.items():
                    before = _cpu()
                    way()
                    print(
                        f"round {index + 1} {name:12s} "
                        f"{(_cpu() - before) / (SIZE / 2**30):.2f} s/GiB",
                        flush=True,
                    )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
