"""Reward routing in score_batch: math in processes, code through a real sandbox service (`python -m
megatron_rl.reward.sandbox.server` on 127.0.0.1, reached with the SandboxClient that reward.sandbox_url
makes), in one batch, results in request order. The judge route is in test_reward_judge.py."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from megatron_rl.errors import UserError
from megatron_rl.net import free_port
from megatron_rl.reward.batch import RewardBackends, RewardRequest, score_batch
from megatron_rl.reward.code_tests import parse_code_answer
from megatron_rl.reward.code import FunctionCallTest, StdioTest
from megatron_rl.reward.sandbox import SandboxUnreachable

ADD_TESTS = json.dumps({"tests": [{"stdin": "1 2\n", "expected_stdout": "3\n"}, {"stdin": "-4 4", "expected_stdout": "0"}]})
CALL_TESTS = json.dumps({"timeout_s": 5, "tests": [{"function": "double", "args": [21], "expected": 42}]})


def fenced(program: str) -> str:
    return f"Here is my solution.\n```python\n{program}\n```"


@pytest.fixture(scope="module")
def sandbox_url(tmp_path_factory):
    port = free_port()
    log = open(tmp_path_factory.mktemp("sandbox") / "server.log", "w+")
    process = subprocess.Popen([sys.executable, "-m", "megatron_rl.reward.sandbox.server", "--host", "127.0.0.1",
                                "--port", str(port), "--workers", "2"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    client = RewardBackends.connect(sandbox_url=url).sandbox
    deadline = time.monotonic() + 60
    try:
        while True:
            try:
                client.health()
                break
            except SandboxUnreachable:
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail(f"the sandbox server did not start: {log.read()}")
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(15)
        log.close()


def test_code_and_math_requests_are_scored_by_their_own_route_in_order(sandbox_url):
    backends = RewardBackends.connect(sandbox_url=sandbox_url, code_concurrency=2)
    requests = [
        RewardRequest("math-right", "so \\boxed{6}", "6", "math"),
        RewardRequest("code-right", fenced("a, b = map(int, input().split())\nprint(a + b)"), ADD_TESTS, "code"),
        RewardRequest("code-wrong", fenced("a, b = map(int, input().split())\nprint(a - b)"), ADD_TESTS, "code"),
        RewardRequest("code-crash", fenced("raise SystemExit(3)"), ADD_TESTS, "code"),
        RewardRequest("code-none", "I would add the numbers.", ADD_TESTS, "code"),
        RewardRequest("math-wrong", "so \\boxed{7}", "6", "math"),
        RewardRequest("call-right", fenced("def double(x):\n    return 2 * x"), CALL_TESTS, "code"),
        RewardRequest("code-bad-answer", fenced("print(1)"), '{"tests": []}', "code"),
        RewardRequest("code-loop", fenced("while True: pass"), ADD_TESTS, "code", degenerate=True),
    ]
    results = score_batch(requests, workers=2, degenerate_penalty=-1.0, backends=backends)
    assert [r.sample_id for r in results] == [r.sample_id for r in requests]
    by_id = {r.sample_id: r for r in results}
    assert [(by_id[i].reward, by_id[i].correct) for i in ("math-right", "code-right", "call-right")] == [(1.0, True)] * 3
    assert by_id["code-right"].extracted_answer == "a, b = map(int, input().split())\nprint(a + b)\n"
    assert by_id["code-wrong"].reason.startswith("failed_test 0: wrong_answer: expected '3', got '-1'")
    assert by_id["code-crash"].reason.startswith("failed_test 0: runtime_error")
    assert by_id["code-none"].reason == "no_program"
    assert by_id["math-wrong"].reason == "wrong_answer"
    assert by_id["code-bad-answer"].reason.startswith("error: ValueError: code answer: tests:")
    assert (by_id["code-loop"].reward, by_id["code-loop"].reason) == (-1.0, "degenerate_repetition")
    assert all(by_id[i].reward == 0.0 for i in ("code-wrong", "code-crash", "code-none", "math-wrong",
                                                "code-bad-answer"))


def test_code_and_judge_prompts_need_their_backend():
    with pytest.raises(UserError, match="code prompts need a sandbox.*reward.sandbox_url"):
        score_batch([RewardRequest("c", fenced("print(3)"), ADD_TESTS, "code")], workers=1)
    with pytest.raises(UserError, match="judge prompts need a judge model: set reward.judge.engine_url"):
        score_batch([RewardRequest("j", "6", "6", "judge", question="2 * 3?")], workers=1)
    with pytest.raises(ValueError, match="unsupported task_type 'poetry'"):
        score_batch([RewardRequest("p", "6", "6", "poetry")], workers=1)


def test_code_answer_format():
    problem = parse_code_answer(json.dumps({"language": "python", "timeout_s": 2, "memory_mb": 128, "tests": [
        {"stdin": "1", "expected_stdout": "1"}, {"function": "f", "args": [1], "kwargs": {"k": 2}, "expected": None}]}))
    assert problem.tests == (StdioTest("1", "1"), FunctionCallTest("f", (1,), {"k": 2}, None))
    assert (problem.limits.timeout_s, problem.limits.memory_mb) == (2, 128)
    for answer, message in [("7", "answer: Input should be an object"),
                            ('{"tests": [{"stdin": "1"}]}', "tests.0"),
                            ('{"tests": [{"function": "f"}]}', "tests.0"),
                            ('{"language": "cpp", "tests": [{"function": "f", "expected": 1}]}', "need \"language\": \"python\""),
                            ("not json", "answer: Invalid JSON")]:
        with pytest.raises(ValueError, match=message):
            parse_code_answer(answer)


def test_math_workers_end_when_the_process_that_made_them_is_killed():
    """A trainer killed with SIGKILL (an operator, a node drain, the fault tests) leaves no reward workers."""
    program = ("import os, time\n"
               "from megatron_rl.reward.batch import math_worker_pool\n"
               "pool = math_worker_pool(2)\n"
               "print(*sorted({pool.submit(os.getpid).result() for _ in range(8)}), flush=True)\n"
               "time.sleep(600)\n")
    owner = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(pid) for pid in owner.stdout.readline().split()]
        assert workers and all(_alive(pid) for pid in workers)
    finally:
        owner.kill()
        owner.wait()
    deadline = time.monotonic() + 15
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers), "reward workers outlived the killed process"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"  # a zombie has ended (its reaper is init)
    except FileNotFoundError:
        return False
