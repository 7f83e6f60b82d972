"""Code rewards: program extraction, output comparison, per-test verdicts, k1.5 test-case validation.

Programs run in a real sandbox pool (see tests/test_sandbox.py for the sandbox itself).
"""
from __future__ import annotations

import textwrap

import pytest

from megatron_rl.reward.code import (
    CodeReward, FunctionCallTest, Limits, StdioTest, extract_program, stdout_matches, validate_problem, values_match,
)
from megatron_rl.reward.sandbox import SandboxPool, detect


@pytest.fixture(scope="module")
def pool():
    isolation = detect()
    if not isolation.isolated:
        pytest.fail("the sandbox has no isolation on this machine: " + "; ".join(isolation.notes)
                    + " (run as root after `apt-get install -y bubblewrap`)")
    with SandboxPool(isolation, workers=2) as sandbox:
        yield sandbox


def respond(program: str, language: str = "python") -> str:
    return f"Let me think.\n\n```{language}\n{textwrap.dedent(program).strip()}\n```\n\nDone."


MAX_PROGRAM = """
    numbers = [int(x) for x in input().split()]
    print(max(numbers))
"""
MAX_TESTS = [StdioTest("3 1 2\n", "3\n"), StdioTest("-5 -9\n", "-5"), StdioTest("7\n", "7  \n\n")]


# ---------------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------------


def test_extract_program_takes_the_last_block_of_the_language():
    response = ("```python\nprint(1)\n```\ntext\n```\nprint('untagged')\n```\n"
                "```py\nprint(2)\n```\n```bash\nls\n```\n")
    assert extract_program(response) == "print(2)\n"
    assert extract_program("```\nprint('untagged')\n```") == "print('untagged')\n"
    assert extract_program("```cpp\nint main() {}\n```", "cpp") == "int main() {}\n"
    assert extract_program("```cpp\nint main() {}\n```") is None  # tagged with another language
    assert extract_program("no code here") is None
    # A block cut off by the length limit is no program; the closed one before it is.
    assert extract_program("```python\nprint(1)\n```\n```python\nprint(2") == "print(1)\n"
    assert extract_program("```python\n   \n```") is None


def test_stdout_comparison_ignores_only_trailing_whitespace():
    assert stdout_matches("1 2\n3\n", "1 2   \n3\n\n\n")
    assert stdout_matches("1\r\n2", "1\n2\n")
    assert not stdout_matches("1  2\n", "1 2\n")
    assert not stdout_matches("1\n\n2\n", "1\n2\n")
    assert not stdout_matches("", "0\n")


def test_value_comparison():
    assert values_match([1, [2.0000000001, {"a": True}]], [1, [2, {"a": True}]])
    assert not values_match(1, True) and not values_match(True, 1)
    assert not values_match([1, 2], [1, 2, 3])
    assert not values_match({"a": 1}, {"b": 1})
    assert values_match(None, None) and not values_match(None, 0)
    assert not values_match(0.1, 0.2) and not values_match("1", 1)


# ---------------------------------------------------------------------------------------------------
# Rewards
# ---------------------------------------------------------------------------------------------------


def test_reward_is_one_only_when_every_stdio_test_passes(pool):
    reward = CodeReward(pool)
    result = reward.score(respond(MAX_PROGRAM), MAX_TESTS)
    assert (result.reward, result.passed, result.reason) == (1.0, True, "passed")
    assert [v.status for v in result.verdicts] == ["passed"] * 3
    assert result.verdicts[0].output == "3\n"

    minimum = "print(min(int(x) for x in input().split()))"
    result = reward.score(respond(minimum), MAX_TESTS)
    assert (result.reward, result.reason) == (0.0, "failed_tests")
    assert [v.status for v in result.verdicts] == ["wrong_answer", "skipped", "skipped"]
    assert result.verdicts[0].detail == "expected '3', got '1'"


