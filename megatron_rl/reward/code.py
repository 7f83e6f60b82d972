"""Code rewards: run the program from a model's response against test cases in the sandbox.

Two kinds of test case:
* `StdioTest`: the program reads `stdin` and must print `expected_stdout`. Outputs are compared line by
  line, ignoring trailing whitespace on each line and trailing blank lines (as most judges do).
* `FunctionCallTest`: the program must define `function` (or a `Solution` class with that method, as in
  LeetCode-style problems); it is called with JSON `args`/`kwargs` and must return `expected`
  (compared as JSON values, floats to 1e-6 relative or absolute).

The reward is 1.0 when every test passes, else 0.0 (k1.5 §2.3.5); the result keeps a verdict per test.
`validate_problem` applies k1.5's test-case validation: from 10 sampled reference solutions, keep the
tests whose output at least 7 of them agree on (that output becomes the expected one), and keep the
problem if at least 9 of them pass every kept test.

The sandbox is anything with `run(RunRequest) -> RunResult`: a `SandboxPool` in process or a
`SandboxClient` of `megatron-rl sandbox serve`.
"""
from __future__ import annotations

import json
import math
import random
import re
import uuid
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from megatron_rl.reward.sandbox.pool import Sandbox
from megatron_rl.reward.sandbox.protocol import Language, RunRequest, RunResult

# Fence info strings that name each language (the first word after ```, any case).
LANGUAGE_TAGS: dict[str, frozenset[str]] = {
    "python": frozenset({"python", "python3", "py"}),
    "cpp": frozenset({"cpp", "c++", "cxx", "cc"}),
}
_FENCED_BLOCK = re.compile(r"^[ \t]*```[ \t]*([^\s`]*)[^\n]*\n(.*?)^[ \t]*```[ \t]*$", re.MULTILINE | re.DOTALL)
FLOAT_TOLERANCE = 1e-6


@dataclass(frozen=True)
class StdioTest:
    stdin: str
    expected_stdout: str | None = None  # None: not known yet (validate_problem fills it in)


@dataclass(frozen=True)
class FunctionCallTest:
    function: str
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    expected: Any = None
    has_expected: bool = True  # False: not known yet (validate_problem fills it in)


TestCase = StdioTest | FunctionCallTest

TestStatus = Literal["passed", "wrong_answer", "runtime_error", "timeout", "memory_limit", "output_limit", "killed",
                     "compile_error", "skipped"]


@dataclass(frozen=True)
class TestVerdict:
    index: int
    status: TestStatus  # "passed", "wrong_answer", the sandbox status of a failed run, or "skipped"
    detail: str  # one line: why it failed, or what it printed
    output: str | None = None  # the program's stdout (stdio) or its JSON result (function call)
    run: RunResult | None = None

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class CodeRewardResult:
    reward: float
    passed: bool
    reason: str  # passed, no_program, failed_tests (see verdicts)
    program: str | None
    verdicts: tuple[TestVerdict, ...]


@dataclass(frozen=True)
class Limits:
    """Per-test limits passed to the sandbox."""

    timeout_s: float = 10.0
    memory_mb: int = 512
    max_processes: int = 32
    max_output_bytes: int = 8 << 20


def extract_program(response: str, language: Language = "python") -> str | None:
    """The program in `response`: the last closed ``` block tagged with `language`, else the last untagged
    one, else None (a block cut off by the length limit is not a program)."""
    tagged, untagged = None, None
    for match in _FENCED_BLOCK.finditer(response):
        tag = match.group(1).lower()
        if tag in LANGUAGE_TAGS[language]:
            tagged = match.group(2)
        elif not tag:
            untagged = match.group(2)
    program = tagged if tagged is not None else untagged
    return program if program is not None and program.strip() else None


def stdout_matches(actual: str, expected: str) -> bool:
    """Equal line by line, ignoring trailing whitespace per line and trailing blank lines."""
    return _normalized_lines(actual) == _normalized_lines(expected)


def values_match(actual: Any, expected: Any) -> bool:
    """JSON values equal; floats within FLOAT_TOLERANCE; a bool never equals a number."""
    if isinstance(actual, bool) or isinstance(expected, bool):
        return isinstance(actual, bool) and isinstance(expected, bool) and actual == expected
    if isinstance(actual, (int, float)) and isinstance(expected, (int, float)):
        return math.isclose(actual, expected, rel_tol=FLOAT_TOLERANCE, abs_tol=FLOAT_TOLERANCE)
    if isinstance(actual, list) and isinstance(expected, list):
        return len(actual) == len(expected) and all(values_match(a, e) for a, e in zip(actual, expected))
    if isinstance(actual, dict) and isinstance(expected, dict):
        return actual.keys() == expected.keys() and all(values_match(actual[k], expected[k]) for k in actual)
    return type(actual) is type(expected) and actual == expected


