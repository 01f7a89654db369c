"""Optional API keys with two roles.

- **admin** keys may call everything: ``/switch``, ``/stop``, ``/logs/*``, ``/plugins``,
  ``/models/catalog`` and the proxied API.
- **user** keys may use the proxied API (``/v1/...`` and every other vLLM path) and ``/status``.
- **metrics** keys (``--metrics-key``) may only scrape ``/proxy/metrics``, which admin keys may
  scrape too; it is open only when no key of any kind is configured (:func:`authorize_metrics`).

Keys are sent as ``Authorization: Bearer KEY`` and compared in constant time. With no key
configured the proxy is open (and says so at start-up when it listens beyond loopback).
The proxy's own key is never forwarded to vLLM.

Both HTTP paths (the front door, ``front.py``, and the application) read the key with
:func:`bearer_token` from the raw header bytes, and refuse the same requests with
:func:`refusal` (a fragment in the target, two ``Authorization`` headers), so that the same bytes
get the same answer on either.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from enum import Enum
from pathlib import Path

from aiohttp import web

from aic_vllm_proxy.config import ConfigError, Settings
from aic_vllm_proxy.relay.errors import BadRequest, ProxyError

#: Paths anyone may call: the proxy's liveness check, and the status page with its files
#: (``web/ui.py``: they hold no data; the page asks the API with the user's key).
PUBLIC_PATHS = frozenset({"/proxy/health", "/ui"})
PUBLIC_PREFIXES = ("/ui/",)
#: Paths a user key may call besides the proxied API.
USER_CONTROL_PATHS = frozenset({"/status"})
#: The proxy's own control paths (admin only); everything else is the proxied API.
ADMIN_PATHS = frozenset(
    {"/switch", "/stop", "/unload", "/plugins", "/models/catalog", "/nodes", "/nodes/connect"}
)
#: Paths an admin key needs for every method but these: ``GET /load`` is vLLM's (its server
#: load, passed through), ``POST /load`` the proxy's.
ADMIN_EXCEPT_METHODS = {"/load": frozenset({"GET", "HEAD"})}
ADMIN_PREFIXES = ("/logs/",)
#: The proxy's own metrics: an admin or a metrics key (:func:`authorize_metrics`).
METRICS_PATHS = frozenset({"/proxy/metrics"})


class Role(str, Enum):
    ADMIN = "admin"
    USER = "user"
    METRICS = "metrics"


#: The roles that may use the proxied API.
API_ROLES = frozenset({Role.ADMIN, Role.USER})
#: When one key is configured in several roles, the lowest rank counts.
_RANK = {Role.ADMIN: 0, Role.USER: 1, Role.METRICS: 2}


class KeyRing:
    """The configured keys; :meth:`role_of` tells which role a presented key has."""

    def __init__(
        self, admin: tuple[str, ...] = (), user: tuple[str, ...] = (), metrics: tuple[str, ...] = ()
    ) -> None:
        self._keys = [(key.encode(), Role.ADMIN) for key in admin if key] + [
            (key.encode(), Role.USER) for key in user if key
        ]
        self._metrics_keys = [(key.encode(), Role.METRICS) for key in metrics if key]
        self._all = tuple(self._keys + self._metrics_keys)

    @property
    def enabled(self) -> bool:
        """Admin or user keys are configured: the API and the control routes need a key."""
        return bool(self._keys)

    @property
    def first_admin_key(self) -> str | None:
        """The first admin key configured (options and environment before the keys file), for
        the connection file; None when there is none."""
        return next((key.decode() for key, role in self._keys if role is Role.ADMIN), None)

    @property
    def any(self) -> bool:
        """Some key is configured (metrics keys too): ``/proxy/metrics`` needs one."""
        return bool(self._keys or self._metrics_keys)

    def role_of(self, presented: bytes) -> Role | None:
        """The role of a key as it came in the request (bytes: a key is configured as UTF-8)."""
        found: Role | None = None
        for key, role in self._all:  # no early exit: the time does not depend on which key
            if hmac.compare_digest(presented, key) and (found is None or _RANK[role] < _RANK[found]):
                found = role
        return found


def read_keys_file(path: Path) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """A keys file: one ``admin KEY``, ``user KEY`` or ``metrics KEY`` per line; ``#`` starts
    a comment. Returns the admin, user and metrics keys."""
    found: dict[str, list[str]] = {role.value: [] for role in Role}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or parts[0] not in found:
            raise ValueError(f"{path}:{number}: expected 'admin KEY' or 'user KEY' (or 'metrics KEY')")
        found[parts[0]].append(parts[1])
    return tuple(found["admin"]), tuple(found["user"]), tuple(found["metrics"])


def keyring_from(settings: Settings) -> KeyRing:
    """The keys from the options/environment and the keys file (read once, at start-up)."""
    admin, user, metrics = settings.admin_keys, settings.api_keys, settings.metrics_key
    if settings.keys_file is not None:
        try:
            file_admin, file_user, file_metrics = read_keys_file(settings.keys_file)
        except OSError as exc:
            raise ConfigError(f"cannot read the keys file {settings.keys_file}: {exc}") from exc
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        admin, user, metrics = admin + file_admin, user + file_user, metrics + file_metrics
    return KeyRing(admin, user, metrics)


def required_role(path: str, method: str = "GET") -> Role | None:
    """The least role a request for ``path`` by ``method`` needs; None for public paths (and
    ``/proxy/metrics``, which :func:`authorize_metrics` guards)."""
    if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES) or path in METRICS_PATHS:
        return None
    if path in ADMIN_PATHS or path.startswith(ADMIN_PREFIXES):
        return Role.ADMIN
    allowed = ADMIN_EXCEPT_METHODS.get(path)
    if allowed is not None and method not in allowed:
        return Role.ADMIN
    return Role.USER


def bearer_token(authorization: bytes | None) -> bytes | None:
    """The key in an ``Authorization`` header's raw value (``Bearer KEY``, the scheme in any
    case), or None."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip(b" \t").partition(b" ")
    token = token.strip(b" \t")
    if scheme.lower() != b"bearer" or not token:
        return None
    return token


