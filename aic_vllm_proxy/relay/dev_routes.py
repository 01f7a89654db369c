"""vLLM's development routes: never forwarded, whoever asks (admin keys included).

An instance with sleep mode runs with ``VLLM_SERVER_DEV_MODE=1`` (issue 14), which makes vLLM
0.32 add routes that park, wake, reconfigure or inspect the engine (``/sleep``,
``/collective_rpc``, ...). The daemon calls the ones it needs itself; a client never reaches
them: on both HTTP paths such a request is answered 404 by the proxy (:func:`not_forwarded`) and
nothing of it goes to vLLM. The front door hands these requests to aiohttp
(``Front.takes``), whose catch-all (``Passthrough.handle``) answers them, so the same bytes get
the same answer on either path (docs/security.md).

A path is a development route when vLLM would route it to one, read as vLLM reads it:

- the target without its query (uvicorn), percent-decoded once (uvicorn: ``/%73leep`` is
  ``/sleep``);
- trailing slashes ignored (Starlette's ``redirect_slashes`` sends ``/sleep/`` and ``/sleep//``
  to ``/sleep`` with a 307);
- any prefix before the route (FastAPI's ``root_path``: vLLM started with ``--root-path /api``
  serves ``/sleep`` at ``/api/sleep`` too; a catalogue entry may pass that flag). So every path
  whose last segment is a development route's name is refused, which includes vLLM's
  ``/inference/v1/abort_requests`` (disaggregated serving), whose name is the development
  route ``/abort_requests``.
- any method (the route does not exist for the client: no 405).
"""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

from aic_vllm_proxy.relay.errors import ProxyError

#: The routes vLLM 0.32 adds only when ``VLLM_SERVER_DEV_MODE`` is set
#: (``vllm/entrypoints/launchers/api_server/routers.py``, ``register_api_routers``:
#: ``register_vllm_dev_api_routers`` and ``register_rl_api_routers``).
DEV_ROUTES = frozenset(
    {
        # vllm/entrypoints/serve/dev/cache/api_router.py
        "/reset_prefix_cache",
        "/reset_mm_cache",
        "/reset_encoder_cache",
        # vllm/entrypoints/serve/dev/rpc/api_router.py
        "/collective_rpc",
        # vllm/entrypoints/serve/dev/server_info/api_router.py
        "/server_info",
        # vllm/entrypoints/serve/dev/sleep/api_router.py
        "/sleep",
        "/release_kv_cache_memory",
        "/wake_up",
        "/is_sleeping",
        # vllm/entrypoints/rl/online/api_router.py
        "/pause",
        "/resume",
        "/abort_requests",
        "/is_paused",
        "/init_weight_transfer_engine",
        "/shutdown_weight_transfer_engine",
        "/start_weight_update",
        "/start_draft_weight_update",
        "/update_weights",
        "/finish_weight_update",
        "/update_weight_version",
        "/weight_info",
        "/weight_checker",
        "/get_world_size",
    }
)
#: Their names: the last segment of a path that vLLM may route to one of them.
_NAMES = frozenset(route[1:].encode() for route in DEV_ROUTES)


def _last_segment(path: bytes) -> bytes:
    if b"%" in path:
        path = unquote_to_bytes(path)
    return path.rstrip(b"/").rpartition(b"/")[2]


def dev_route(path: bytes) -> bool:
    """Whether vLLM would serve ``path`` (a request target's bytes as forwarded, without the
    query) with one of its development routes (see the module's docstring)."""
    return _last_segment(path) in _NAMES


def not_forwarded(path: bytes) -> ProxyError:
    """The answer to a request for a development route (``path``: as :func:`dev_route` took it)."""
    name = _last_segment(path).decode("ascii")
    return ProxyError(
        f"/{name} is not available through this proxy: vLLM's development routes (sleep mode, "
        "/collective_rpc, cache resets, weight updates, /server_info) are never forwarded; the "
        "proxy parks and wakes models itself (see its docs/security.md).",
        status=404,
        type="not_found_error",
    )
