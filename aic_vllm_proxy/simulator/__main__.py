"""``python -m aic_vllm_proxy.simulator serve MODEL [options]``."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
