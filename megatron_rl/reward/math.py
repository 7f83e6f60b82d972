"""Rule-based maths reward: extract the final answer, check it against the reference with math-verify.

The paper (§2.3.5) scores maths with a chain-of-thought reward model; this is the verifiable
rule-based stand-in: a symbolic equivalence check, so "1/2", "0.5" and "\\frac{1}{2}" all match.

Timeouts: math-verify bounds each parse and comparison with `signal.alarm`, which only works in
the main thread of a process (elsewhere it raises). We keep its timeout where it works (the main
thread, which includes the workers of `reward.batch`'s process pool) and disable it in any other
thread, so calls from worker threads succeed; the price is that a pathological answer such as
`10^{10^{10^{10}}}` can then take unbounded time, which is why `score_batch` uses processes.
"""
from __future__ import annotations

import re
import threading

import math_verify

# math-verify's own default; bounds one parse or one comparison when the timeout is usable.
MATH_VERIFY_TIMEOUT_SECONDS = 5

_BOXED = "\\boxed"
_FINAL_ANSWER_PHRASE = re.compile(r"(?:\banswer\s*(?:is\s*:?|:)|####)[ \t]*\n?([^\n]+)", re.IGNORECASE)
# A leading minus counts as a sign only when it does not join two terms ("3-5" yields 5).
_NUMBER = re.compile(r"(?:(?<![\w)\]}])-)?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
_MATH_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def extract_final_answer(response: str) -> str | None:
    """The final answer in `response`, or None; the first of these rules that finds one wins:

    1. the content of the last `\\boxed{...}` whose braces balance (a truncated one is skipped);
    2. the text after the last final-answer phrase, to the end of its line: "answer is X",
       "answer: X" (any case, so also "Final Answer: X") or "#### X" (GSM8K style);
    3. the last number in the text (thousands separators removed).

    The answer is trimmed of surrounding whitespace, markdown bold, `$`/`\\(`/`\\[` math
    delimiters and trailing punctuation; a rule whose answer trims to nothing finds none.
    """
    for extract in (_last_boxed, _last_final_answer_phrase, _last_number):
        answer = extract(response)
        if answer is not None:
            answer = _trim(answer)
            if answer:
                return answer
    return None


def answers_equivalent(answer: str, reference_answer: str) -> bool:
    """Whether `answer` is mathematically equivalent to `reference_answer` (math-verify); never raises."""
    timeout_seconds = MATH_VERIFY_TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None
    # Boxing makes math-verify read the whole string as one LaTeX expression, instead of
    # searching it for a sub-expression as it would in free text.
    reference = math_verify.parse(f"\\boxed{{{reference_answer}}}", parsing_timeout=timeout_seconds)
    candidate = math_verify.parse(f"\\boxed{{{answer}}}", parsing_timeout=timeout_seconds)
    if not reference or not candidate:
        return False
    # The reference goes first: math-verify documents its comparison as asymmetric, gold before prediction.
    return math_verify.verify(reference, candidate, timeout_seconds=timeout_seconds)


def math_reward(response: str, reference_answer: str) -> float:
    """1.0 if the final answer extracted from `response` is equivalent to `reference_answer`, else 0.0."""
    answer = extract_final_answer(response)
    return 1.0 if answer is not None and answers_equivalent(answer, reference_answer) else 0.0


def _last_boxed(text: str) -> str | None:
    end = len(text)
    while (start := text.rfind(_BOXED, 0, end)) != -1:
        content = _balanced_braces_content(text, start + len(_BOXED))
        if content is not None:
            return content
        end = start
    return None


def _balanced_braces_content(text: str, position: int) -> str | None:
    """The content of the `{...}` group starting at `position` (after optional spaces), or None if unbalanced."""
    while position < len(text) and text[position] == " ":
        position += 1
    if position >= len(text) or text[position] != "{":
        return None
    depth = 0
    index = position
    while index < len(text):
        character = text[index]
        if character == "\\":
            index += 2  # an escaped brace such as `\{` is content, not structure
            continue
        if character == "{":
            depth += 1
        elif character == "}":
            depth -= 1
            if depth == 0:
                return text[position + 1 : index]
        index += 1
    return None


def _last_final_answer_phrase(text: str) -> str | None:
    matches = _FINAL_ANSWER_PHRASE.findall(text)
    return matches[-1] if matches else None


def _last_number(text: str) -> str | None:
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def _trim(answer: str) -> str:
    previous = None
    # Strip repeatedly: the wrappers nest in any order, as in "**$42$**." .
    while answer != previous:
        previous = answer
        answer = answer.strip().rstrip(".,;:!").strip("*").strip()
        for opening, closing in _MATH_DELIMITERS:
            if len(answer) >= len(opening) + len(closing) and answer.startswith(opening) and answer.endswith(closing):
                answer = answer[len(opening) : len(answer) - len(closing)]
                break
    return answer
