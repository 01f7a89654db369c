"""A stand-in for ``vllm serve`` that needs no GPU.

``python -m aic_vllm_proxy.simulator serve MODEL [options]`` accepts the command line
of ``vllm serve``, prints vLLM's log lines (those of vLLM 0.32), starts a child
"EngineCore" process, listens on its port only once the simulated weights are loaded
and then serves vLLM's HTTP API (OpenAI-compatible completions, chat, embeddings,
tokenize, health, metrics) with deterministic toy generation. Options prefixed
``--sim-`` select timings and failure modes (see ``cli.py``).

Modules: ``cli`` (arguments), ``runner`` (the API server's life), ``server`` (HTTP
routes), ``protocol`` (request validation, error bodies), ``generation`` (toy
tokenizer and response shapes), ``engine`` (the child process) and
``engine_client`` (its supervision), ``multinode`` and ``headless`` (``--nnodes``,
``--headless``: see docs/simulator.md), ``state``, ``metrics``, ``logfmt``,
``vllm_flags`` (every real ``vllm serve`` flag).

This module must stay free of heavy imports: the engine child imports the package.
"""

VLLM_VERSION = "0.32.0"
"""The vLLM version the simulator claims to be (``/version``, ``--version``, logs)."""

__all__ = ["VLLM_VERSION"]
