"""Issue #8, part 1: the `bloblo` command: `--version`, and `check`, which says what works and
what to fix in the configuration, the upstream registry and the bucket."""

from __future__ import annotations

import subprocess

from tests.stack.bloblo import REPO, bloblo_env
from tests.stack.cache import bucket_keys
from tests.stack.procs import LOOPBACK, free_port

BLOBLO = REPO / ".venv" / "bin" / "bloblo"


def _bloblo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BLOBLO), *args], env=env, capture_output=True, text=True, timeout=120, cwd=REPO
    )


def test_version_names_the_installed_release():
    result = _bloblo("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == "bloblo, version 0.1.0"


def test_check_passes_against_a_registry_and_a_bucket_that_work(
    plain_registry, s3, bucket, tmp_path
):
    env = bloblo_env(free_port(), plain_registry.url, s3.endpoint_url, bucket, 1, tmp_path, {})
    result = _bloblo("check", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "ok   configuration",
        "ok   upstream",
        "ok   bucket",
        "ok   write",
        "ok   presigned GET",
    ]
    assert len(bucket_keys(s3, bucket)) == 1  # the probe: a blob whose key is its own digest


def test_check_names_what_to_fix_and_fails(s3, tmp_path):
    dead = f"http://{LOOPBACK}:{free_port()}"
    env = bloblo_env(free_port(), dead, s3.endpoint_url, "no-such-bucket-here", 1, tmp_path, {})
    result = _bloblo("check", env=env)
    assert result.returncode == 1
    assert "FAIL upstream" in result.stdout and "BLOBLO_UPSTREAM_URL" in result.stdout
    assert "FAIL bucket" in result.stdout
    assert "Traceback" not in result.stderr

    env["BLOBLO_PRESERVE_HOST"] = "maybe"
    result = _bloblo("check", env=env)
    assert result.returncode == 1
    assert (
        result.stdout.startswith("FAIL configuration") and "BLOBLO_PRESERVE_HOST" in result.stdout
    )
