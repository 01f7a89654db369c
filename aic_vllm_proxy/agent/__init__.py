"""The agent: ``aic-vllm-proxy agent --head URL``, run on every other node of a job, runs the
ranks of a model across nodes that the head (the daemon) asks it to (``runner.py``)."""