class CodeReward:
    """Scores responses against tests in `sandbox`. Thread-safe (it holds no state between calls)."""

    def __init__(self, sandbox: Sandbox, *, language: Language = "python", limits: Limits = Limits(),
                 concurrency: int = 1, stop_on_first_failure: bool = True):
        self.sandbox = sandbox
        self.language = language
        self.limits = limits
        self.concurrency = concurrency
        self.stop_on_first_failure = stop_on_first_failure

    def score(self, response: str, tests: Sequence[TestCase]) -> CodeRewardResult:
        """Reward 1.0 if the program extracted from `response` passes every test, else 0.0."""
        if not tests:
            raise ValueError("a code reward needs at least one test case")
        for index, test in enumerate(tests):
            if not _has_expected(test):
                raise ValueError(f"tests[{index}] has no expected output; run validate_problem first")
        program = extract_program(response, self.language)
        if program is None:
            return CodeRewardResult(0.0, False, "no_program", None, ())
        verdicts = self.run_tests(program, tests)
        passed = all(verdict.passed for verdict in verdicts)
        return CodeRewardResult(1.0 if passed else 0.0, passed, "passed" if passed else "failed_tests", program,
                                tuple(verdicts))

    def run_tests(self, program: str, tests: Sequence[TestCase]) -> list[TestVerdict]:
        """One verdict per test, in order. With `stop_on_first_failure`, tests after a failure are skipped
        (with `concurrency` > 1, those already started still count)."""
        if self.concurrency <= 1:
            verdicts: list[TestVerdict] = []
            for index, test in enumerate(tests):
                if self.stop_on_first_failure and verdicts and not verdicts[-1].passed:
                    verdicts.append(TestVerdict(index, "skipped", "an earlier test failed"))
                else:
                    verdicts.append(self.run_test(program, test, index))
            return verdicts
        failed = False

        def run_one(index: int) -> TestVerdict:
            nonlocal failed
            if self.stop_on_first_failure and failed:
                return TestVerdict(index, "skipped", "an earlier test failed")
            verdict = self.run_test(program, tests[index], index)
            failed = failed or not verdict.passed
            return verdict

        with ThreadPoolExecutor(self.concurrency) as executor:
            return list(executor.map(run_one, range(len(tests))))

    def run_test(self, program: str, test: TestCase, index: int = 0) -> TestVerdict:
        """Run one test; the verdict carries the program's output even when no expected output is known."""
        if isinstance(test, StdioTest):
            result = self._run(program, test.stdin)
            if result.status != "ok":
                return _failed_run(index, result)
            if test.expected_stdout is None or stdout_matches(result.stdout, test.expected_stdout):
                return TestVerdict(index, "passed", "output matches", result.stdout, result)
            return TestVerdict(index, "wrong_answer", f"expected {_clip(test.expected_stdout)}, got "
                                                      f"{_clip(result.stdout)}", result.stdout, result)
        if self.language != "python":
            raise ValueError("function-call tests need language='python'")
        marker = f"@@megatron-rl-result-{uuid.uuid4().hex}@@"
        result = self._run(program + _call_harness(test, marker), "")
        if result.status != "ok":
            return _failed_run(index, result)
        lines = [line for line in result.stdout.splitlines() if line.startswith(marker)]
        if not lines:
            return TestVerdict(index, "wrong_answer", f"{test.function} returned nothing (the program exited "
                                                      "before the call)", None, result)
        output = lines[-1][len(marker):]
        if not test.has_expected or values_match(json.loads(output), test.expected):
            return TestVerdict(index, "passed", "result matches", output, result)
        return TestVerdict(index, "wrong_answer", f"expected {_clip(json.dumps(test.expected))}, got {_clip(output)}",
                           output, result)

    def _run(self, program: str, stdin: str) -> RunResult:
        return self.sandbox.run(RunRequest(program=program, language=self.language, stdin=stdin,
                                           timeout_s=self.limits.timeout_s, memory_mb=self.limits.memory_mb,
                                           max_processes=self.limits.max_processes,
                                           max_output_bytes=self.limits.max_output_bytes))


# ---------------------------------------------------------------------------------------------------
# Test-case validation (k1.5 §2.3.5)
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProblemValidation:
    admitted: bool
    tests: tuple[TestCase, ...]  # the valid tests, with the agreed output as the expected one
    valid_test_indices: tuple[int, ...]  # their positions among the candidate tests
    agreement: tuple[int, ...]  # per candidate test: how many sampled solutions gave the majority output
    solutions_passing: int  # sampled solutions that pass every valid test
    solutions_sampled: int
    reason: str


