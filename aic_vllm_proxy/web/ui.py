"""The status page: ``GET /ui`` and its assets ``GET /ui/NAME``, files inside the package
(``web/ui/``, docs/ui.md). The page holds no data: it is open (``relay.auth.required_role``),
and its script asks the API for everything with the key the user gives it.

Only the files of :data:`FILES` are served: a name from the request is looked up there, never
joined to a filesystem path.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

from aic_vllm_proxy.relay.errors import ProxyError

#: The page's files and their content types.
FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
#: Everything the page needs comes from the daemon itself; nothing from elsewhere.
HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
}


def _file(name: str) -> web.Response:
    body = resources.files("aic_vllm_proxy.web").joinpath("ui").joinpath(name).read_bytes()
    return web.Response(body=body, headers={"Content-Type": FILES[name], **HEADERS})


async def page(request: web.Request) -> web.Response:
    """``GET /ui``: the page."""
    return _file("index.html")


async def asset(request: web.Request) -> web.Response:
    """``GET /ui/NAME``: one of the page's files (``/ui/`` itself: the page's address)."""
    name = request.match_info["name"]
    if name == "":
        return web.Response(status=302, headers={"Location": "../ui"})
    if name not in FILES:
        raise ProxyError(
            f"the status page has no file {name!r}: open /ui", status=404, type="not_found_error"
        )
    return _file(name)
