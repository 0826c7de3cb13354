"""`make run` without an upstream: a demo stack on this machine, then bloblo in front of it.

Starts docker-registry on 127.0.0.1:6666 (user demo/demo) and LocalStack S3 on 127.0.0.1:4566
(bucket sample-bucket), both with their state under .run/, pushes demo/hello:latest if the
registry lacks it, then runs bloblo (gunicorn) in the foreground with BLOBLO_USE_LOCALSTACK=true
and its defaults otherwise. Ctrl-C or SIGTERM stops everything it started, by PID.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import tempfile
from pathlib import Path

from tests.stack.images import build_image, push
from tests.stack.procs import LOOPBACK, Process, child_env, port_is_free
from tests.stack.regclient import RegistryClient
from tests.stack.registry import Registry
from tests.stack.s3 import REPO, S3Server

LOG = logging.getLogger("bloblo.demo")

REGISTRY_PORT = 6666
S3_PORT = 4566
BLOBLO_ADDR = f"{LOOPBACK}:7777"
BUCKET = "sample-bucket"
DEMO_USER = ("demo", "demo")
DEMO_REPO, DEMO_TAG = "demo/hello", "latest"
RUN_DIR = REPO / ".run"


def check_ports() -> list[str]:
    """Return a line per demo port that is already taken."""
    return [
        f"port {port} is already in use ({what}); stop whatever listens there and retry"
        for port, what in ((REGISTRY_PORT, "demo registry"), (S3_PORT, "LocalStack S3"))
        if not port_is_free(port)
    ]


def ensure_demo_image(registry: Registry) -> None:
    """Push demo/hello:latest (two small random layers) unless the registry has it."""
    client = RegistryClient(registry.url, creds=DEMO_USER)
    try:
        if client.get_manifest(DEMO_REPO, DEMO_TAG, method="HEAD").status_code == 200:
            return
    finally:
        client.close()
    with tempfile.TemporaryDirectory(prefix="bloblo-demo-") as tmp:
        image = build_image(Path(tmp), [64 * 1024, 256 * 1024], tag=DEMO_TAG)
        push(image, registry.host, DEMO_REPO, creds=DEMO_USER)
    LOG.info("pushed %s:%s to %s", DEMO_REPO, DEMO_TAG, registry.url)


def instructions() -> str:
    """What to type to pull the demo image through bloblo."""
    user, password = DEMO_USER
    ref = f"localhost:7777/{DEMO_REPO}:{DEMO_TAG}"
    return f"""
bloblo demo: registry http://{LOOPBACK}:{REGISTRY_PORT} (user {user}, password {password}),
S3 http://{LOOPBACK}:{S3_PORT} (bucket {BUCKET}), bloblo http://{BLOBLO_ADDR}.
Logs: {RUN_DIR}/registry/registry.log, {RUN_DIR}/s3/localstack.log; bloblo logs below.

With skopeo:
  skopeo login --tls-verify=false -u {user} -p {password} localhost:7777
  skopeo copy --src-tls-verify=false docker://{ref} oci:/tmp/hello:{DEMO_TAG}

With docker:
  echo {password} | docker login -u {user} --password-stdin localhost:7777
  docker pull {ref}

Ctrl-C stops bloblo and the demo stack.
"""


def run_bloblo() -> Process:
    """Start bloblo with LocalStack settings, logging to this terminal."""
    env = child_env(BLOBLO_USE_LOCALSTACK="true")
    env.setdefault("BLOBLO_LISTEN_ADDR", BLOBLO_ADDR)  # loopback unless told otherwise
    gunicorn = REPO / ".venv" / "bin" / "gunicorn"
    argv = [str(gunicorn), "-c", "gunicorn.conf.py", "wsgi:app"]
    return Process(argv, log_path=None, env=env, cwd=REPO, name="bloblo")


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> int:
    """Run the demo until Ctrl-C/SIGTERM or until bloblo exits; return the exit status."""
    logging.basicConfig(level=logging.INFO, format="demo: %(message)s")
    taken = check_ports()
    if taken:
        print("\n".join(f"bloblo demo: {line}" for line in taken), file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return run_stack()
    except KeyboardInterrupt:
        return 130


def run_stack() -> int:
    """Start the demo stack and bloblo; stop all of them when bloblo exits or on interrupt."""
    with contextlib.ExitStack() as stack:
        registry = stack.enter_context(
            Registry(RUN_DIR / "registry", users=dict([DEMO_USER]), port=REGISTRY_PORT)
        )
        s3 = stack.enter_context(S3Server(RUN_DIR / "s3", port=S3_PORT))
        s3.create_bucket(BUCKET)
        ensure_demo_image(registry)
        print(instructions(), flush=True)
        bloblo = stack.enter_context(run_bloblo())
        return bloblo.popen.wait()


if __name__ == "__main__":
    sys.exit(main())