def validate_problem(reward: CodeReward, candidate_tests: Sequence[TestCase], reference_solutions: Sequence[str],
                     *, solutions_to_sample: int = 10, min_test_agreement: float = 0.7,
                     min_solutions_passing: float = 0.9, min_valid_tests: int = 1,
                     seed: int = 0) -> ProblemValidation:
    """k1.5's rule: sample `solutions_to_sample` reference solutions; a test is valid when at least
    `min_test_agreement` of them give the same output (which becomes its expected output); the problem
    is admitted when it has at least `min_valid_tests` valid tests (k1.5 wanted 40 of 50 generated)
    and at least `min_solutions_passing` of the solutions pass all of them.

    Expected outputs already on `candidate_tests` are ignored: the solutions decide. Runs every
    (solution, test) pair, `reward.concurrency` at a time.
    """
    if not candidate_tests or not reference_solutions:
        raise ValueError("validate_problem needs candidate tests and reference solutions")
    solutions = random.Random(seed).sample(list(reference_solutions),
                                           min(solutions_to_sample, len(reference_solutions)))
    blank_tests = [_without_expected(test) for test in candidate_tests]
    pairs = [(s, t) for s in range(len(solutions)) for t in range(len(blank_tests))]
    runner = CodeReward(reward.sandbox, language=reward.language, limits=reward.limits, stop_on_first_failure=False)
    with ThreadPoolExecutor(max(1, reward.concurrency)) as executor:
        verdicts = list(executor.map(lambda pair: runner.run_test(solutions[pair[0]], blank_tests[pair[1]]), pairs))
    outputs = {pair: (_canonical(blank_tests[pair[1]], v.output) if v.passed else None)
               for pair, v in zip(pairs, verdicts)}
    needed_agreement = math.ceil(min_test_agreement * len(solutions) - 1e-9)
    valid, agreement, expected_outputs = [], [], {}
    for t, test in enumerate(blank_tests):
        counts = Counter(outputs[(s, t)] for s in range(len(solutions)) if outputs[(s, t)] is not None)
        top_output, top_count = counts.most_common(1)[0] if counts else (None, 0)
        agreement.append(top_count)
        if top_count >= needed_agreement:
            valid.append(t)
            expected_outputs[t] = top_output
    passing = sum(all(outputs[(s, t)] == expected_outputs[t] for t in valid) for s in range(len(solutions)))
    needed_passing = math.ceil(min_solutions_passing * len(solutions) - 1e-9)
    if len(valid) < min_valid_tests:
        admitted, reason = False, f"only {len(valid)} valid tests (need {min_valid_tests})"
    elif passing < needed_passing:
        admitted, reason = False, f"only {passing}/{len(solutions)} solutions pass every valid test " \
                                  f"(need {needed_passing})"
    else:
        admitted, reason = True, f"{len(valid)} valid tests; {passing}/{len(solutions)} solutions pass them all"
    tests = tuple(_with_expected(blank_tests[t], expected_outputs[t]) for t in valid)
    return ProblemValidation(admitted, tests, tuple(valid), tuple(agreement), passing, len(solutions), reason)


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------


def _call_harness(test: FunctionCallTest, marker: str) -> str:
    """Appended to the program: call the function and print its JSON result after `marker`."""
    call = json.dumps({"function": test.function, "args": list(test.args), "kwargs": test.kwargs})
    return f"""

def _megatron_rl_call():
    import json, sys
    call = json.loads({call!r})
    target = globals().get(call["function"])
    if target is None and isinstance(globals().get("Solution"), type):
        target = getattr(globals()["Solution"](), call["function"], None)
    if target is None:
        raise NameError(f"the program defines no function (or Solution method) {{call['function']!r}}")
    result = json.dumps(target(*call["args"], **call["kwargs"]))
    sys.stdout.flush()
    sys.stdout.write("\\n" + {marker!r} + result + "\\n")


_megatron_rl_call()
"""


def _has_expected(test: TestCase) -> bool:
    return test.expected_stdout is not None if isinstance(test, StdioTest) else test.has_expected


def _without_expected(test: TestCase) -> TestCase:
    if isinstance(test, StdioTest):
        return replace(test, expected_stdout=None)
    return replace(test, expected=None, has_expected=False)


def _with_expected(test: TestCase, canonical_output: str) -> TestCase:
    if isinstance(test, StdioTest):
        return replace(test, expected_stdout=canonical_output)
    return replace(test, expected=json.loads(canonical_output), has_expected=True)


def _canonical(test: TestCase, output: str | None) -> str | None:
    """The form in which two outputs agree exactly when they match (for majority voting)."""
    if output is None:
        return None
    if isinstance(test, StdioTest):
        return "\n".join(_normalized_lines(output)) + "\n"
    return json.dumps(json.loads(output), sort_keys=True)


def _normalized_lines(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _failed_run(index: int, result: RunResult) -> TestVerdict:
    tail = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
    return TestVerdict(index, result.status, f"{result.message}{': ' + _clip(tail) if tail else ''}",
                       result.stdout, result)


def _clip(text: str, limit: int = 80) -> str:
    text = text.strip()
    return repr(text if len(text) <= limit else text[:limit] + "…")
