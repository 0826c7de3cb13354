"""Spool files: every write and read moves every byte or raises; a budget per worker; the disk a
spool needs is reserved when it opens, or the spool is refused (issue #13 §3)."""

import errno
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from bloblo.spool import SpoolBudget, SpoolDiskFull, SpoolError, open_spool
from tests.stack.disks import fill_up, small_filesystem

MIB = 1024 * 1024


def test_bytes_read_back_as_written_and_the_budget_comes_back_on_close(tmp_path):
    budget = SpoolBudget(100)
    spool = open_spool(str(tmp_path), 60, budget)
    assert budget.used == 60
    spool.append(b"a" * 30)
    spool.append(memoryview(b"b" * 30))
    assert spool.read(25, 10) == b"aaaaabbbbb"
    spool.close()
    spool.close()
    assert budget.used == 0


def test_a_blob_larger_than_the_budget_left_gets_no_spool(tmp_path):
    budget = SpoolBudget(100)
    assert open_spool(str(tmp_path), 60, budget) is not None
    assert open_spool(str(tmp_path), 41, budget) is None
    assert budget.used == 60


def test_a_missing_directory_is_a_spool_error_and_takes_no_budget(tmp_path):
    budget = SpoolBudget(100)
    with pytest.raises(SpoolError):
        open_spool(str(tmp_path / "missing"), 10, budget)
    assert budget.used == 0


def test_a_short_write_raises_instead_of_leaving_a_gap(tmp_path, monkeypatch):
    spool = open_spool(str(tmp_path), 100, SpoolBudget(100))
    calls, real_pwrite = [], os.pwrite

    def short_then_full(fd, data, offset):
        calls.append(offset)
        if len(calls) == 1:
            return real_pwrite(fd, data[:10], offset)  # the file-size limit hit mid-write
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr("bloblo.spool.os.pwrite", short_then_full)
    with pytest.raises(SpoolError, match="File too large"):
        spool.append(b"x" * 50)
    assert calls == [0, 10]
    assert spool.written == 10


def test_reads_past_what_was_written_or_cut_short_raise(tmp_path, monkeypatch):
    spool = open_spool(str(tmp_path), 100, SpoolBudget(100))
    spool.append(b"y" * 20)
    with pytest.raises(SpoolError):
        spool.read(10, 20)
    monkeypatch.setattr("bloblo.spool.os.pread", lambda fd, size, offset: b"y" * (size - 1))
    with pytest.raises(SpoolError, match="read 9 of 10"):
        spool.read(0, 10)


# --- the spool's disk, reserved when the spool opens (issue #13 §3) ------------------------


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A directory on a 4 MiB filesystem."""
    with small_filesystem(tmp_path / "disk", 4 * MIB) as directory:
        yield directory


@pytest.mark.parametrize("named", [False, True], ids=["unnamed", "named"])
def test_a_spool_larger_than_the_free_disk_is_refused_at_open_and_leaves_nothing(small_disk, named):
    budget = SpoolBudget(100 * MIB)
    path = str(small_disk / "blob.spool") if named else None
    with pytest.raises(SpoolDiskFull, match="No space left"):
        open_spool(str(small_disk), 8 * MIB, budget, path)
    assert budget.used == 0
    assert os.listdir(small_disk) == []
    assert fill_up(small_disk) > 3 * MIB  # and the space it asked for was given back


@pytest.mark.parametrize("named", [False, True], ids=["unnamed", "named"])
def test_a_spool_that_fits_keeps_its_size_zero_and_takes_every_byte_on_a_disk_filled_after(
    small_disk, named
):
    path = str(small_disk / "blob.spool") if named else None
    spool = open_spool(str(small_disk), 3 * MIB, SpoolBudget(100 * MIB), path)
    # The host's other workers read how far a fill got from the file's size (host.py).
    assert os.fstat(spool.fileno()).st_size == 0
    taken = fill_up(small_disk)  # another file takes the rest of the disk
    blob = os.urandom(3 * MIB)
    for start in range(0, len(blob), 64 * 1024):
        spool.append(blob[start : start + 64 * 1024])
    assert taken <= 1 * MIB  # it got what the spool had not reserved, no more
    assert os.fstat(spool.fileno()).st_size == 3 * MIB
    assert spool.read(0, 3 * MIB) == blob
    spool.close()


def test_a_filesystem_that_cannot_reserve_spools_them_as_before(tmp_path, monkeypatch, caplog):
    def unsupported(fd, size):
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr("bloblo.spool._reserve_disk", unsupported)
    monkeypatch.setattr("bloblo.spool._UNRESERVED_LOGGED", set())
    caplog.set_level(logging.INFO, logger="bloblo.spool")
    budget = SpoolBudget(100)
    for _ in range(2):
        spool = open_spool(str(tmp_path), 60, budget)
        spool.append(b"z" * 60)
        assert spool.read(0, 60) == b"z" * 60
        spool.close()
    assert budget.used == 0
    said = [r.getMessage() for r in caplog.records if "not reserved" in r.getMessage()]
    assert len(said) == 1, caplog.text
    assert str(tmp_path) in said[0]
