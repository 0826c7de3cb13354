"""The WSGI application: every part built from the settings and wired together."""

from __future__ import annotations

import logging

from flask import Flask
from gevent import monkey

from . import health, metrics, spooldir
from .abandoned import AbandonedUploads
from .blobs import BlobPolicy
from .clients import ClientMiddleware
from .config import Settings, load_settings
from .connections import StallLimit
from .errors import install_error_handlers
from .fills import Fills
from .host import HostFills
from .proxy import Forwarder, create_blueprint, refuse_oversized_content_length
from .request_ids import RequestIds
from .storage import BlobStore
from .upstream import Upstream


def create_app(settings: Settings | None = None) -> Flask:
    """Build the WSGI app from settings (read from the environment when not given)."""
    settings = settings or load_settings()
    _route_logs_through_gunicorn()
    upstream = Upstream(settings)
    forwarder = Forwarder(settings, upstream)
    store = BlobStore(settings)
    fills = Fills(settings, store, _host_fills(settings))
    if settings.max_fills:  # what this instance's killed workers (or another's) left in S3
        AbandonedUploads(settings, store).start()
    blobs = BlobPolicy(settings, forwarder, upstream, store, fills)

    app = Flask(__name__, static_folder=None)  # every path is the registry's
    # Every path is the registry's: no slash merging or trailing-slash redirects of Flask's own.
    app.url_map.merge_slashes = False
    app.url_map.strict_slashes = False
    app.wsgi_app = StallLimit(
        metrics.Requests(RequestIds(ClientMiddleware(app.wsgi_app, settings.trusted_proxies))),
        settings.client_stall_seconds,
    )
    app.config["BLOBLO_SETTINGS"] = settings
    app.extensions["bloblo.fills"] = fills  # gunicorn.conf.py drains it on worker exit
    app.before_request(refuse_oversized_content_length)  # any request, bloblo's own endpoints too
    app.register_blueprint(health.create_blueprint(health.Health(upstream, store)))
    app.register_blueprint(metrics.create_blueprint(settings.metrics_networks))
    app.register_blueprint(create_blueprint(forwarder, blobs.get))
    install_error_handlers(app)
    if monkey.is_module_patched("socket"):  # under gunicorn's gevent worker
        metrics.watch_worker()
    logging.getLogger("bloblo").info(
        "bloblo proxying %s, caching in s3://%s/%s",
        settings.upstream_url,
        settings.s3_bucket,
        settings.s3_prefix,
    )
    return app


def _host_fills(settings: Settings) -> HostFills | None:
    """What lets the workers share their fills through the spool directory (host.py): one GET
    of a new blob per host. None when caching is off, or the directory takes no lock file (then
    each worker fills on its own, and the log says why)."""
    if not settings.max_fills:
        return None
    # Checked in gunicorn's master already (gunicorn.conf.py); again for other servers.
    spooldir.prepare(settings.spool_directory, create=settings.spool_dir is None)
    try:
        return HostFills(settings.spool_directory, settings.namespace)
    except OSError as exc:
        logging.getLogger("bloblo").warning(
            "fills are not shared between workers: %s; check BLOBLO_SPOOL_DIR", exc
        )
        return None


def _route_logs_through_gunicorn() -> None:
    """Under gunicorn, bloblo's log lines go where gunicorn's go, at its level."""
    gunicorn_log = logging.getLogger("gunicorn.error")
    package_log = logging.getLogger("bloblo")  # every bloblo.* logger propagates to it
    if gunicorn_log.handlers and not package_log.handlers:
        package_log.handlers = gunicorn_log.handlers
        package_log.setLevel(logging.INFO)
        package_log.propagate = False
