"""Python client of aic-vllm-proxy, for notebooks and scripts (needs the ``client`` extra).

.. code-block:: python

    from aic_vllm_proxy.client import VLLMProxyClient

    proxy = VLLMProxyClient(proxy_url="http://gpu-node:8224", model2spec={
        "meta-llama/Llama-2-7b-hf": "--tensor-parallel-size 1 --gpu-memory-utilization 0.9",
    })
    proxy.switch("meta-llama/Llama-2-7b-hf")     # live progress, then a one-line summary
    client = proxy.get_openai_client()            # the official openai client, at the proxy's /v1
    st = proxy.status()                           # st["state"] == "ready", st.state, print(st)

:class:`VLLMProxyClient` (``sync.py``) is synchronous and never touches an event loop, so it
works inside Jupyter (where one is already running). :class:`AsyncVLLMProxyClient` (``aio.py``)
has the same methods for ``await``. Both share the request building, error handling
(``calls.py``, ``errors.py``) and switch-following logic (:mod:`aic_vllm_proxy.client.progress`): a
switch or a wait is written once in ``calls.py`` as a plan of steps (calls, waits, the log
stream) that each client's one driver carries out, so only the few lines that do I/O differ.
Specs are compared and catalogue names looked up by the proxy's own pure modules
(:mod:`aic_vllm_proxy.spec`, :mod:`aic_vllm_proxy.catalog`). What they return for the proxy's
status and for a switch (``views.py``) is at once the JSON dict of the answer and the typed object.

A switch never waits on one long HTTP request: it asks the proxy to start the switch
(``POST /switch`` with ``"wait": false``), then reads ``GET /status`` whenever the daemon's event
stream (``GET /events``) says something changed (an older daemon without it is polled), and
follows the new vLLM log (``GET /logs/stream``) until the model is ready or has failed.

The names below are imported when first used (PEP 562): the daemon's command line registers
the client's commands (``client/cli.py``) without loading the client, so a daemon installed
without the ``client`` extra (no httpx) starts, and starts without the client in its memory.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aic_vllm_proxy.client.aio import AsyncVLLMProxyClient
    from aic_vllm_proxy.client.calls import API_KEY_ENV, DEFAULT_URL, URL_ENV, build_spec, catalog_spec
    from aic_vllm_proxy.client.connection import (
        CONNECTION_FILE_ENV,
        ConnectionFileError,
        read_connection_file,
    )
    from aic_vllm_proxy.client.errors import (
        AuthenticationError,
        NoRoomError,
        PermissionDeniedError,
        ProxyError,
        ProxyUnreachable,
        SwitchError,
        UnknownModelError,
        WaitTimeout,
    )
    from aic_vllm_proxy.client.sync import VLLMProxyClient
    from aic_vllm_proxy.client.views import LoadResultDict, StatusDict, SwitchResultDict, UnloadResultDict
    from aic_vllm_proxy.schemas import (
        InstanceStatus,
        LoadResult,
        NodesStatus,
        ProcessState,
        Status,
        SwitchResult,
        UnloadResult,
    )

#: Where each public name lives.
_WHERE = {
    "AsyncVLLMProxyClient": "aic_vllm_proxy.client.aio",
    "API_KEY_ENV": "aic_vllm_proxy.client.calls",
    "DEFAULT_URL": "aic_vllm_proxy.client.calls",
    "URL_ENV": "aic_vllm_proxy.client.calls",
    "build_spec": "aic_vllm_proxy.client.calls",
    "catalog_spec": "aic_vllm_proxy.client.calls",
    "CONNECTION_FILE_ENV": "aic_vllm_proxy.client.connection",
    "ConnectionFileError": "aic_vllm_proxy.client.connection",
    "read_connection_file": "aic_vllm_proxy.client.connection",
    "AuthenticationError": "aic_vllm_proxy.client.errors",
    "NoRoomError": "aic_vllm_proxy.client.errors",
    "PermissionDeniedError": "aic_vllm_proxy.client.errors",
    "ProxyError": "aic_vllm_proxy.client.errors",
    "ProxyUnreachable": "aic_vllm_proxy.client.errors",
    "SwitchError": "aic_vllm_proxy.client.errors",
    "UnknownModelError": "aic_vllm_proxy.client.errors",
    "WaitTimeout": "aic_vllm_proxy.client.errors",
    "VLLMProxyClient": "aic_vllm_proxy.client.sync",
    "StatusDict": "aic_vllm_proxy.client.views",
    "SwitchResultDict": "aic_vllm_proxy.client.views",
    "LoadResultDict": "aic_vllm_proxy.client.views",
    "UnloadResultDict": "aic_vllm_proxy.client.views",
    "InstanceStatus": "aic_vllm_proxy.schemas",
    "LoadResult": "aic_vllm_proxy.schemas",
    "NodesStatus": "aic_vllm_proxy.schemas",
    "ProcessState": "aic_vllm_proxy.schemas",
    "Status": "aic_vllm_proxy.schemas",
    "SwitchResult": "aic_vllm_proxy.schemas",
    "UnloadResult": "aic_vllm_proxy.schemas",
}


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(where), name)
    globals()[name] = value  # the next use finds it at once
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "API_KEY_ENV",
    "CONNECTION_FILE_ENV",
    "DEFAULT_URL",
    "URL_ENV",
    "AsyncVLLMProxyClient",
    "AuthenticationError",
    "ConnectionFileError",
    "InstanceStatus",
    "LoadResult",
    "LoadResultDict",
    "NoRoomError",
    "NodesStatus",
    "PermissionDeniedError",
    "ProcessState",
    "ProxyError",
    "ProxyUnreachable",
    "Status",
    "StatusDict",
    "SwitchError",
    "SwitchResult",
    "SwitchResultDict",
    "UnknownModelError",
    "UnloadResult",
    "UnloadResultDict",
    "VLLMProxyClient",
    "WaitTimeout",
    "build_spec",
    "catalog_spec",
    "read_connection_file",
]
