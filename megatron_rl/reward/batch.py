"""Score a batch of finished samples in parallel; each request's `task_type` picks how.

* "math": rule-based (reward.math). Processes, not threads: math-verify is CPU-bound sympy, so threads
  would share one GIL, and a process pool's tasks run in their worker's main thread, where math-verify's
  signal timeouts stop a pathological answer (see reward.math). Workers are spawned rather than forked
  because the trainer process holds CUDA state and threads, which a fork would copy in an unusable state.
* "code": the program in the response runs against the prompt's tests (the answer's format:
  reward.code_tests) in a sandbox (`RewardBackends.sandbox`), from threads: the work is in the sandbox.
* "judge": a chain-of-thought reward model (reward.judge) grades the response, one batched engine call.

Math runs in the pool while code and judge requests are scored in the calling process.
"""
from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from megatron_rl.errors import UserError
from megatron_rl.reward.math import answers_equivalent, extract_final_answer
from megatron_rl.reward.repetition import RepetitionConfig

DEFAULT_WORKERS = min(8, os.cpu_count() or 1)
TASK_TYPES = ("math", "code", "judge")

if TYPE_CHECKING:
    from megatron_rl.reward.judge import Judge, JudgeConfig
    from megatron_rl.reward.sandbox.pool import Sandbox


