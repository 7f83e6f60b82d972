"""Prompt-set tools of k1.5 §2.1, run with a real engine: difficulty estimation and the easy-to-hack filter.

* `estimate_difficulty`: every prompt is answered `samples` times (the paper: 10, at a relatively high
  temperature) and scored with the run's rewards; the prompt's `difficulty` becomes its **pass rate**
  (correct samples / samples: 1.0 = always solved = easy, 0.0 = never solved = hard), the meaning
  `data/prompts.py` and `data/sampler.py` give the field.
* `filter_hackable`: the model is asked to answer with no reasoning (the question plus `GUESS_INSTRUCTION`,
  a few tokens of room); a prompt it answers correctly within `guesses` tries (the paper: N = 8) is easy to
  hack and dropped.

The engine is either one already serving (`--engine-url`: SGLang or `megatron-rl engine serve`) or an
embedded engine this process starts on the model (`--model`) and stops afterwards. Prompts are tokenized
with the model's tokenizer (the engine speaks token ids), as the RL driver does. A prompt whose requests
fail (one too long for the engine's context, say) gets no estimate: it keeps its old difficulty, and
the filter keeps it; both are counted in the result.
"""
from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from megatron_rl.data.formatting import encode_prompts, load_tokenizer
from megatron_rl.data.prompts import ChatMessage, PromptRecord
from megatron_rl.errors import UserError
from megatron_rl.reward.batch import RewardBackends, RewardRequest, RewardResult, score_batch
from megatron_rl.rollout.client import EngineClient
from megatron_rl.rollout.generation import RolloutFailed, Sample, generate_samples
from megatron_rl.rollout.protocol import EngineError, SamplingParams

logger = logging.getLogger(__name__)

GUESS_INSTRUCTION = "Reply with only the final answer. Do not explain or show any working."
PROMPTS_PER_CHUNK = 64  # prompts generated, then scored, at a time: bounds memory and keeps the bar moving
NO_PROMPT_BOUND = 1 << 30  # no bound of our own: the engine refuses a prompt beyond its context (a failed group)


@dataclass(frozen=True)
class PassCount:
    correct: int
    samples: int

    @property
    def pass_rate(self) -> float:
        return self.correct / self.samples


@dataclass(frozen=True)
class GenerationSettings:
    """How each prompt is answered, and how prompts are formatted (as the RL run formats them)."""

    max_new_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = 0  # per-request sampling seeds derive from it; None: unseeded
    apply_chat_template: bool = True
    system_prompt: str | None = None
    request_timeout_s: float = 600.0

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p)


@dataclass
class ToolResult:
    records: list[PromptRecord]  # what the tool writes
    estimated: int = 0  # prompts with a pass count
    unestimated: list[str] = field(default_factory=list)  # ids of prompts with none (failed or too long)
    dropped: list[PromptRecord] = field(default_factory=list)  # filter-hackable: the prompts it removed


@dataclass
class EngineSession:
    engine: EngineClient
    tokenizer: object
    description: str


@contextmanager
def engine_session(engine_url: str | None = None, model: str | None = None, tokenizer: str | None = None,
                   max_running_requests: int = 32, start_timeout_s: float = 300.0,
                   request_timeout_s: float = 600.0) -> Iterator[EngineSession]:
    """A ready engine and the tokenizer of its model: the engine at `engine_url`, or an embedded engine
    started on `model` (stopped on exit). `tokenizer` (a HF directory) overrides the model's own."""
    from megatron_rl.hf_checkpoint import resolve_hf_dir
    from megatron_rl.rollout.engine_process import EmbeddedEngineProcess, EngineStartError

    if (engine_url is None) == (model is None):
        raise UserError("give exactly one of --engine-url (a running engine) and --model (start an embedded one)")
    if model is not None:
        model_dir = resolve_hf_dir(model)
        token_source = resolve_hf_dir(tokenizer) if tokenizer else model_dir
        loaded_tokenizer = load_tokenizer(token_source)  # before the engine starts: a bad tokenizer fails fast
        with tempfile.TemporaryDirectory(prefix="megatron-rl-engine-") as log_dir:
            process = EmbeddedEngineProcess(model_dir, Path(log_dir) / "engine.log", load_format="auto",
                                            max_running_requests=max_running_requests)
            try:
                process.start(timeout=start_timeout_s)
            except EngineStartError as error:
                raise UserError(f"--model {model}: the embedded engine did not start: {error}") from None
            try:
                yield EngineSession(EngineClient(process.url, timeout=request_timeout_s), loaded_tokenizer,
                                    f"embedded engine on {model}")
            finally:
                process.stop()
        return
    engine = EngineClient(engine_url, timeout=request_timeout_s)
    try:
        info = engine.get_model_info()
    except EngineError as error:
        raise UserError(f"--engine-url: {error}") from None
    token_source = tokenizer or info.tokenizer_path or info.model_path
    if token_source is None:
        raise UserError(f"the engine at {engine.base_url} reports no tokenizer path; pass --tokenizer DIR (the "
                        "served model's HF directory)")
    yield EngineSession(engine, load_tokenizer(resolve_hf_dir(token_source)), f"engine at {engine.base_url}")


