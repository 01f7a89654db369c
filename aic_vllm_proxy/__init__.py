"""aic-vllm-proxy: run `vllm serve` on a GPU node, switch models on request, proxy every call.

The package has a folder per plane; each imports only the planes below it (checked by
``tests/test_layers.py``; docs/architecture.md tells the whole story)::

    cli, __main__   the command line: ``aic-vllm-proxy`` (daemon and client commands)
    web/            the control plane: the application, its routes, the listening socket,
                    the one table that maps engine errors to HTTP
    relay/          the data plane: the front door, the aiohttp adapter, the upstream pool,
                    key checks, HTTP error answers
    engine/         one vLLM process: state machine, supervisor, launch, readiness,
                    process group, watchdog, logs. No HTTP statuses, no aiohttp.web
    hooks/          lifecycle hooks: their specs (what plugins import) and the runner
    config, spec, catalog, schemas, errors, vllm_flags
                    pure: settings, model specs and vLLM's flags, the catalogue, the JSON
                    shapes shared with the client, the engine's domain errors

    client/         apart: the notebook / script client, its CLI and switch progress
                    (imports only schemas, spec, catalog)
    simulator/      apart: a stand-in for ``vllm serve`` for tests and GPU-less machines

This module stays tiny on purpose: helper processes (the watchdog, the simulator)
import the package and must start fast.
"""

__version__ = "0.1.0"
