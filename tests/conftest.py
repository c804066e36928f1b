"""Shared fixtures: an isolated qwen-batch home, the tiny model, and manifest helpers.

Every test runs offline against the tiny random-weight model, built once per session.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The S3 API fixtures (moto's server on loopback) for any test that asks for them.
pytest_plugins = ["tests.s3_server"]

# No test may reach a model hub: the tiny model is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def qwen_batch_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("qwen-batch-home")


@pytest.fixture(autouse=True)
def _isolated_home(qwen_batch_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWEN_BATCH_HOME", str(qwen_batch_home))


@pytest.fixture(scope="session")
def tiny_model(qwen_batch_home: Path) -> Path:
    """The folder of the tiny model, as `--model tiny` resolves it."""
    os.environ["QWEN_BATCH_HOME"] = str(qwen_batch_home)
    from qwen_batch.weights.model_source import ensure_tiny_model

    return ensure_tiny_model()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` run on the GPU machine (`pytest -m gpu`) and skip themselves elsewhere."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