def test_every_test_runs_without_early_stop(pool):
    reward = CodeReward(pool, stop_on_first_failure=False, concurrency=2, limits=Limits(timeout_s=1))
    program = """
        import sys
        numbers = [int(x) for x in input().split()]
        if len(numbers) == 1:
            sys.exit("single numbers are not handled")
        if numbers[0] < 0:
            while True:
                pass
        print(max(numbers))
    """
    result = reward.score(respond(program), MAX_TESTS)
    assert result.reward == 0.0
    assert [v.status for v in result.verdicts] == ["passed", "timeout", "runtime_error"]
    assert "single numbers are not handled" in result.verdicts[2].detail


def test_per_test_limits_apply(pool):
    reward = CodeReward(pool, limits=Limits(timeout_s=1, memory_mb=64))
    result = reward.score(respond("x = bytearray(1 << 30)\nx[::4096] = b'1' * len(x[::4096])\nprint(3)"), MAX_TESTS)
    assert result.verdicts[0].status == "memory_limit"


def test_no_program_scores_zero_without_running(pool):
    runs_before = pool.health().runs
    result = CodeReward(pool).score("The answer is 3.", MAX_TESTS)
    assert (result.reward, result.reason, result.program, result.verdicts) == (0.0, "no_program", None, ())
    assert pool.health().runs == runs_before


def test_tests_must_have_expected_outputs(pool):
    with pytest.raises(ValueError, match="validate_problem"):
        CodeReward(pool).score(respond("print(1)"), [StdioTest("1\n")])
    with pytest.raises(ValueError, match="at least one test"):
        CodeReward(pool).score(respond("print(1)"), [])


def test_function_call_tests(pool):
    reward = CodeReward(pool, stop_on_first_failure=False)
    tests = [FunctionCallTest("add", (2, 3), expected=5),
             FunctionCallTest("add", (), {"a": 0.1, "b": 0.2}, expected=0.3),
             FunctionCallTest("pair", (1,), expected=[1, 1]),
             FunctionCallTest("add", ("x", 1), expected=None)]
    program = """
        print("noise before the call")
        def add(a, b):
            print("noise inside")
            return a + b
        def pair(x):
            return (x, x)
    """
    result = reward.score(respond(program), tests)
    assert [v.status for v in result.verdicts] == ["passed", "passed", "passed", "runtime_error"]
    assert "TypeError" in result.verdicts[3].detail and result.reward == 0.0

    solution_class = """
        class Solution:
            def twoSum(self, nums, target):
                seen = {}
                for i, n in enumerate(nums):
                    if target - n in seen:
                        return [seen[target - n], i]
                    seen[n] = i
    """
    two_sum = [FunctionCallTest("twoSum", ([2, 7, 11, 15], 9), expected=[0, 1])]
    assert reward.score(respond(solution_class), two_sum).reward == 1.0

    exits_early = reward.score(respond("import sys\ndef add(a, b):\n    return a + b\nsys.exit(0)"), tests[:1])
    assert exits_early.verdicts[0].status == "wrong_answer"
    assert "returned nothing" in exits_early.verdicts[0].detail
    missing = reward.score(respond("def sub(a, b):\n    return a - b"), tests[:1])
    assert missing.verdicts[0].status == "runtime_error" and "no function" in missing.verdicts[0].detail
    unserializable = reward.score(respond("def add(a, b):\n    return {a, b}"), tests[:1])
    assert unserializable.verdicts[0].status == "runtime_error"


def test_cpp_stdio_tests(pool):
    if "cpp" not in pool.isolation.capabilities().languages:
        pytest.skip("no g++ on this machine (apt-get install g++): C++ is optional")
    program = """
        #include <algorithm>
        #include <iostream>
        #include <sstream>
        int main() {
            std::string line; std::getline(std::cin, line);
            std::istringstream in(line); long best = -1e18, x;
            while (in >> x) best = std::max(best, x);
            std::cout << best << "\\n";
        }
    """
    result = CodeReward(pool, language="cpp").score(respond(program, "cpp"), MAX_TESTS)
    assert result.reward == 1.0, result.verdicts


