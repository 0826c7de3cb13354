"""The request target: refused when hostile, and what it names (issue #6)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import pairwise
from urllib.parse import unquote

from .errors import DigestInvalid, NameInvalid, PathInvalid
from .names import BlobRef, parse_blob_path

V2 = "/v2/"
_DOT_SEGMENTS = frozenset({".", ".."})
_PATH = re.compile(r"[^?#]*")  # origin-form: the path ends at the query, or at a stray fragment


@dataclass(frozen=True)
class Route:
    """What a request target names (issue #6).

    registry_api: the path is /v2/ or below it. blob: the blob a GET of /v2/<name>/blobs/<digest>
    asks for, else None. The caller forwards everything that is not a blob GET as it was sent.
    """

    registry_api: bool
    blob: BlobRef | None = None


def target_path(raw_target: str) -> str:
    """The path of a raw request target: everything before the first '?' or '#' (issue #6).

    It is the path the upstream resolves (HTTP clients drop a '#fragment' before sending), and
    the only part of a target an error or a log may show: queries can carry signed state.
    """
    return _PATH.match(raw_target).group()


def check_target(raw_target: str) -> str:
    """Refuse a hostile request target, else return its path (issue #6).

    Every refusal is a RegistryError with status 400 whose detail names the path, never the
    query. Refused:
    - a target that is not a path starting with '/' (absolute-form, '*', empty): PathInvalid;
    - a dot segment ('.' or '..') in the path once percent-decoded (any case of %2e), also
      when a decoded %2F or a ';parameter' (which Java servers strip) follows it:
      NameInvalid under /v2/, PathInvalid elsewhere;
    - under /v2/, an encoded slash (%2F, any case): DigestInvalid in the digest position (the
      segment right after 'blobs'), NameInvalid elsewhere.
    '/v2' (no slash) and empty segments ('/v2//x') pass: the registry answers them.
    """
    path = target_path(raw_target)
    detail = {"path": path}
    if not path.startswith("/"):
        raise PathInvalid(
            "the request target must be a path starting with '/' (origin-form); absolute-form "
            "(scheme://host/path) and '*' are refused",
            detail,
        )
    if "#" in raw_target:  # origin-form has no fragment; some servers keep what follows it
        refusal = NameInvalid if path.startswith(V2) else PathInvalid
        raise refusal("a fragment is refused in a request target", detail)
    registry_api = path.startswith(V2)
    if any(piece.split(";", 1)[0] in _DOT_SEGMENTS for piece in unquote(path).split("/")):
        refusal = NameInvalid if registry_api else PathInvalid
        raise refusal("dot segments ('.', '..', also percent-encoded) are refused", detail)
    if registry_api:
        segments = [unquote(segment) for segment in path.split("/")]
        for previous, segment in pairwise(segments):
            if "/" in segment:
                refusal = DigestInvalid if previous == "blobs" else NameInvalid
                raise refusal("an encoded slash (%2F) is refused under /v2/", detail)
    return path


def route(raw_target: str, method: str) -> Route:
    """Check a raw request target (check_target) and say what it names (issue #6).

    For any string it returns a Route or raises a RegistryError subclass with status 400,
    nothing else. A GET whose percent-decoded path is /v2/<name>/blobs/<digest> is a blob GET; a
    malformed name or digest there raises NameInvalid or DigestInvalid (names.parse_blob_path).
    Upload paths (/v2/<name>/blobs/uploads/...) and other methods name no blob.
    """
    path = check_target(raw_target)
    if not path.startswith(V2):
        return Route(registry_api=False)
    blob = parse_blob_path(unquote(path[len(V2) :])) if method == "GET" else None
    return Route(registry_api=True, blob=blob)
