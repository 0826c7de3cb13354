"""A small filesystem that really fills up: a tmpfs of a few MiB mounted for one test, so that
bloblo's spool meets ENOSPC without filling a real disk (issue #13 §3)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_filesystem(directory: Path, size: int) -> Iterator[Path]:
    """directory with a tmpfs of `size` bytes mounted on it (created if missing), unmounted on
    exit. tmpfs reserves space for fallocate(FALLOC_FL_KEEP_SIZE) and answers ENOSPC past its
    size. Mounting needs root: without it the test is skipped, except under CI (CI=true), where
    it fails, so that the tests of a full disk never go unrun there."""
    if os.geteuid() != 0 and os.environ.get("CI") != "true":
        pytest.skip("mounting a small tmpfs needs root")
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(directory)],
        check=True,
        capture_output=True,
    )
    try:
        yield directory
    finally:
        subprocess.run(["umount", "--lazy", str(directory)], check=True, capture_output=True)


def fill_up(directory: Path) -> int:
    """Write a file in directory until the filesystem refuses more; the bytes it took."""
    taken = 0
    with open(directory / "filler", "wb", buffering=0) as filler:
        try:
            while True:
                count = filler.write(b"\0" * 65536)
                if not count:
                    break
                taken += count
        except OSError:  # ENOSPC
            pass
    return taken
