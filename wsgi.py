"""WSGI entry point for gunicorn: `gunicorn -c gunicorn.conf.py wsgi:app`."""

from gevent import monkey

monkey.patch_all()  # before anything imports socket, ssl or threading

from bloblo import create_app  # noqa: E402

app = create_app()
