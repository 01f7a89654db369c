"""aic-vllm-proxy plugin ``warmup``: warm-up requests after a switch (see :mod:`.plugin`)."""

__version__ = "0.1.0"
