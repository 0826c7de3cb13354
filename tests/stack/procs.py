"""Start, watch and stop the real processes of the test stack, on loopback only."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol, Self, TypeVar

import psutil
import requests
import urllib3

LOG = logging.getLogger(__name__)

T = TypeVar("T")

LOOPBACK = "127.0.0.1"
STOP_TIMEOUT = 10.0


class StartError(RuntimeError):
    """A process exited or did not become ready in time; the message ends with its log."""


class CommandError(RuntimeError):
    """A command run to completion exited non-zero; `.result` holds its output."""

    def __init__(self, result: subprocess.CompletedProcess) -> None:
        self.result = result
        super().__init__(
            f"{' '.join(map(str, result.args))} exited with code {result.returncode}:\n"
            f"{result.stdout}{result.stderr}"
        )


def run(
    argv: list[str],
    input: str | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    timeout: float = 600.0,
) -> subprocess.CompletedProcess:
    """Run a command to completion and return its text output; raise CommandError if it exits
    non-zero and `check` is true."""
    LOG.debug("running %s", " ".join(argv))
    result = subprocess.run(
        argv, input=input, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise CommandError(result)
    return result


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Tell whether a server could listen on 127.0.0.1:port right now (as servers do, with
    SO_REUSEADDR: connections lingering in TIME_WAIT do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


def poll(predicate: Callable[[], T], timeout: float = 15.0) -> T:
    """Call `predicate` with growing pauses (20 ms to 250 ms) until it returns something true
    or `timeout` seconds pass; return its last answer."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while not (value := predicate()) and time.monotonic() < deadline:
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)
    return value


def child_env(
    drop: Iterable[str] = (), drop_prefixes: Iterable[str] = (), **extra: str
) -> dict[str, str]:
    """Return a copy of this process's environment without `drop` names or `drop_prefixes`,
    updated with `extra`."""
    drop, prefixes = set(drop), tuple(drop_prefixes)
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(prefixes)}
    env.update(extra)
    return env


def local_session() -> requests.Session:
    """Return a requests session that ignores proxy and netrc settings from the environment."""
    session = requests.Session()
    session.trust_env = False
    return session


class Process:
    """One child process in its own session (process group), logging stdout+stderr to a file
    (or to this process's own stdout/stderr when `log_path` is None).

    Use as a context manager or call stop(); stop() always ends the process and its group.
    """

    def __init__(
        self,
        argv: list[str],
        log_path: Path | str | None,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
        name: str | None = None,
    ) -> None:
        self.name = name or Path(argv[0]).name
        self.log_path = Path(log_path) if log_path is not None else None
        with contextlib.ExitStack() as stack:
            log = None
            if self.log_path is not None:
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                log = stack.enter_context(open(self.log_path, "ab"))
            self.popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT if log else None,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
            )
        self.started_at = time.monotonic()
        self._stopped = False
        LOG.info("started %s (pid %d), log %s", self.name, self.pid, self.log_path or "inherited")

    @property
    def pid(self) -> int:
        """The PID of the process started (also its process group id)."""
        return self.popen.pid

    def running(self) -> bool:
        """Tell whether the process has not exited yet."""
        return self.popen.poll() is None

    def log_text(self) -> str:
        """Return everything the process wrote to stdout and stderr so far ("" if not logged)."""
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_until(self, ready: Callable[[], bool], what: str, timeout: float = 30.0) -> float:
        """Poll `ready()` until it is true; return the seconds since start.

        Raise StartError (with the log) if the process exits or `timeout` passes first."""

        def done() -> bool:
            if not self.running():
                raise self._error(f"exited with code {self.popen.returncode} before {what}")
            return ready()

        if not poll(done, timeout):
            raise self._error(f"not {what} after {timeout:.0f} s")
        return time.monotonic() - self.started_at

    def wait_http(
        self,
        url: str,
        ok: Callable[[requests.Response], bool] = lambda resp: resp.status_code < 500,
        timeout: float = 30.0,
        verify: bool = True,
    ) -> float:
        """Wait until GET `url` answers and `ok(response)` is true; return seconds since start.
        verify=False accepts any TLS certificate."""
        session = local_session()
        session.verify = verify

        def ready() -> bool:
            try:
                with warnings.catch_warnings():  # verify=False is deliberate
                    warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
                    with session.get(url, timeout=2, allow_redirects=False) as resp:
                        return ok(resp)
            except requests.RequestException:
                return False

        try:
            return self.wait_until(ready, f"ready at {url}", timeout)
        finally:
            session.close()

    def wait_port(self, port: int, host: str = LOOPBACK, timeout: float = 30.0) -> float:
        """Wait until a TCP connection to host:port succeeds; return seconds since start."""

        def ready() -> bool:
            try:
                socket.create_connection((host, port), timeout=1).close()
            except OSError:
                return False
            return True

        return self.wait_until(ready, f"listening on {host}:{port}", timeout)

    def stop(self, timeout: float = STOP_TIMEOUT, signum: int = signal.SIGTERM) -> int | None:
        """Stop the process: `signum` (SIGTERM), wait up to `timeout` s, then SIGKILL; then kill
        whatever is left of its process group and descendants. Return its exit code. Idempotent."""
        if self._stopped:
            return self.popen.returncode
        self._stopped = True
        if not self.running():  # it exited by itself: what it left in its group must go too
            _kill_leftovers(self.pid, [])
            return self.popen.returncode
        descendants = _descendants(self.pid)
        stopping = time.monotonic()
        _signal(self.pid, signum)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            LOG.warning(
                "%s (pid %d) ignored signal %d for %.0f s: SIGKILL",
                self.name,
                self.pid,
                signum,
                timeout,
            )
            _signal(self.pid, signal.SIGKILL)
            self.popen.wait()
        _kill_leftovers(self.pid, descendants)
        LOG.info(
            "stopped %s (pid %d) in %.1f s, exit code %s",
            self.name,
            self.pid,
            time.monotonic() - stopping,
            self.popen.returncode,
        )
        return self.popen.returncode

    def _error(self, problem: str) -> StartError:
        tail = "\n".join(self.log_text().splitlines()[-40:])
        return StartError(f"{self.name} (pid {self.pid}) {problem}; log {self.log_path}:\n{tail}")

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class ProcessServer:
    """Base of the stack's servers, each one `self.process`: pid, log_text(), stop() by PID,
    and use as a context manager."""

    process: Process

    def _ready_or_stop(self, wait: Callable[[], float]) -> float:
        """Return wait()'s seconds-to-ready; if it raises, stop the server and re-raise."""
        try:
            return wait()
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        """PID of the server process."""
        return self.process.pid

    def log_text(self) -> str:
        """The server's log so far."""
        return self.process.log_text()

    def stop(self) -> None:
        """Stop the server by PID (SIGTERM, wait ~10 s, SIGKILL)."""
        self.process.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class Stoppable(Protocol):
    """Anything with a stop() method."""

    def stop(self) -> object: ...


def stop_all(servers: Iterable[Stoppable]) -> None:
    """Stop every server concurrently (each stop() may wait for a graceful shutdown)."""
    servers = list(servers)
    if servers:
        with ThreadPoolExecutor(len(servers)) as pool:
            for future in [pool.submit(server.stop) for server in servers]:
                future.result()


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _kill_leftovers(pgid: int, descendants: list[psutil.Process]) -> None:
    """SIGKILL the process group and every recorded descendant still alive (psutil checks the
    start time, so a reused PID is never hit). No wait: orphans are reaped by init."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    for proc in descendants:
        with contextlib.suppress(psutil.Error):
            proc.kill()
