"""The spool directory is bloblo's alone (issue #13, part 1): another local user can neither
read a layer while it is filled nor make a worker serve bytes of their own, and bloblo refuses
to start with a spool directory that others could reach."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from bloblo.config import Settings
from tests.stack.bloblo import try_start
from tests.stack.downloads import Download
from tests.stack.images import push_big_blob
from tests.stack.regclient import RegistryClient
from tests.stack.throttle import Throttle

MIB = 1024 * 1024
NOBODY = 65534


def _as_nobody(*command: str) -> subprocess.CompletedProcess:
    """command run as the user nobody (a second local user), its output captured."""
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command],
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture
def shared_tmp():
    """A temporary directory like /tmp (mode 1777, every user may enter it), made in /tmp:
    pytest's own temporary directories are private to their user."""
    path = Path(tempfile.mkdtemp(prefix="bloblo-test-tmp-", dir="/tmp"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path)


def _spools_open(pid: int, directory: Path) -> list[Path]:
    held = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith(str(directory)) and target.endswith(".spool"):
            held.append(Path(target))
    return held


def test_another_local_user_can_neither_read_a_spool_nor_plant_a_fill(
    plain_registry, bucket, start_bloblo, shared_tmp, tmp_path
):
    blob = push_big_blob(
        RegistryClient(plain_registry.url), "team/app", uuid.uuid4().hex[:8], 16 * MIB, tmp_path
    )
    with Throttle(plain_registry.port, bytes_per_second=4 * MIB) as slow_upstream:
        bloblo = start_bloblo(slow_upstream.url, workers=2, TMPDIR=str(shared_tmp))
        directory = shared_tmp / f"bloblo-{os.geteuid()}-{Settings(s3_bucket=bucket).namespace}"
        info = directory.lstat()  # the default: made by bloblo, for bloblo alone
        assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700
        assert info.st_uid == os.geteuid()

        client = Download(f"{bloblo.url}/v2/team/app/blobs/{blob.digest}")
        client.read(at_least=MIB)
        (spool,) = [s for pid in bloblo.worker_pids() for s in _spools_open(pid, directory)]
        assert stat.S_IMODE(spool.stat().st_mode) == 0o600

        reading = _as_nobody("cat", str(spool))
        assert reading.returncode != 0 and reading.stdout == ""
        assert "Permission denied" in reading.stderr
        state = (
            directory
            / f"bloblo-fill-{directory.name.split('-')[-1]}-{blob.digest.split(':')[1]}.json"
        )
        planting = _as_nobody(
            "sh", "-c", f"echo '{{}}' > {state}.planted && mv {state}.planted {state}"
        )
        assert planting.returncode != 0 and "Permission denied" in planting.stderr

        client.read_to_end()
        client.close()
        assert (client.status, client.complete, client.digest) == (200, True, blob.digest)


def _refused(tmp_path, **env: str) -> str:
    result = try_start(tmp_path, "http://127.0.0.1:1", env)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    return result.stderr


@pytest.mark.parametrize(
    ("mode", "owner", "says"),
    [
        (0o755, None, "has mode 0755"),
        (0o770, None, "has mode 0770"),
        (0o700, NOBODY, "belongs to uid 65534"),
    ],
)
def test_start_up_is_refused_when_the_spool_directory_is_not_bloblos_alone(
    tmp_path, mode, owner, says
):
    spool = tmp_path / "spool"
    spool.mkdir()
    spool.chmod(mode)
    if owner is not None:
        os.chown(spool, owner, owner)
    stderr = _refused(tmp_path, BLOBLO_SPOOL_DIR=str(spool))
    assert says in stderr and str(spool) in stderr


def test_start_up_is_refused_when_the_spool_directory_is_a_symbolic_link(tmp_path):
    target = tmp_path / "real"
    target.mkdir(mode=0o700)
    link = tmp_path / "spool"
    link.symlink_to(target)
    assert "is not a directory" in _refused(tmp_path, BLOBLO_SPOOL_DIR=str(link))


def test_start_up_is_refused_when_another_user_made_the_default_directory_first(
    shared_tmp, tmp_path
):
    # try_start caches in the bucket "b-u-c"; a local user guessed the directory's name.
    squatted = shared_tmp / f"bloblo-{os.geteuid()}-{Settings(s3_bucket='b-u-c').namespace}"
    made = _as_nobody("mkdir", "-m", "700", str(squatted))
    assert made.returncode == 0, made.stderr
    stderr = _refused(tmp_path, TMPDIR=str(shared_tmp))
    assert "belongs to uid 65534" in stderr
