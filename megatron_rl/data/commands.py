"""`megatron-rl data ...` subcommands."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="prepare prompt sets (JSONL)")
    actions = data.add_subparsers(dest="action", required=True, metavar="ACTION")

    arithmetic = actions.add_parser("make-arithmetic", help="write a synthetic integer-arithmetic prompt set")
    arithmetic.add_argument("--out", required=True, help="JSONL file to write (replaced atomically)")
    arithmetic.add_argument("--count", type=int, required=True, help="number of distinct problems")
    arithmetic.add_argument("--seed", type=int, required=True, help="same seed, same problems")
    arithmetic.add_argument("--max-operand", type=int, default=100, help="operands are drawn from [1, M]")
    arithmetic.add_argument("--operand-count", type=int, default=2, help="operands per problem (difficulty)")
    arithmetic.add_argument("--operations", default="+-*", help="operations to draw from, e.g. '+-'")
    arithmetic.set_defaults(handler=_make_arithmetic)

    difficulty = actions.add_parser(
        "difficulty", help="estimate each prompt's difficulty: its pass rate over N sampled answers (k1.5 §2.1)",
        description="Answer every prompt N times with a model and write the pass rate (correct/N: 1 = easy, "
                    "0 = hard) as its `difficulty`. Prompts whose requests fail keep their old value.")
    _add_io_arguments(difficulty)
    difficulty.add_argument("--samples", type=int, default=10, help="answers per prompt (the paper: 10)")
    add_engine_arguments(difficulty, max_new_tokens=1024, temperature=1.0)
    difficulty.set_defaults(handler=_difficulty)

    hackable = actions.add_parser(
        "filter-hackable", help="drop prompts a model answers correctly by guessing, without reasoning (k1.5 §2.1)",
        description="Ask the model for a bare answer (no reasoning, a few tokens) up to N times per prompt; drop "
                    "every prompt it gets right at least once. Prompts whose requests fail are kept.")
    _add_io_arguments(hackable)
    hackable.add_argument("--guesses", type=int, default=8, help="guesses per prompt (the paper: N = 8)")
    hackable.add_argument("--dropped", help="also write the dropped prompts to this JSONL file")
    hackable.add_argument("--instruction", default=None,
                          help="what is appended to each question to ask for a bare answer (default: "
                               "megatron_rl.data.difficulty.GUESS_INSTRUCTION)")
    add_engine_arguments(hackable, max_new_tokens=32, temperature=1.0)
    hackable.set_defaults(handler=_filter_hackable)


def _add_io_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", required=True, help="input JSONL prompt file (format: megatron_rl/data/prompts.py)")
    parser.add_argument("--out", required=True, help="JSONL file to write (replaced atomically)")
    parser.add_argument("--in-place", action="store_true", help="allow --out to be the --prompts file itself")


def add_engine_arguments(parser: argparse.ArgumentParser, max_new_tokens: int, temperature: float) -> None:
    engine = parser.add_argument_group("model and sampling")
    where = engine.add_mutually_exclusive_group(required=True)
    where.add_argument("--engine-url", help="a running engine (SGLang or `megatron-rl engine serve`)")
    where.add_argument("--model", help="start the embedded engine on this HF directory (or builtin:NAME)")
    engine.add_argument("--tokenizer", help="HF directory of the model's tokenizer (default: the model's own, or "
                                            "the tokenizer_path the engine reports)")
    engine.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"default {max_new_tokens}")
    engine.add_argument("--temperature", type=float, default=temperature, help=f"default {temperature}")
    engine.add_argument("--top-p", type=float, default=1.0)
    engine.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same answers)")
    engine.add_argument("--no-chat-template", action="store_true", help="send the prompt text without the chat template")
    engine.add_argument("--system-prompt", help="system message for prompts without one (chat template only)")
    engine.add_argument("--max-running-requests", type=int, default=32, help="--model: the embedded engine's batch")
    engine.add_argument("--request-timeout", type=float, default=600.0, help="seconds per generation request")
    rewards = parser.add_argument_group("rewards (as in the RL run)")
    rewards.add_argument("--sandbox-url", help="sandbox service for code prompts (`megatron-rl sandbox serve`)")
    rewards.add_argument("--judge-url", help="engine serving the judge model, for judge prompts")
    rewards.add_argument("--reward-workers", type=int, default=0, help="math scoring processes (0: in this process)")


def _check_output(args: argparse.Namespace) -> None:
    from pathlib import Path

    from megatron_rl.errors import UserError

    source, target = Path(args.prompts), Path(args.out)
    outputs = [target] + ([Path(args.dropped)] if getattr(args, "dropped", None) else [])
    for output in outputs:
        same = output.resolve() == source.resolve() or (output.exists() and source.exists() and output.samefile(source))
        if same and not (args.in_place and output == target):
            raise UserError(f"{output} is the input file {source}; write elsewhere, or pass --in-place to replace "
                            "the input (--out only)")
    if getattr(args, "dropped", None) and target.resolve() == Path(args.dropped).resolve():
        raise UserError("--out and --dropped name the same file; give two different files")


def _settings_and_backends(args: argparse.Namespace):
    from megatron_rl.data.difficulty import GenerationSettings
    from megatron_rl.errors import UserError
    from megatron_rl.reward.batch import RewardBackends
    from megatron_rl.reward.judge import JudgeConfig

    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be ≥ 1 (got {args.max_new_tokens})")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UserError("--temperature must be ≥ 0 and --top-p in (0, 1]")
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                  seed=args.seed, apply_chat_template=not args.no_chat_template,
                                  system_prompt=args.system_prompt, request_timeout_s=args.request_timeout)
    judge = JudgeConfig(engine_url=args.judge_url) if args.judge_url else None
    return settings, RewardBackends.connect(sandbox_url=args.sandbox_url, judge=judge)


def load_prompts_to_sample(args: argparse.Namespace):
    """(records of --prompts, GenerationSettings, RewardBackends) from `add_engine_arguments`' options; a prompt
    type with nothing to score it fails here, before any generation."""
    from megatron_rl.data.prompts import load_prompts

    records = load_prompts(args.prompts)
    _check_reward_backends(records, args)
    return (records, *_settings_and_backends(args))


def _check_reward_backends(records, args: argparse.Namespace) -> None:
    """Fail before any generation when a prompt type has nothing to score it with."""
    from megatron_rl.errors import UserError
    from megatron_rl.reward.code_tests import parse_code_answer

    for record in records:
        if record.type == "code":
            if not args.sandbox_url:
                raise UserError(f"{args.prompts}: prompt '{record.id}' is a code prompt; pass --sandbox-url (a "
                                "running `megatron-rl sandbox serve`)")
            try:
                parse_code_answer(record.answer)
            except ValueError as error:
                raise UserError(f"{args.prompts}: prompt '{record.id}': {error}") from None
        elif record.type == "judge" and not args.judge_url:
            raise UserError(f"{args.prompts}: prompt '{record.id}' is graded by a judge; pass --judge-url")


def engine_session_from_args(args: argparse.Namespace):
    """The engine session `add_engine_arguments`' options describe (a context manager)."""
    from megatron_rl.data.difficulty import engine_session

    return engine_session(engine_url=args.engine_url, model=args.model, tokenizer=args.tokenizer,
                          max_running_requests=args.max_running_requests, request_timeout_s=args.request_timeout)


