"""Rollout: the inference-engine boundary.

`EngineClient` (client.py) speaks SGLang 0.5.23's native HTTP API; it drives a real SGLang server and
the embedded CPU engine (`megatron-rl engine serve`, embedded_server.py + embedded_engine.py) alike.
Wire formats live in protocol.py. Importing this package is light (no torch, no transformers).
"""
from megatron_rl.rollout.client import EngineClient
from megatron_rl.rollout.protocol import (
    EngineError, EngineUnreachable, GenerateRequest, GenerateResult, ModelInfo, SamplingParams, UpdateWeightsResult,
)

__all__ = [
    "EngineClient", "EngineError", "EngineUnreachable", "GenerateRequest", "GenerateResult", "ModelInfo",
    "SamplingParams", "UpdateWeightsResult",
]
