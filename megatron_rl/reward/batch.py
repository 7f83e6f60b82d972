"""Score a batch of finished samples in parallel.

Processes, not threads: math-verify is CPU-bound sympy, so threads would share one GIL, and a
process pool's tasks run in their worker's main thread, where math-verify's signal timeouts stop
a pathological answer (see reward.math). Workers are spawned rather than forked because the
trainer process holds CUDA state and threads, which a fork would copy in an unusable state.
"""
from __future__ import annotations

import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Literal

from megatron_rl.reward.math import answers_equivalent, extract_final_answer
from megatron_rl.reward.repetition import RepetitionConfig

DEFAULT_WORKERS = min(8, os.cpu_count() or 1)


@dataclass(frozen=True)
class RewardRequest:
    sample_id: str
    response_text: str
    reference_answer: str
    task_type: Literal["math"]
    degenerate: bool = False  # the rollout stopped it for repetition (see reward.repetition)


@dataclass(frozen=True)
class RewardResult:
    sample_id: str
    reward: float
    correct: bool
    extracted_answer: str | None
    reason: str  # correct, wrong_answer, no_answer, degenerate_repetition, or "error: ..."


def score_batch(
    requests: Sequence[RewardRequest],
    workers: int = DEFAULT_WORKERS,
    degenerate_penalty: float = RepetitionConfig().penalty,
    executor: Executor | None = None,
) -> list[RewardResult]:
    """One result per request, in the same order; a failure scores only its own sample (reward 0).

    Degenerate samples get `degenerate_penalty` without being scored. With `workers` ≤ 1 the
    batch is scored in the calling thread. Pass a long-lived `executor` to avoid starting a
    process pool on every call; the caller then owns its lifetime.
    """
    if executor is not None:
        return _score_with(executor, requests, degenerate_penalty)
    if workers <= 1 or len(requests) <= 1:
        return [_score_or_error(request, degenerate_penalty) for request in requests]
    pool_size = min(workers, len(requests))
    with ProcessPoolExecutor(pool_size, mp_context=multiprocessing.get_context("spawn")) as pool:
        return _score_with(pool, requests, degenerate_penalty)


def _score_with(executor: Executor, requests: Sequence[RewardRequest], degenerate_penalty: float) -> list[RewardResult]:
    futures = [executor.submit(_score, request, degenerate_penalty) for request in requests]
    results = []
    for request, future in zip(requests, futures):
        try:
            results.append(future.result())
        except Exception as error:  # includes a crashed worker (BrokenProcessPool)
            results.append(_error_result(request, error))
    return results


def _score_or_error(request: RewardRequest, degenerate_penalty: float) -> RewardResult:
    try:
        return _score(request, degenerate_penalty)
    except Exception as error:
        return _error_result(request, error)


def _score(request: RewardRequest, degenerate_penalty: float) -> RewardResult:
    if request.degenerate:
        return RewardResult(request.sample_id, degenerate_penalty, False, None, "degenerate_repetition")
    if request.task_type != "math":
        raise ValueError(f"unsupported task_type {request.task_type!r}; supported: math")
    answer = extract_final_answer(request.response_text)
    if answer is None:
        return RewardResult(request.sample_id, 0.0, False, None, "no_answer")
    correct = answers_equivalent(answer, request.reference_answer)
    reason = "correct" if correct else "wrong_answer"
    return RewardResult(request.sample_id, 1.0 if correct else 0.0, correct, answer, reason)


def _error_result(request: RewardRequest, error: Exception) -> RewardResult:
    return RewardResult(request.sample_id, 0.0, False, None, f"error: {type(error).__name__}: {error}")
