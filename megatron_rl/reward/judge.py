"""Chain-of-thought reward model: a judge model reasons about a response, then gives a JSON verdict.

k1.5 §2.3.5 grades free-form answers with a CoT reward model: given the question, the reference answer and
the response, it reasons step by step and ends with a correctness verdict in JSON. Any engine serving an
instruction-tuned model works as the judge: SGLang or `megatron-rl engine serve`, through `EngineClient`
(token ids in and out, so the judge's tokenizer builds the prompt and reads the answer).

Only the final answer is judged, not the reasoning that led to it (k1.5 §2.3.1): a response's text after
its last `</think>` is what the judge sees, when there is one.

The verdict must be the last thing in the judge's answer: one JSON object `{"correct": true|false}` (a
closing ``` fence after it is allowed), validated strictly by `JudgeVerdict`. Anything else — no JSON at
the end, another key, a string instead of a boolean, an answer cut off at the token limit, an engine error
— is a failure: it scores 0, is counted in `Judge.failures` by kind, and is logged with its reason. It
never raises.
"""
from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from megatron_rl.errors import UserError
from megatron_rl.rollout.client import EngineClient
from megatron_rl.rollout.protocol import EngineError, GenerateRequest, SamplingParams

logger = logging.getLogger(__name__)

JUDGE_SYSTEM_PROMPT = "You are a careful grader. You decide whether a response's final answer is correct."

JUDGE_INSTRUCTIONS = """Decide whether the final answer of the response is correct, compared with the reference \
answer. Judge only the final answer, not the reasoning that leads to it. Count answers as the same when they are \
mathematically or semantically equivalent (for example a^2 - 4 and (a+2)(a-2), or 0.5 and 1/2).

Question:
{question}

Reference answer:
{reference_answer}

Response:
{response}

First reason step by step. Then end your reply with the verdict as JSON on its own line, and nothing after it: \
{{"correct": true}} if the final answer is correct, {{"correct": false}} otherwise."""

_REASONING_END = "</think>"
_DECODER = json.JSONDecoder()


class JudgeConfig(BaseModel):
    """`reward.judge`: the engine and settings of the judge model (used by prompts of type "judge")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    engine_url: str = Field(description="the engine serving the judge model (SGLang or `megatron-rl engine serve`)")
    tokenizer: str | None = Field(None, description="the judge model's HF directory (for its tokenizer); unset: "
                                                    "the tokenizer_path the engine reports in /model_info")
    apply_chat_template: bool = Field(True, description="format the judge prompt with the tokenizer's chat template")
    max_new_tokens: int = Field(1024, ge=8, description="room for the reasoning and the verdict")
    temperature: float = Field(0.0, ge=0.0, description="0: greedy, so a verdict does not depend on the draw")
    request_timeout_s: float = Field(600.0, gt=0.0)


class JudgeVerdict(BaseModel):
    """The JSON object that ends the judge's answer."""

    model_config = ConfigDict(extra="forbid", strict=True)

    correct: bool


class MalformedVerdict(ValueError):
    """The judge's answer does not end with a valid verdict; the message says what is wrong."""


FailureKind = Literal["malformed_verdict", "truncated", "engine_error"]


@dataclass(frozen=True)
class JudgeItem:
    question: str
    reference_answer: str
    response: str


@dataclass(frozen=True)
class JudgeOutcome:
    correct: bool
    reason: str  # correct, wrong_answer, or "<failure kind>: why"
    judge_text: str | None  # the judge's whole answer (None when the engine call failed)
    failure: FailureKind | None = None


def final_answer_part(response: str) -> str:
    """The part of `response` the judge grades: after the last `</think>`, or all of it."""
    position = response.rfind(_REASONING_END)
    return response if position == -1 else response[position + len(_REASONING_END):].strip()


def judge_messages(item: JudgeItem) -> list[dict[str, str]]:
    """The judge's conversation for one item (system instructions, then the case to grade)."""
    content = JUDGE_INSTRUCTIONS.format(question=item.question.strip(), reference_answer=item.reference_answer.strip(),
                                        response=final_answer_part(item.response))
    return [{"role": "system", "content": JUDGE_SYSTEM_PROMPT}, {"role": "user", "content": content}]


