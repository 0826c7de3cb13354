"""gunicorn settings for bloblo: `gunicorn -c gunicorn.conf.py wsgi:app`.

Imports nothing from bloblo's package, requests or boto3: gevent patches the standard library in
each worker after fork, and ssl must not be imported before that (see wsgi.py). The settings module
is loaded by path so the master checks the configuration once, before forking any worker.
"""

import contextlib
import importlib.util
import os
import pathlib
import resource
import sys
import tempfile


def _load(name: str):
    """bloblo/<name>.py, loaded by path: importing the package would import ssl before gevent."""
    path = pathlib.Path(__file__).resolve().with_name("bloblo") / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bloblo_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


_config = _load("config")
try:
    _settings = _config.load_settings()
except _config.ConfigError as exc:
    sys.exit(f"bloblo: {exc}")

# The spool directory must be bloblo's alone (issue #13, part 1): refuse to start otherwise.
_spooldir = _load("spooldir")
if _settings.max_fills:
    try:
        _spooldir.prepare(_settings.spool_directory, create=_settings.spool_dir is None)
    except _spooldir.UnsafeSpoolDir as exc:
        sys.exit(f"bloblo: {exc}")

# A worker holds up to worker_connections (1000) client connections, and its upstream and S3
# connections and spools besides: more descriptors than the soft limit of 1024 most systems
# start a process with (issue #14 §2). The workers inherit the hard limit (the unit: 65536).
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if _soft < _hard:
    # An unlimited hard limit is more than the kernel allows: then the soft limit stays.
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (_hard, _hard))

_connections = _load("connections")
_host = _settings.listen_host or "0.0.0.0"
bind = [
    f"[{_host}]:{_settings.listen_port}" if ":" in _host else f"{_host}:{_settings.listen_port}"
]
workers = _settings.workers
# HTTPS on bloblo's own port (issue #8): docker refuses plain HTTP outside loopback.
certfile = _settings.tls_cert
keyfile = _settings.tls_key
# gevent's worker, whose answers to requests gunicorn refuses itself (malformed, beyond the limits
# below) are registry JSON errors, not HTML pages (issue #14 §3).
worker_class = _load("worker").JsonErrorsWorker
worker_connections = 1000
preload_app = False  # each worker imports the app after gevent has patched it
timeout = 30  # for gevent workers a heartbeat, not a request limit
graceful_timeout = 600  # in-flight layer downloads get this long to finish on restart/stop
# Idle keep-alive connections hold a worker on graceful stop until they time out: keep it short.
# Behind a load balancer raise it above the balancer's idle timeout:
# GUNICORN_CMD_ARGS="--keep-alive 75". It also bounds how long a connection may take to send
# a request head (and, on the HTTPS port, its TLS handshake: ssl_context below); 0 would let a
# slowloris client hold a connection for ever (docs/operating.md, "Slow clients and many
# connections").
keepalive = 5
control_socket_disable = True
# X-Forwarded-Proto is believed from these peers only; bloblo applies the same list to the
# other forwarding headers (issue #6, part 4).
forwarded_allow_ips = ",".join(str(network) for network in _settings.trusted_proxies)
# Never refuse what the registry accepts (issue #6, part 5): cloud registries' bearer tokens run
# past 10 KB (distribution takes header fields up to 1 MiB). 0 would fall back to 8190 here.
limit_request_field_size = 64 * 1024
limit_request_line = 8190  # gunicorn's maximum
logger_class = _load("logs").logger_class(_settings.log_format)
accesslog = "-"
errorlog = "-"
# Paths without query strings: those carry signed upload state (and, at some registries, tokens).
access_log_format = '%(h)s "%(m)s %(U)s" %(s)s %(B)s %(M)sms "%(a)s"'
proc_name = "bloblo"


def ssl_context(config, default_ssl_context_factory):
    """The HTTPS port's context: a TLS handshake must end within the keep-alive (as the request
    head after it must), or the connection is closed (issue #14 §2)."""
    return _connections.bounded_handshakes(default_ssl_context_factory(), config.keepalive or 5)


def on_starting(server):
    """In the master, before any worker: prepare the metrics directory (workers inherit
    PROMETHEUS_MULTIPROC_DIR; a stale file of an earlier run would count twice), and say once
    what the operator should change in the configuration."""
    directory = os.environ.setdefault(
        "PROMETHEUS_MULTIPROC_DIR",
        os.path.join(tempfile.gettempdir(), f"bloblo-metrics-{os.getpid()}"),
    )
    os.makedirs(directory, exist_ok=True)
    for stale in pathlib.Path(directory).glob("*.db"):
        stale.unlink()
    for notice in _settings.notices:
        server.log.warning("bloblo: %s", notice)


def on_exit(server):
    """The master stops: the metrics directory it made goes with it (one the operator named
    stays, emptied at the next start)."""
    directory = pathlib.Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    if directory.name == f"bloblo-metrics-{os.getpid()}":
        for file in directory.glob("*.db"):
            file.unlink()
        directory.rmdir()


def child_exit(server, worker):
    """A worker is gone: its gauges stop counting (prometheus-client's multiprocess mode)."""
    from prometheus_client import multiprocess  # the master only: after the env is set

    multiprocess.mark_process_dead(worker.pid)


def worker_exit(server, worker):
    """Let fills finish (their downloads and S3 uploads) before the worker goes, whether or not
    a client still waits for them (issue #7).

    At most 20 s: the master kills a worker that stays silent for `timeout` (30 s). Fills still
    running then are dropped: nothing of theirs is published, and the log counts them.
    """
    app = getattr(worker, "wsgi", None)
    fills = getattr(app, "extensions", {}).get("bloblo.fills")
    left = fills.drain(timeout=20) if fills is not None else 0
    if left:
        server.log.warning("worker %s exits with %d fills unfinished: not cached", worker.pid, left)
