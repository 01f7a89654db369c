"""aic-vllm-proxy plugin ``notify``: webhook events for switches, failed starts and crashes
(see :mod:`.plugin`)."""

__version__ = "0.1.0"
