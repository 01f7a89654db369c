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
(``POST /switch`` with ``"wait": false``), then polls ``GET /status`` and follows the new vLLM
log (``GET /logs/stream``) until the model is ready or has failed.
"""

from aic_vllm_proxy.client.aio import AsyncVLLMProxyClient
from aic_vllm_proxy.client.calls import API_KEY_ENV, DEFAULT_URL, URL_ENV, build_spec, catalog_spec
from aic_vllm_proxy.client.errors import (
    AuthenticationError,
    PermissionDeniedError,
    ProxyError,
    ProxyUnreachable,
    SwitchError,
    UnknownModelError,
    WaitTimeout,
)
from aic_vllm_proxy.client.sync import VLLMProxyClient
from aic_vllm_proxy.client.views import StatusDict, SwitchResultDict
from aic_vllm_proxy.schemas import ProcessState, Status, SwitchResult

__all__ = [
    "API_KEY_ENV",
    "DEFAULT_URL",
    "URL_ENV",
    "AsyncVLLMProxyClient",
    "AuthenticationError",
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
    "VLLMProxyClient",
    "WaitTimeout",
    "build_spec",
    "catalog_spec",
]
