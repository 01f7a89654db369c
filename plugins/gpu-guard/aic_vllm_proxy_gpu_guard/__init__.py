"""aic-vllm-proxy plugin ``gpu-guard``: room on the GPUs before a switch, memory released
after a stop. The hooks are in :mod:`.plugin`, the checks in :mod:`.guard`, the NVML sources
(real and fake) in :mod:`.nvml`."""

__version__ = "0.1.0"