def _report(result, action: str) -> None:
    if result.unestimated:
        shown = ", ".join(f"'{identifier}'" for identifier in result.unestimated[:5])
        more = f" and {len(result.unestimated) - 5} more" if len(result.unestimated) > 5 else ""
        print(f"{len(result.unestimated)} prompt(s) could not be {action} (their requests failed; see the log "
              f"above): {shown}{more}")


def _difficulty(args: argparse.Namespace) -> int:
    from megatron_rl.data.difficulty import estimate_difficulty
    from megatron_rl.data.prompts import write_prompts

    _check_output(args)
    records, settings, backends = load_prompts_to_sample(args)
    with engine_session_from_args(args) as session:
        print(f"difficulty: {len(records)} prompts × {args.samples} samples with the {session.description}")
        result = estimate_difficulty(session, records, args.samples, settings, backends, args.reward_workers)
    write_prompts(args.out, result.records)
    rates = [record.difficulty for record in result.records if record.difficulty is not None]
    mean = f", mean pass rate {sum(rates) / len(rates):.3f}" if rates else ""
    print(f"wrote {len(result.records)} prompts to {args.out} ({result.estimated} estimated{mean}; "
          "difficulty = pass rate, 1 = easy)")
    _report(result, "estimated")
    return 0


def _filter_hackable(args: argparse.Namespace) -> int:
    from megatron_rl.data.difficulty import GUESS_INSTRUCTION, filter_hackable
    from megatron_rl.data.prompts import write_prompts

    _check_output(args)
    records, settings, backends = load_prompts_to_sample(args)
    with engine_session_from_args(args) as session:
        print(f"filter-hackable: {len(records)} prompts × {args.guesses} guesses with the {session.description}")
        result = filter_hackable(session, records, args.guesses, settings, backends, args.reward_workers,
                                 args.instruction or GUESS_INSTRUCTION)
    write_prompts(args.out, result.records)
    if args.dropped:
        write_prompts(args.dropped, result.dropped)
    print(f"kept {len(result.records)} prompts in {args.out}; dropped {len(result.dropped)} answered correctly "
          f"by a guess{' (written to ' + args.dropped + ')' if args.dropped else ''}")
    _report(result, "checked")
    return 0


def _make_arithmetic(args: argparse.Namespace) -> int:
    from megatron_rl.data.arithmetic import generate_arithmetic_prompts
    from megatron_rl.data.prompts import write_prompts

    records = generate_arithmetic_prompts(
        args.count,
        args.seed,
        max_operand=args.max_operand,
        operations=tuple(args.operations),
        operand_count=args.operand_count,
    )
    write_prompts(args.out, records)
    print(f"wrote {len(records)} arithmetic prompts to {args.out}")
    return 0
