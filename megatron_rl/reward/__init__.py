"""Rewards for finished samples: rule-based maths checking, repetition detection, batch scoring.

Names are imported on first use, so importing a light piece (the config imports RepetitionConfig)
does not load math-verify and sympy.
"""
import importlib

_EXPORTS = {
    "RepetitionConfig": "repetition",
    "RepetitionDetector": "repetition",
    "RewardRequest": "batch",
    "RewardResult": "batch",
    "score_batch": "batch",
    "answers_equivalent": "math",
    "extract_final_answer": "math",
    "math_reward": "math",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
