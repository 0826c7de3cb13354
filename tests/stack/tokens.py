"""A token issuer for registry token auth, as Docker Hub and Harbor run one.

`GET /token?service=S&scope=repository:NAME:pull,push` (scope may repeat) with HTTP basic auth
answers an ES256 JWT whose `x5c` header holds a self-signed P-256 certificate that the registry
trusts through its `rootcertbundle`.
"""

from __future__ import annotations

import base64
import datetime
import json
import logging
import threading
import time
import uuid
from collections.abc import Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.stack.procs import LOOPBACK

LOG = logging.getLogger(__name__)

TOKEN_LIFETIME = 300
SERVICE = "bloblo-test-registry"
ISSUER = "bloblo-test-issuer"


class TokenIssuer:
    """An in-process token server on 127.0.0.1:free-port, serving from a thread.

    `users` maps a name to {"password": ..., "grants": {repository: [actions]}}.
    """

    def __init__(
        self,
        workdir: Path,
        users: Mapping[str, Mapping],
        service: str = SERVICE,
        issuer: str = ISSUER,
    ) -> None:
        self.users = {name: dict(user) for name, user in users.items()}
        self.service = service
        self.issuer = issuer
        self._key, self._cert = _self_signed_p256(issuer)
        self.cert_path = Path(workdir) / "token-issuer.pem"
        self.cert_path.parent.mkdir(parents=True, exist_ok=True)
        self.cert_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        self._x5c = base64.b64encode(self._cert.public_bytes(serialization.Encoding.DER)).decode()
        self.requests: list[dict] = []  # one record per /token request, for tests to inspect
        self._server = ThreadingHTTPServer((LOOPBACK, 0), _handler_for(self))
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.realm = f"{self.url}/token"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"token-issuer:{self.port}", daemon=True
        )
        self._thread.start()
        LOG.info("token issuer ready at %s", self.realm)

    def mint(
        self,
        subject: str,
        access: list[dict],
        lifetime: int = TOKEN_LIFETIME,
        extra_claims: Mapping[str, object] | None = None,
    ) -> str:
        """Return a signed token for `subject` granting `access`
        ([{"type": "repository", "name": ..., "actions": [...]}]), whatever the users allow.
        extra_claims are added as they are (cloud registries' tokens carry many)."""
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + lifetime,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
            **(extra_claims or {}),
        }
        return jwt.encode(claims, self._key, algorithm="ES256", headers={"x5c": [self._x5c]})

    def grant(self, user: str | None, scopes: list[str]) -> list[dict]:
        """Return the access entries `user` (None: anonymous) gets for the requested scopes:
        for each repository scope, the requested actions that the user's grants allow."""
        grants = self.users[user].get("grants", {}) if user else {}
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            allowed = set(grants.get(name, [])) if kind == "repository" else set()
            granted = [action for action in actions.split(",") if action in allowed]
            if granted:
                access.append({"type": kind, "name": name, "actions": granted})
        return access

    def check_password(self, user: str, password: str) -> bool:
        """Tell whether `user` exists and `password` is theirs."""
        return user in self.users and self.users[user].get("password") == password

    def answer(self, user: str | None, scopes: list[str]) -> dict:
        """Return the /token JSON body for an authenticated (or anonymous) request."""
        token = self.mint(user or "", self.grant(user, scopes))
        issued_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        return {
            "token": token,
            "access_token": token,
            "expires_in": TOKEN_LIFETIME,
            "issued_at": issued_at.replace("+00:00", "Z"),
        }

    def stop(self) -> None:
        """Stop serving and join the server thread. Idempotent."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=10)
        self._server.server_close()

    def __enter__(self) -> TokenIssuer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _self_signed_p256(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _basic_credentials(header: str | None) -> tuple[str, str] | None:
    if not header or not header.lower().startswith("basic "):
        return None
    try:
        user, _, password = base64.b64decode(header[6:].strip()).decode().partition(":")
    except ValueError:
        return None
    return user, password


def _handler_for(issuer: TokenIssuer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            url = urlsplit(self.path)
            if url.path != "/token":
                return self._reply(HTTPStatus.NOT_FOUND, {"details": "not found"})
            query = parse_qs(url.query)
            scopes = [s for value in query.get("scope", []) for s in value.split(" ") if s]
            creds = _basic_credentials(self.headers.get("Authorization"))
            issuer.requests.append(
                {
                    "user": creds and creds[0],
                    "scopes": scopes,
                    "service": query.get("service", [None])[0],
                }
            )
            if creds is not None and not issuer.check_password(*creds):
                return self._reply(
                    HTTPStatus.UNAUTHORIZED,
                    {"details": "incorrect username or password"},
                    {"WWW-Authenticate": 'Basic realm="token"'},
                )
            return self._reply(HTTPStatus.OK, issuer.answer(creds and creds[0], scopes))

        def _reply(self, status: HTTPStatus, body: dict, headers: dict | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            LOG.debug("token issuer: " + format, *args)

    return Handler
