"""bloblo under resource limits: command prefixes for start_bloblo(command_prefix=...), so a
test can make the disk refuse bloblo's writes without filling a real disk."""

from __future__ import annotations

PRLIMIT = "/usr/bin/prlimit"


def file_size_limit(max_bytes: int) -> list[str]:
    """The command prefix that runs a command with RLIMIT_FSIZE at `max_bytes`: a write past
    that offset comes back short, then fails with EFBIG (Python ignores SIGXFSZ). The limit
    applies to every file the process writes, its log (stdout) included: keep it above that."""
    return [PRLIMIT, f"--fsize={max_bytes}", "--"]
