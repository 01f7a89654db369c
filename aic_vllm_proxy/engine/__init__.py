"""The engine: the vLLM processes and everything that keeps them honest.

- ``state``      the state machine (every state and allowed transition, as data)
- ``supervisor`` the daemon's instances, what the web and relay planes call (today: the primary)
- ``instance``   one slot (name, port, GPUs): switch, stop, drain, restart policy, health watch
- ``launch``     the command line, environment and process of one launch
- ``prober``     readiness (the listener is ours, ``/health``, ``/v1/models``)
- ``procgroup``  process groups: signal, kill, who listens on a port
- ``watchdog``   a separate process that kills the group if the daemon dies
- ``logs``       launch logs: naming, tails, the root cause of a failed start
- ``gpus``       the node's GPUs (``--gpus``, ``CUDA_VISIBLE_DEVICES``, NVML) and an instance's
- ``placement``  policy: does a model fit on its GPUs, what to evict, when an idle one expires

No HTTP statuses here: the engine raises :mod:`aic_vllm_proxy.errors`.
"""
