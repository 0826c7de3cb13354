"""bloblo: a registry proxy that serves layer downloads from S3.

Importing the package imports nothing else: the server (wsgi.py) and the command (cli.py) let
gevent patch the standard library first.
"""

from __future__ import annotations

__all__ = ["create_app"]


def create_app(settings=None):
    """Build the WSGI app from settings (read from the environment when not given); see
    application.create_app."""
    from .application import create_app as build

    return build(settings)
