"""Maths reward: answer extraction, equivalence via math-verify, and parallel batch scoring."""
from concurrent.futures import ThreadPoolExecutor

import pytest

from megatron_rl.reward import RewardRequest, extract_final_answer, math_reward, score_batch


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("so x = \\boxed{\\frac{a^{2}}{b_{1}}}.", "\\frac{a^{2}}{b_{1}}"),  # nested braces
        ("first \\boxed{1}, then \\boxed{2}", "2"),  # the last box wins
        ("\\boxed{7} and a cut-off \\boxed{\\frac{1", "7"),  # an unbalanced box is skipped
        ("I think 3. The answer is 42.", "42"),
        ("**Final Answer:** $\\frac{1}{2}$", "\\frac{1}{2}"),
        ("48/2 = 24\n#### 1,234", "1,234"),
        ("We get 12 apples, then -3.5 and 3-5", "5"),  # last number; "3-5" is not minus five
        ("1,000 + 234 = 1,234", "1234"),
        ("no digits at all", None),
        ("\\boxed{}", None),
    ],
)
def test_extract_final_answer(response, expected):
    assert extract_final_answer(response) == expected


@pytest.mark.parametrize(
    ("response", "reference"),
    [
        ("\\boxed{0.5}", "1/2"),
        ("The answer is $\\frac{1}{2}$.", "0.5"),
        ("\\boxed{x = 3}", "3"),
        ("\\boxed{(a+2)(a-2)}", "a^2-4"),
    ],
)
def test_equivalent_forms_score_one(response, reference):
    assert math_reward(response, reference) == 1.0


@pytest.mark.parametrize("response", ["\\boxed{0.51}", "The answer is 4.", "I don't know"])
def test_wrong_or_missing_answers_score_zero(response):
    assert math_reward(response, "1/2") == 0.0


@pytest.mark.parametrize("garbage", ["", "}{\\boxed{", "\\boxed{{}", "\x00\ufffd\ud800 \\frac{", "$$$"])
def test_garbage_scores_zero_without_raising(garbage):
    assert math_reward(garbage, "1") == 0.0
    assert math_reward("\\boxed{1}", garbage) == 0.0


def test_math_reward_works_in_a_worker_thread():
    # math-verify's signal-based timeout would raise outside the main thread.
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(math_reward, "\\boxed{0.5}", "1/2").result() == 1.0


def _request(sample_id, response, degenerate=False):
    return RewardRequest(sample_id, response, "6", "math", degenerate)


def test_score_batch_in_processes_keeps_order_and_isolates_failures():
    requests = [
        _request("right", "so \\boxed{6}"),
        _request("wrong", "so \\boxed{7}"),
        _request("broken", None),  # a bad type raises inside the worker
        _request("looping", "6 6 6 6", degenerate=True),
        _request("silent", "no idea"),
    ]
    results = score_batch(requests, workers=2, degenerate_penalty=-0.5)
    assert [result.sample_id for result in results] == ["right", "wrong", "broken", "looping", "silent"]
    assert [result.reward for result in results] == [1.0, 0.0, 0.0, -0.5, 0.0]
    assert [result.correct for result in results] == [True, False, False, False, False]
    assert [result.extracted_answer for result in results] == ["6", "7", None, None, None]
    assert [result.reason for result in results[:2] + results[3:]] == [
        "correct", "wrong_answer", "degenerate_repetition", "no_answer"
    ]
    assert results[2].reason.startswith("error: TypeError")


def test_score_batch_inline_matches_and_uses_default_penalty():
    requests = [_request("a", "\\boxed{6}"), _request("b", "x", degenerate=True), _request("c", 5)]
    results = score_batch(requests, workers=1)
    assert [(result.reward, result.correct) for result in results] == [(1.0, True), (-1.0, False), (0.0, False)]
    assert results[2].reason.startswith("error:")