def math_worker_pool(workers: int) -> ProcessPoolExecutor:
    """Spawned worker processes for math rewards (see the module docstring), which end when the process
    that made the pool dies, even by SIGKILL: a killed trainer leaves no workers behind."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_exit_with_parent, initargs=(os.getpid(),))


def _exit_with_parent(parent_pid: int) -> None:
    # A watcher thread, not PR_SET_PDEATHSIG: that fires when the spawning *thread* ends, and the pool spawns
    # its workers from whichever thread submits.
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


@dataclass(frozen=True)
class RewardRequest:
    sample_id: str
    response_text: str
    reference_answer: str  # for "code": the JSON test cases (reward.code_tests)
    task_type: Literal["math", "code", "judge"]
    degenerate: bool = False  # the rollout stopped it for repetition (see reward.repetition)
    question: str | None = None  # the prompt's question; the judge needs it


@dataclass
class RewardBackends:
    """What code and judge requests are scored with; math needs none. Built once per run (`connect`)."""

    sandbox: Sandbox | None = None  # SandboxPool (in process) or SandboxClient
    judge: Judge | None = None
    code_concurrency: int = 8  # programs run at once

    @classmethod
    def connect(cls, sandbox_url: str | None = None, judge: JudgeConfig | None = None,
                code_concurrency: int = 8) -> RewardBackends:
        """Clients of the sandbox service at `sandbox_url` and of the judge `judge` describes (either optional)."""
        sandbox = None
        if sandbox_url is not None:
            from megatron_rl.reward.sandbox.client import SandboxClient

            sandbox = SandboxClient(sandbox_url)
        if judge is None:
            return cls(sandbox, None, code_concurrency)
        from megatron_rl.reward.judge import Judge

        return cls(sandbox, Judge.connect(judge), code_concurrency)


@dataclass(frozen=True)
class RewardResult:
    sample_id: str
    reward: float
    correct: bool
    extracted_answer: str | None
    # correct, wrong_answer, no_answer, degenerate_repetition, "error: ...";
    # code: no_program, "failed_test I: STATUS: detail"; judge: "malformed_verdict|truncated|engine_error: why"
    reason: str


def score_batch(
    requests: Sequence[RewardRequest],
    workers: int = DEFAULT_WORKERS,
    degenerate_penalty: float = RepetitionConfig().penalty,
    executor: Executor | None = None,
    backends: RewardBackends | None = None,
) -> list[RewardResult]:
    """One result per request, in the same order; a failure scores only its own sample (reward 0).

    Degenerate samples get `degenerate_penalty` without being scored. Math: with `workers` ≤ 1 it is
    scored in the calling thread; pass a long-lived `executor` to avoid starting a process pool on every
    call (the caller then owns its lifetime). Code and judge requests need `backends` (UserError without).
    """
    backends = backends or RewardBackends()
    for request in requests:
        if request.task_type not in TASK_TYPES:
            raise ValueError(f"unsupported task_type {request.task_type!r}; supported: {', '.join(TASK_TYPES)}")
    scored = {"math": [], "code": [], "judge": []}
    results: dict[int, RewardResult] = {}
    for position, request in enumerate(requests):
        if request.degenerate:
            results[position] = RewardResult(request.sample_id, degenerate_penalty, False, None, "degenerate_repetition")
        else:
            scored[request.task_type].append(position)
    if scored["code"] and backends.sandbox is None:
        raise UserError("code prompts need a sandbox to run their programs: start `megatron-rl sandbox serve` and set "
                        "reward.sandbox_url")
    if scored["judge"] and backends.judge is None:
        raise UserError("judge prompts need a judge model: set reward.judge.engine_url (an engine serving it)")
    math_requests = [requests[position] for position in scored["math"]]
    pool = None
    if executor is None and workers > 1 and len(math_requests) > 1:
        pool = executor = math_worker_pool(min(workers, len(math_requests)))
    try:
        # Submitted first, so the pool works on math while code and judge requests are scored here.
        math_futures = [executor.submit(_score_math, request) for request in math_requests] if executor else None
        results.update(zip(scored["code"], _score_code([requests[p] for p in scored["code"]], backends)))
        results.update(zip(scored["judge"], _score_judged([requests[p] for p in scored["judge"]], backends)))
        if math_futures is None:
            results.update((p, _score_or_error(_score_math, requests[p])) for p in scored["math"])
        else:
            results.update(zip(scored["math"], _collect(math_requests, math_futures)))
    finally:
        if pool is not None:
            pool.shutdown()
    return [results[position] for position in range(len(requests))]


def _collect(requests: Sequence[RewardRequest], futures: Sequence[Future]) -> list[RewardResult]:
    results = []
    for request, future in zip(requests, futures):
        try:
            results.append(future.result())
        except Exception as error:  # includes a crashed worker (BrokenProcessPool)
            results.append(_error_result(request, error))
    return results


def _score_or_error(score, request: RewardRequest) -> RewardResult:
    try:
        return score(request)
    except Exception as error:
        return _error_result(request, error)


def _score_code(requests: Sequence[RewardRequest], backends: RewardBackends) -> list[RewardResult]:
    if not requests:
        return []

    def score(request: RewardRequest) -> RewardResult:
        from megatron_rl.reward.code import CodeReward
        from megatron_rl.reward.code_tests import parse_code_answer

        problem = parse_code_answer(request.reference_answer)
        outcome = CodeReward(backends.sandbox, language=problem.language, limits=problem.limits).score(
            request.response_text, problem.tests)
        if outcome.passed:
            reason = "correct"
        elif outcome.reason == "no_program":
            reason = "no_program"
        else:
            failed = next(verdict for verdict in outcome.verdicts if not verdict.passed)
            reason = f"failed_test {failed.index}: {failed.status}: {failed.detail}"
        return RewardResult(request.sample_id, outcome.reward, outcome.passed, outcome.program, reason)

    with ThreadPoolExecutor(max(1, min(backends.code_concurrency, len(requests)))) as threads:
        return list(threads.map(lambda request: _score_or_error(score, request), requests))


def _score_judged(requests: Sequence[RewardRequest], backends: RewardBackends) -> list[RewardResult]:
    from megatron_rl.reward.judge import JudgeItem

    if not requests:
        return []
    items = [JudgeItem(request.question or "", request.reference_answer, request.response_text) for request in requests]
    outcomes = backends.judge.judge(items)
    return [RewardResult(request.sample_id, 1.0 if outcome.correct else 0.0, outcome.correct, None, outcome.reason)
            for request, outcome in zip(requests, outcomes)]


def _score_math(request: RewardRequest) -> RewardResult:
    answer = extract_final_answer(request.response_text)
    if answer is None:
        return RewardResult(request.sample_id, 0.0, False, None, "no_answer")
    correct = answers_equivalent(answer, request.reference_answer)
    reason = "correct" if correct else "wrong_answer"
    return RewardResult(request.sample_id, 1.0 if correct else 0.0, correct, answer, reason)


def _error_result(request: RewardRequest, error: Exception) -> RewardResult:
    return RewardResult(request.sample_id, 0.0, False, None, f"error: {type(error).__name__}: {error}")