def sample_and_score(session: EngineSession, records: Sequence[PromptRecord], samples: int,
                     settings: GenerationSettings, backends: RewardBackends | None = None, reward_workers: int = 0,
                     description: str = "sampling",
                     on_sample_done: Callable[[], None] | None = None) -> dict[str, list[tuple[Sample, RewardResult]]]:
    """prompt id → its `samples` samples with their rewards, in sample order, for every prompt whose samples all
    came back. Prompts go `PROMPTS_PER_CHUNK` at a time: generated, then scored with the run's rewards."""
    decode = lambda ids: session.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    weight_version = session.engine.weight_version() or "default"
    scored: dict[str, list[tuple[Sample, RewardResult]]] = {}
    for chunk_number, start in enumerate(range(0, len(records), PROMPTS_PER_CHUNK)):
        chunk = list(records[start: start + PROMPTS_PER_CHUNK])
        prompts = encode_prompts(chunk, session.tokenizer, settings.apply_chat_template, NO_PROMPT_BOUND,
                                 "prompts", settings.system_prompt)
        try:
            rollout = generate_samples(session.engine, prompts, samples, settings.sampling_params(), weight_version,
                                       decode, seed=settings.seed if settings.temperature > 0 else None,
                                       iteration=chunk_number, timeout=settings.request_timeout_s,
                                       on_sample_done=on_sample_done)
        except RolloutFailed as error:
            logger.warning("%s: every request of prompts %d-%d failed: %s", description, start + 1,
                           start + len(chunk), error)
            continue
        requests = [RewardRequest(sample_id=f"{sample.group_id}-{sample.sample_index}",
                                  response_text=sample.response_text, reference_answer=sample.prompt.record.answer,
                                  task_type=sample.prompt.record.type, question=sample.prompt.record.question_text())
                    for sample in rollout.samples]  # by group, then sample index
        scores = score_batch(requests, workers=reward_workers, backends=backends)
        for sample, score in zip(rollout.samples, scores):
            scored.setdefault(sample.prompt.record.id, []).append((sample, score))
    return scored


def count_correct(session: EngineSession, records: Sequence[PromptRecord], samples: int,
                  settings: GenerationSettings, backends: RewardBackends | None = None, reward_workers: int = 0,
                  description: str = "sampling", console: Console | None = None) -> dict[str, PassCount]:
    """prompt id → correct answers among `samples`, for every prompt whose samples all came back."""
    if samples < 1:
        raise UserError(f"--samples must be ≥ 1 (got {samples})")
    console = console or Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    # Off a terminal (CI, `| tee`) a live bar only adds noise to the log.
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task(description, total=len(records) * samples)
        scored = sample_and_score(session, records, samples, settings, backends, reward_workers, description,
                                  on_sample_done=lambda: progress.advance(task))
    return {record_id: PassCount(sum(score.correct for _, score in pairs), len(pairs))
            for record_id, pairs in scored.items()}


def estimate_difficulty(session: EngineSession, records: Sequence[PromptRecord], samples: int,
                        settings: GenerationSettings, backends: RewardBackends | None = None,
                        reward_workers: int = 0, console: Console | None = None) -> ToolResult:
    """The records with `difficulty` = pass rate of `samples` answers (unchanged where none was measured)."""
    counts = count_correct(session, records, samples, settings, backends, reward_workers, "difficulty", console)
    result = ToolResult(records=[])
    for record in records:
        count = counts.get(record.id)
        if count is None:
            result.unestimated.append(record.id)
            result.records.append(record)
        else:
            result.estimated += 1
            result.records.append(record.model_copy(update={"difficulty": count.pass_rate}))
    return result


def guess_record(record: PromptRecord, instruction: str = GUESS_INSTRUCTION) -> PromptRecord:
    """`record` asked for a bare answer: `instruction` after the question (the last user message)."""
    if record.prompt is not None:
        return record.model_copy(update={"prompt": f"{record.prompt}\n\n{instruction}"})
    last = record.messages[-1]
    messages = [*record.messages[:-1], ChatMessage(role="user", content=f"{last.content}\n\n{instruction}")]
    return record.model_copy(update={"messages": messages})


def filter_hackable(session: EngineSession, records: Sequence[PromptRecord], guesses: int,
                    settings: GenerationSettings, backends: RewardBackends | None = None, reward_workers: int = 0,
                    instruction: str = GUESS_INSTRUCTION, console: Console | None = None) -> ToolResult:
    """The records the model cannot guess within `guesses` no-reasoning tries (in `records`' order);
    `settings.max_new_tokens` should leave room for an answer only."""
    if guesses < 1:
        raise UserError(f"--guesses must be ≥ 1 (got {guesses})")
    asked = [guess_record(record, instruction) for record in records]
    counts = count_correct(session, asked, guesses, settings, backends, reward_workers, "guessing", console)
    result = ToolResult(records=[])
    for record in records:
        count = counts.get(record.id)
        if count is None:
            result.unestimated.append(record.id)
        else:
            result.estimated += 1
        (result.dropped if count is not None and count.correct > 0 else result.records).append(record)
    return result
