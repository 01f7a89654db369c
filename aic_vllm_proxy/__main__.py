"""``python -m aic_vllm_proxy serve ...`` runs the same command line as ``aic-vllm-proxy``."""

from aic_vllm_proxy.cli import main

if __name__ == "__main__":
    main()
