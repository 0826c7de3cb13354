"""A real upstream registry: Debian's `docker-registry` (distribution 2.8.2) on 127.0.0.1."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import bcrypt

from tests.stack.procs import LOOPBACK, Process, ProcessServer, child_env, free_port

LOG = logging.getLogger(__name__)

REGISTRY_BIN = "/usr/bin/docker-registry"
HTTP_SECRET = "bloblo-test-registry-secret"  # fixed: upload _state stays valid across restarts
BASIC_REALM = "basic-realm"


class TokenAuthority(Protocol):
    """What a token-auth registry needs to know about its token issuer (see tokens.TokenIssuer)."""

    realm: str
    service: str
    issuer: str
    cert_path: Path


@dataclass(frozen=True)
class PullThrough:
    """`proxy:` mode: serve and cache `remoteurl`, authenticating with username/password."""

    remoteurl: str
    username: str | None = None
    password: str | None = None


@dataclass(frozen=True)
class S3Storage:
    """The `s3` storage driver against a local S3 endpoint (blob GET/HEAD answer 307)."""

    endpoint_url: str
    bucket: str
    region: str = "us-east-1"


class Registry(ProcessServer):
    """A running docker-registry with filesystem (or S3) storage under `workdir`.

    Auth is `none` unless `users` ({name: password}, htpasswd with bcrypt) or `token`
    (a TokenAuthority) is given. Stop it with stop() or use it as a context manager.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        users: Mapping[str, str] | None = None,
        token: TokenAuthority | None = None,
        proxy: PullThrough | None = None,
        s3: S3Storage | None = None,
        port: int | None = None,
    ) -> None:
        if users is not None and token is not None:
            raise ValueError("choose htpasswd users or token auth, not both")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.host = f"{LOOPBACK}:{self.port}"
        self.url = f"http://{self.host}"
        self.auth = "htpasswd" if users is not None else "token" if token else "none"
        self.users = dict(users or {})
        config = self._config(users, token, proxy, s3)
        self.config_path = self.workdir / "config.yml"
        self.config_path.write_text(json.dumps(config, indent=2))  # JSON is valid YAML
        self.process = Process(
            [REGISTRY_BIN, "serve", str(self.config_path)],
            self.workdir / "registry.log",
            # No AWS_* from outside: the S3 driver panics at start when AWS_CA_BUNDLE is set.
            env=child_env(drop_prefixes=["AWS_"]),
            cwd=self.workdir,
            name=f"docker-registry:{self.port}",
        )
        self.start_seconds = self._ready_or_stop(
            lambda: self.process.wait_http(
                f"{self.url}/v2/", ok=lambda resp: resp.status_code in (200, 401)
            )
        )
        LOG.info(
            "registry (%s auth) ready at %s in %.2f s", self.auth, self.url, self.start_seconds
        )

    def _config(self, users, token, proxy, s3) -> dict:
        config = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text"},
            "storage": self._storage(s3),
            "http": {"addr": self.host, "secret": HTTP_SECRET},
        }
        if users is not None:
            config["auth"] = {"htpasswd": {"realm": BASIC_REALM, "path": self._htpasswd(users)}}
        elif token is not None:
            config["auth"] = {
                "token": {
                    "realm": token.realm,
                    "service": token.service,
                    "issuer": token.issuer,
                    "rootcertbundle": str(token.cert_path),
                }
            }
        if proxy is not None:
            config["proxy"] = {k: v for k, v in vars(proxy).items() if v is not None}
        return config

    def _storage(self, s3: S3Storage | None) -> dict:
        storage: dict = {"delete": {"enabled": True}}
        if s3 is None:
            storage["filesystem"] = {"rootdirectory": str(self.workdir / "storage")}
            return storage
        storage["s3"] = {
            "regionendpoint": s3.endpoint_url,
            "bucket": s3.bucket,
            "region": s3.region,
            "accesskey": "test",
            "secretkey": "test",
            "secure": False,
            "v4auth": True,
        }
        storage["redirect"] = {"disable": False}
        return storage

    def _htpasswd(self, users: Mapping[str, str]) -> str:
        path = self.workdir / "htpasswd"
        lines = [
            f"{name}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()}\n"
            for name, password in users.items()
        ]
        path.write_text("".join(lines))
        return str(path)
