"""aic-vllm-proxy: run `vllm serve` on a GPU node, switch models on request, proxy every call.

The package is split by concern (see docs/architecture.md):

- ``cli``        command line: ``aic-vllm-proxy`` (daemon and client commands)
- ``config``     settings from options, environment variables and a TOML file
- ``app``        builds the aiohttp application: routes, shared state, start-up and shutdown
- ``control``    the proxy's own HTTP routes (/status, /switch, /stop, /logs/*, ...)
- ``supervisor`` the one vLLM process and its state machine (``state``)
- ``prober``     readiness and health checks against vLLM
- ``proxy``      the streaming passthrough for every other path
- ``hooks``      lifecycle hook specifications and plugin loading
- ``client``     the notebook / script client (needs the ``client`` extra)
- ``simulator``  a stand-in for ``vllm serve`` for tests and GPU-less machines

This module stays tiny on purpose: helper processes (the watchdog, the simulator)
import the package and must start fast.
"""

__version__ = "0.1.0"
