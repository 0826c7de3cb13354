"""Spool files: every write and read moves every byte or raises; a budget per worker."""

import errno
import os

import pytest

from bloblo.spool import SpoolBudget, SpoolError, open_spool


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
