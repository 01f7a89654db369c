"""Counters behind ``/metrics`` (Prometheus text, vLLM's metric names) and the
periodic ``Engine 000: Avg prompt throughput ...`` log line."""

from __future__ import annotations

import time
from collections import Counter


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


class Metrics:
    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.running = 0
        self.waiting = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.success: Counter[str] = Counter()
        self._last_log = time.monotonic()
        self._last_prompt = 0
        self._last_generation = 0
        self._last_idle = True

    def finished(self, reason: str) -> None:
        self.success[reason] += 1

    def render(self) -> str:
        base = _labels(engine="0", model_name=self.model_name)
        lines = [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{base} {float(self.running)}",
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{base} {float(self.waiting)}",
            "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{base} {min(1.0, self.running / 256):.4f}",
            "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
            "# TYPE vllm:prompt_tokens_total counter",
            f"vllm:prompt_tokens_total{base} {float(self.prompt_tokens)}",
            "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
            "# TYPE vllm:generation_tokens_total counter",
            f"vllm:generation_tokens_total{base} {float(self.generation_tokens)}",
            "# HELP vllm:request_success_total Count of successfully processed requests.",
            "# TYPE vllm:request_success_total counter",
        ]
        for reason in ("stop", "length", "abort", "error", "repetition"):
            labels = _labels(engine="0", finished_reason=reason, model_name=self.model_name)
            lines.append(f"vllm:request_success_total{labels} {float(self.success[reason])}")
        return "\n".join(lines) + "\n"

    def stats_line(self) -> str | None:
        """vLLM's periodic throughput line, or None when idle since the last one."""
        now = time.monotonic()
        elapsed = max(now - self._last_log, 1e-6)
        prompt = (self.prompt_tokens - self._last_prompt) / elapsed
        generation = (self.generation_tokens - self._last_generation) / elapsed
        idle = prompt == 0 and generation == 0 and self.running == 0 and self.waiting == 0
        self._last_log = now
        self._last_prompt = self.prompt_tokens
        self._last_generation = self.generation_tokens
        if idle and self._last_idle:
            return None
        self._last_idle = idle
        usage = min(100.0, self.running / 256 * 100)
        return (
            f"Engine 000: Avg prompt throughput: {prompt:.1f} tokens/s, "
            f"Avg generation throughput: {generation:.1f} tokens/s, "
            f"Running: {self.running} reqs, Waiting: {self.waiting} reqs, "
            f"GPU KV cache usage: {usage:.1f}%, Prefix cache hit rate: 0.0%"
        )