def refusal(target: bytes, authorizations: Sequence[bytes]) -> BadRequest | None:
    """Why a request is refused (400) before anything else looks at it, or None.

    - A fragment (``#...``) is never part of a request target (RFC 9112 section 3.2): aiohttp's
      router would drop it while the target forwarded to vLLM would keep it, so ``/switch#x``
      could be performed by one and passed on by the other.
    - Two ``Authorization`` headers: which one would count?
    """
    if b"#" in target:
        return BadRequest(
            "the request target has a fragment ('#...'), which a client must not send; "
            "percent-encode a '#' that belongs to the path or query as %23"
        )
    if len(authorizations) > 1:
        return BadRequest(
            f"the request has {len(authorizations)} Authorization headers; "
            "send one: 'Authorization: Bearer <key>'"
        )
    return None


def authorization_values(request: web.Request) -> list[bytes]:
    """The raw values of a request's ``Authorization`` headers."""
    return [value for name, value in request.raw_headers if name.lower() == b"authorization"]


def check_request(request: web.Request) -> None:
    """Raise the 400 of :func:`refusal` (the application's side of it)."""
    problem = refusal(request.raw_path.encode("utf-8", "surrogateescape"), authorization_values(request))
    if problem is not None:
        raise problem


def _presented_role(keys: KeyRing, request: web.Request) -> Role:
    """The role of the request's key; a 401 :class:`ProxyError` when it has none we accept."""
    values = authorization_values(request)
    token = bearer_token(values[0] if values else None)
    role = keys.role_of(token) if token else None
    if role is None:
        raise ProxyError(
            "Missing or invalid API key: send 'Authorization: Bearer <key>' with a key this "
            "proxy accepts (ask the proxy's admin for one)."
            if token is None
            else "Invalid API key: this proxy does not accept the key that was sent.",
            status=401,
            type="authentication_error",
            headers={"WWW-Authenticate": 'Bearer realm="aic-vllm-proxy"'},
        )
    return role


def routed_path(request: web.Request) -> str:
    """A request's path as aiohttp's router matches it: percent-decoded but for ``%2F`` and
    ``%25`` (yarl's ``path_safe``; before it, aiohttp routed on the raw path)."""
    url = request.rel_url
    return str(getattr(url, "path_safe", url.raw_path))


def authorize(keys: KeyRing, request: web.Request) -> None:
    """Raise a 401/403 :class:`ProxyError` unless the request's key may call its path.

    A path is open only when it is open as the router sees it too: ``/ui%2Fapp.js`` reads as
    ``/ui/app.js`` but is routed past the page, on to vLLM, so it needs a key like any request
    for vLLM."""
    needed = required_role(request.path, request.method)
    if needed is None:
        needed = required_role(routed_path(request), request.method)
    if needed is not None:
        role = _presented_role(keys, request)
        if role is Role.METRICS:
            raise ProxyError(
                f"{request.method} {request.path}: this key may only scrape /proxy/metrics.",
                status=403,
                type="permission_error",
            )
        if needed is Role.ADMIN and role is not Role.ADMIN:
            raise ProxyError(
                f"{request.method} {request.path} needs an admin key; this key may only use the "
                "OpenAI-compatible API and /status.",
                status=403,
                type="permission_error",
            )


def authorize_metrics(keys: KeyRing, request: web.Request) -> None:
    """``/proxy/metrics``: open when no key of any kind is configured, else an admin key or a
    metrics key (``--metrics-key``); a user key is a 403."""
    if keys.any and _presented_role(keys, request) not in (Role.ADMIN, Role.METRICS):
        raise ProxyError(
            f"{request.method} {request.path} needs an admin key or a metrics key (--metrics-key).",
            status=403,
            type="permission_error",
        )