# ---------------------------------------------------------------------------------------------------
# Test-case validation (k1.5 §2.3.5)
# ---------------------------------------------------------------------------------------------------

GOOD_SOLUTIONS = [
    "print(max(int(x) for x in input().split()))",
    "import sys\nprint(max(map(int, sys.stdin.read().split())))",
    "xs = sorted(int(x) for x in input().split())\nprint(xs[-1])",
    "xs = [int(x) for x in input().split()]\nm = xs[0]\nfor x in xs:\n    m = max(m, x)\nprint(m)",
]
# On an empty input these disagree: two crash, two print 0, so that test has no majority.
GOOD_EMPTY_SAFE = [
    "print(max((int(x) for x in input().split()), default=0))",
    "import sys\nprint(max(map(int, sys.stdin.read().split()), default=0))",
]
FIRST_ELEMENT = "print(int(input().split()[0]))"  # right only when the maximum comes first
CRASHES = "raise SystemExit('not implemented')"
CANDIDATES = [StdioTest("3 1 2\n"), StdioTest("5 9 1\n"), StdioTest("\n"), StdioTest("4 4\n", "wrong expected")]


def test_validation_keeps_agreed_tests_and_rejects_weak_problems(pool):
    reward = CodeReward(pool, concurrency=2)
    # 8 right ones (all crash on an empty input), 1 right only when the maximum comes first, 1 crashing.
    solutions = GOOD_SOLUTIONS * 2 + [FIRST_ELEMENT, CRASHES]
    validation = validate_problem(reward, CANDIDATES, solutions)
    assert validation.solutions_sampled == 10
    # "3 1 2": 8 right + first-element = 9; "5 9 1": 8; "": all 8 good ones crash; "4 4": 9.
    assert validation.agreement == (9, 8, 0, 9)
    assert validation.valid_test_indices == (0, 1, 3)
    assert [t.expected_stdout for t in validation.tests] == ["3\n", "9\n", "4\n"]  # the agreed output wins
    assert validation.solutions_passing == 8
    assert not validation.admitted and "8/10 solutions" in validation.reason

    solutions = GOOD_SOLUTIONS * 2 + [FIRST_ELEMENT] + [GOOD_SOLUTIONS[0]]
    validation = validate_problem(reward, CANDIDATES[:2], solutions)
    assert (validation.admitted, validation.solutions_passing) == (True, 9)


def test_validation_drops_tests_without_a_majority(pool):
    reward = CodeReward(pool, concurrency=2)
    solutions = GOOD_SOLUTIONS + GOOD_SOLUTIONS[:1] + GOOD_EMPTY_SAFE * 2 + GOOD_SOLUTIONS[1:2]
    validation = validate_problem(reward, [StdioTest("\n"), StdioTest("2 8\n")], solutions)
    assert validation.agreement == (4, 10)  # four print 0 on empty input, six crash
    assert validation.valid_test_indices == (1,)
    assert validation.admitted
    too_few = validate_problem(reward, [StdioTest("\n"), StdioTest("2 8\n")], solutions, min_valid_tests=2)
    assert not too_few.admitted and "only 1 valid tests" in too_few.reason


def test_validation_samples_ten_solutions_and_handles_function_calls(pool):
    reward = CodeReward(pool, concurrency=2)
    solutions = ["def f(x):\n    return x * 2"] * 11 + ["def f(x):\n    return x + 2"]
    tests = [FunctionCallTest("f", (2,)), FunctionCallTest("f", (5,))]
    validation = validate_problem(reward, tests, solutions, seed=3)
    assert validation.solutions_sampled == 10
    # f(2) is 4 for every solution; f(5) is 10 for all but (possibly) the sampled odd one.
    assert validation.agreement[0] == 10 and validation.agreement[1] >= 9
    assert [t.expected for t in validation.tests] == [4, 10]
    assert validation.admitted
    assert validate_problem(reward, tests, solutions, seed=3).agreement == validation.agreement  # seeded
