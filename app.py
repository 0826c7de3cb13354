"""Development entry: `python app.py` runs bloblo on Flask's own server (one process, no gevent).

Production runs under gunicorn with gevent workers: `gunicorn -c gunicorn.conf.py wsgi:app`.
"""

import sys

from bloblo import create_app
from bloblo.config import ConfigError, load_settings

if __name__ == "__main__":
    try:
        settings = load_settings()
    except ConfigError as exc:
        sys.exit(f"bloblo: {exc}")
    create_app(settings).run(
        host=settings.listen_host or "0.0.0.0", port=settings.listen_port, threaded=True
    )