def parse_verdict(text: str) -> JudgeVerdict:
    """The verdict that ends `text`; raises MalformedVerdict naming the problem."""
    body = text.rstrip()
    if body.endswith("```"):
        body = body[:-3].rstrip()
    if not body.endswith("}"):
        tail = body[-60:].replace("\n", " ")
        raise MalformedVerdict(f"the answer does not end with a JSON verdict (it ends with {tail!r})")
    # The rightmost '{' that parses through to the end starts the verdict (a later '{' that parses but
    # stops short is a nested object of it).
    start = body.rfind("{")
    while start != -1:
        try:
            value, end = _DECODER.raw_decode(body, start)
        except json.JSONDecodeError:
            end = -1
        if end == len(body):
            break
        start = body.rfind("{", 0, start)
    else:
        raise MalformedVerdict(f"the answer ends with '}}' but no JSON object ends there ({body[-60:]!r})")
    try:
        return JudgeVerdict.model_validate(value)
    except pydantic.ValidationError as error:
        problem = error.errors()[0]
        field = ".".join(str(part) for part in problem["loc"]) or "verdict"
        raise MalformedVerdict(f"verdict {json.dumps(value)[:80]}: field '{field}': {problem['msg'].lower()}") from None


class Judge:
    """Grades items with the judge model behind `engine`. Thread-safe; `failures` counts failures by kind."""

    def __init__(self, engine: EngineClient, tokenizer, config: JudgeConfig):
        self.engine = engine
        self.tokenizer = tokenizer
        self.config = config
        self.sampling = SamplingParams(max_new_tokens=config.max_new_tokens, temperature=config.temperature)
        self.use_chat_template = config.apply_chat_template and bool(getattr(tokenizer, "chat_template", None))
        self.failures: Counter[str] = Counter()
        self._lock = threading.Lock()

    @classmethod
    def connect(cls, config: JudgeConfig) -> Judge:
        """A judge for `config`: its tokenizer from `config.tokenizer` or from what the engine reports."""
        from megatron_rl.data.formatting import load_tokenizer
        from megatron_rl.hf_checkpoint import resolve_hf_dir

        engine = EngineClient(config.engine_url, timeout=config.request_timeout_s)
        source = config.tokenizer
        if source is None:
            try:
                info = engine.get_model_info()
            except EngineError as error:
                raise UserError(f"reward.judge.engine_url: {error}; start the judge engine or fix the URL") from None
            source = info.tokenizer_path or info.model_path
            if source is None:
                raise UserError(f"the judge engine at {engine.base_url} reports no tokenizer path; set "
                                "reward.judge.tokenizer to the judge model's HF directory")
        return cls(engine, load_tokenizer(resolve_hf_dir(source)), config)

    def prompt_ids(self, item: JudgeItem) -> list[int]:
        messages = judge_messages(item)
        if self.use_chat_template:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(self.tokenizer("\n\n".join(message["content"] for message in messages) + "\n\n")["input_ids"])

    def judge(self, items: Sequence[JudgeItem]) -> list[JudgeOutcome]:
        """One outcome per item, in order, from one batched engine call; never raises for a bad answer."""
        if not items:
            return []
        requests = [GenerateRequest(input_ids=self.prompt_ids(item), sampling_params=self.sampling,
                                    return_logprob=False) for item in items]
        try:
            results = self.engine.generate(requests, timeout=self.config.request_timeout_s)
        except EngineError as error:
            return [self._failure("engine_error", f"judge engine: {error}", None) for _ in items]
        outcomes = []
        for result in results:
            text = self.tokenizer.decode(result.output_ids, skip_special_tokens=True)
            if result.finish_reason == "abort":
                outcomes.append(self._failure("engine_error", f"judge request aborted: {result.finish_message}", text))
                continue
            try:
                verdict = parse_verdict(text)
            except MalformedVerdict as error:
                if result.finish_reason == "length":
                    outcomes.append(self._failure("truncated", f"the judge's answer was cut off at "
                                                               f"{self.config.max_new_tokens} tokens before a verdict",
                                                  text))
                else:
                    outcomes.append(self._failure("malformed_verdict", str(error), text))
                continue
            outcomes.append(JudgeOutcome(verdict.correct, "correct" if verdict.correct else "wrong_answer", text))
        return outcomes

    def _failure(self, kind: FailureKind, why: str, text: str | None) -> JudgeOutcome:
        with self._lock:
            self.failures[kind] += 1
        logger.warning("judge failure (%s, scored 0): %s", kind, why)
        return JudgeOutcome(False, f"{kind}: {why}", text, kind)
