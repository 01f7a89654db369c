"""Which paths are the proxy's own: one matcher, built from the control plane's route table.

The front door serves a request itself only when its path is not one of the proxy's own routes
(those are aiohttp's, through the same router that serves them). :class:`OwnRoutes` reads the
route paths the way aiohttp's router does (``UrlDispatcher.add_resource``: a plain path, or a
path with variables such as ``/logs/{name}`` matched by aiohttp's own pattern), so a route the
control plane adds is never reached through the front door, whatever its shape.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from aiohttp import web

from aic_vllm_proxy.metrics import OTHER_ROUTE


class OwnRoutes:
    """The proxy's own paths (aiohttp route paths); ``owns(path)`` says whether a request path
    (as the router sees it: not percent-decoded, no dot segments, see ``front.routed_as_is``)
    is one of them."""

    def __init__(self, paths: Iterable[str]) -> None:
        router = web.UrlDispatcher()
        plain: set[bytes] = set()
        patterns: list[re.Pattern[bytes]] = []
        for path in paths:
            info = router.add_resource(path).get_info()  # aiohttp's reading of the route path
            if "path" in info:
                plain.add(str(info["path"]).encode())
            else:
                pattern: re.Pattern[str] = info["pattern"]
                patterns.append(re.compile(pattern.pattern.encode()))
        self.plain = frozenset(plain)
        self.patterns = tuple(patterns)

    def owns(self, path: bytes) -> bool:
        """Whether ``path`` (bytes, without the query) is one of the proxy's own routes."""
        if path in self.plain:
            return True
        return bool(self.patterns) and any(pattern.fullmatch(path) for pattern in self.patterns)


#: vLLM's API routes as the ``route`` label of the proxy's request metrics (``metrics.py``):
#: a fixed set, so a client cannot make up label values; any other path is ``other``.
API_ROUTES: dict[bytes, str] = {
    path.encode(): path
    for path in (
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/responses",
        "/v1/embeddings",
        "/v1/models",
        "/v1/audio/transcriptions",
        "/v1/audio/translations",
        "/v1/rerank",
        "/v2/rerank",
        "/rerank",
        "/v1/score",
        "/score",
        "/pooling",
        "/classify",
        "/tokenize",
        "/detokenize",
        "/invocations",
        "/health",
        "/ping",
        "/version",
        "/metrics",
        "/load",
    )
}


def api_route(target: bytes) -> str:
    """The ``route`` label of a request target (its path without the query)."""
    return API_ROUTES.get(target.partition(b"?")[0], OTHER_ROUTE)
