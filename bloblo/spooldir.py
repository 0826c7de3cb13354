"""The spool directory and the files in it: bloblo's alone, checked before anything is trusted.

Spools hold private layers while they are filled, and the state files in the same directory tell
a host's workers what to serve (host.py). A directory that another local user can enter would
let that user read the layers, or plant a state that makes a worker serve bytes of their own
(issue #13, part 1). So the directory must be owned by bloblo's effective user with no group or
other bits (start-up is refused otherwise), and a file in it is followed only when it is a
regular file owned by that user, opened without following a symbolic link.

Imports only the standard library: gunicorn.conf.py loads this module by path, to refuse to
start in the master before any worker forks.
"""

from __future__ import annotations

import errno
import os
import stat

PRIVATE_MODE = 0o700  # the directory: only bloblo's user may enter or list it
FILE_MODE = 0o600  # every file bloblo makes in it


class UnsafeSpoolDir(Exception):
    """The spool directory is not bloblo's alone; the message says what to change."""


class NotOurs(OSError):
    """A file in the spool directory that bloblo did not write: not a regular file, or owned
    by another user."""


def prepare(path: str, create: bool) -> None:
    """Make sure path is a directory only bloblo's effective user may enter.

    With create, a missing directory is made (mode 0700; the default one, in the temporary
    directory). Raises UnsafeSpoolDir when path is missing (without create), is not a
    directory (a symbolic link is not followed), belongs to another user, or has any group or
    other permission bit (`mode & 0o077`).
    """
    if create:
        try:
            os.mkdir(path, PRIVATE_MODE)
        except FileExistsError:
            pass
        except OSError as exc:
            raise UnsafeSpoolDir(f"cannot create the spool directory {path}: {exc}") from None
    try:
        info = os.lstat(path)
    except OSError as exc:
        raise UnsafeSpoolDir(f"the spool directory {path} cannot be used: {exc}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeSpoolDir(
            f"the spool directory {path} is not a directory (a symbolic link is not followed: "
            "name the directory itself)"
        )
    if info.st_uid != os.geteuid():
        raise UnsafeSpoolDir(
            f"the spool directory {path} belongs to uid {info.st_uid}, not to bloblo's user "
            f"(uid {os.geteuid()}): other users must not reach the layers spooled there; "
            f"chown it to bloblo's user, or set BLOBLO_SPOOL_DIR to a directory of bloblo's own"
        )
    if info.st_mode & 0o077:
        raise UnsafeSpoolDir(
            f"the spool directory {path} has mode {stat.S_IMODE(info.st_mode):04o}: group and "
            f"others may reach the layers spooled there; run `chmod 700 {path}`"
        )


def open_private(path: str, flags: int = os.O_RDONLY) -> int:
    """A descriptor of the file at path, opened with flags, when it is a regular file owned by
    bloblo's effective user (a symbolic link is never followed).

    Raises FileNotFoundError when there is none, NotOurs when it is not bloblo's, and OSError
    for anything else the kernel refuses (EACCES, EISDIR, ...); never leaks the descriptor.
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, FILE_MODE)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR):
            raise NotOurs(exc.errno, f"{path} is not a regular file") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotOurs(f"{path} is not a regular file")
        if info.st_uid != os.geteuid():
            raise NotOurs(f"{path} belongs to uid {info.st_uid}, not to bloblo's user")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_private(path: str) -> int:
    """A descriptor of a new file at path (read and write, mode 0600); FileExistsError when
    something, even a dangling symbolic link, is there already."""
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
