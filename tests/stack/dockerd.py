"""A private Docker engine: Debian's dockerd with vfs storage and no networking setup, all its
state under one temp dir, driven by Debian's docker CLI."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
from pathlib import Path

from tests.stack.procs import Process, ProcessServer, child_env, run

LOG = logging.getLogger(__name__)

DOCKERD = "/usr/sbin/dockerd"
DOCKER_CLI = "/usr/bin/docker"  # another docker CLI may come first in PATH


class Dockerd(ProcessServer):
    """A running dockerd listening on a unix socket in `workdir`. stop() also removes its data
    and exec roots (vfs copies every layer in full: the tree can be big); the log stays."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.socket_path = self.workdir / "docker.sock"
        self.data_root = self.workdir / "data"
        self.exec_root = self.workdir / "exec"
        self.config_dir = self.workdir / "cli-config"
        self.config_dir.mkdir(exist_ok=True)
        daemon_json = self.workdir / "daemon.json"
        daemon_json.write_text("{}")  # never read /etc/docker/daemon.json
        self.process = Process(
            self._argv(daemon_json),
            self.workdir / "dockerd.log",
            env=child_env(),
            cwd=self.workdir,
            name="dockerd",
        )
        self.start_seconds = self._ready_or_stop(
            lambda: self.process.wait_until(self._pings, "answering /_ping")
        )
        LOG.info("dockerd ready at %s in %.2f s", self.socket_path, self.start_seconds)

    def _argv(self, daemon_json: Path) -> list[str]:
        return [
            DOCKERD,
            f"--config-file={daemon_json}",
            "--storage-driver=vfs",
            "--iptables=false",
            "--ip6tables=false",
            "--bridge=none",
            f"--data-root={self.data_root}",
            f"--exec-root={self.exec_root}",
            f"--pidfile={self.workdir / 'dockerd.pid'}",
            f"--host=unix://{self.socket_path}",
        ]

    def _pings(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(2)
                sock.connect(str(self.socket_path))
                sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
                return sock.recv(64).startswith(b"HTTP/1.0 200")
        except OSError:
            return False

    @property
    def env(self) -> dict[str, str]:
        """The environment that points the docker CLI at this daemon."""
        return child_env(
            drop_prefixes=["DOCKER_"],
            DOCKER_HOST=f"unix://{self.socket_path}",
            DOCKER_CONFIG=str(self.config_dir),
        )

    def docker(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 600.0
    ) -> subprocess.CompletedProcess:
        """Run `docker ARGS` against this daemon; raise CommandError on failure if `check`."""
        return run([DOCKER_CLI, *args], input=input, env=self.env, check=check, timeout=timeout)

    def login(self, host: str, user: str, password: str) -> None:
        """`docker login HOST` (password on stdin); raise CommandError if refused."""
        self.docker("login", "--username", user, "--password-stdin", host, input=password)

    def pull(self, ref: str) -> None:
        """`docker pull REF`; raise CommandError on failure."""
        self.docker("pull", ref)

    def image_inspect(self, ref: str) -> dict:
        """The `docker image inspect` record of `ref`."""
        return json.loads(self.docker("image", "inspect", ref).stdout)[0]

    def stop(self) -> None:
        """Stop dockerd by PID (SIGTERM, wait ~10 s, SIGKILL) and remove its state."""
        self.process.stop()
        for tree in (self.data_root, self.exec_root):
            shutil.rmtree(tree, onerror=_log_rmtree_error)


def _log_rmtree_error(function, path, exc_info) -> None:
    if not isinstance(exc_info[1], FileNotFoundError):
        LOG.warning("could not remove %s: %s", path, exc_info[1])
