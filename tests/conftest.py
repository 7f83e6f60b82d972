"""Shared fixtures: tiny real HF models on disk, and a private cache directory."""
from __future__ import annotations

import os
import warnings

import pytest

from tiny_models import FAMILIES, write_tiny_hf_model

# megatron-core warns at import that Apex/Transformer Engine are absent: expected on CPU.
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    os.environ["MEGATRON_RL_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """family → HF directory; Qwen2 has tied embeddings so both variants are covered."""
    root = tmp_path_factory.mktemp("hf")
    return {family: write_tiny_hf_model(root / family, family, tied=family == "qwen2") for family in FAMILIES}
