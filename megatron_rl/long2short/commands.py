"""`megatron-rl long2short ...`: model merging, shortest rejection sampling, DPO pairs, held-out evaluation."""
from __future__ import annotations

import argparse
import tempfile
from contextlib import contextmanager
from pathlib import Path

from megatron_rl.data.commands import add_engine_arguments, engine_session_from_args, load_prompts_to_sample

MODEL_NOTE = "--model may also be a megatron-rl checkpoint (from sft, dpo, merge or an RL run): it is exported to HF for the engine first."


def register(subparsers) -> None:
    long2short = subparsers.add_parser("long2short", help="make a long-CoT model answer shorter (k1.5 §2.4)")
    actions = long2short.add_subparsers(dest="action", required=True, metavar="ACTION")

    merge = actions.add_parser("merge", help="average two checkpoints: w·A + (1 − w)·B (any TP/PP layouts)")
    merge.add_argument("--a", required=True, help="megatron-rl checkpoint A (e.g. the long-CoT model)")
    merge.add_argument("--b", required=True, help="megatron-rl checkpoint B (e.g. the short-CoT model)")
    merge.add_argument("--weight", type=float, default=0.5, help="w, the weight of A (default 0.5)")
    merge.add_argument("--out", required=True, help="new directory for the merged checkpoint")
    merge.add_argument("--tp", type=int, help="tensor-parallel size to merge and save at (default: A's)")
    merge.add_argument("--pp", type=int, help="pipeline-parallel size to merge and save at (default: A's)")
    merge.set_defaults(handler=_merge)

    rejection = actions.add_parser(
        "shortest-rejection", help="sample n responses per prompt, keep the shortest correct one as SFT JSONL",
        description=MODEL_NOTE)
    _add_sampling_arguments(rejection, "SFT JSONL to write (input of `megatron-rl sft`)")
    rejection.set_defaults(handler=_shortest_rejection)

    pairs = actions.add_parser(
        "dpo-pairs", help="sample n responses per prompt; shortest correct = chosen, longer ones = rejected",
        description=MODEL_NOTE)
    _add_sampling_arguments(pairs, "preference-pair JSONL to write (input of `megatron-rl dpo`)")
    pairs.add_argument("--length-ratio", type=float, default=1.5,
                       help="correct responses at least this many times longer than the chosen one are rejected too")
    pairs.set_defaults(handler=_dpo_pairs)

    evaluate = actions.add_parser(
        "evaluate", help="greedy held-out accuracy and mean response tokens (paper Fig. 7's axes)",
        description=MODEL_NOTE)
    evaluate.add_argument("--prompts", required=True, help="held-out JSONL prompt file")
    evaluate.add_argument("--json", help="also write the result to this JSON file")
    add_engine_arguments(evaluate, max_new_tokens=1024, temperature=0.0)
    evaluate.set_defaults(handler=_evaluate)


def _add_sampling_arguments(parser: argparse.ArgumentParser, out_help: str) -> None:
    parser.add_argument("--prompts", required=True, help="JSONL prompt file with reference answers")
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument("--n", type=int, default=8, help="responses sampled per prompt (the paper: 8)")
    add_engine_arguments(parser, max_new_tokens=1024, temperature=1.0)


@contextmanager
def _engine(args: argparse.Namespace):
    """The engine session; a megatron-rl checkpoint given as --model is exported to HF for it first."""
    from megatron_rl.train.convert_commands import mcore_to_hf

    with tempfile.TemporaryDirectory(prefix="megatron-rl-long2short-") as scratch:
        if args.model and (Path(args.model) / "manifest.json").is_file():
            exported = Path(scratch) / "hf"
            mcore_to_hf(args.model, exported)
            args.model = str(exported)
        with engine_session_from_args(args) as session:
            yield session


def _sample(args: argparse.Namespace):
    from megatron_rl.errors import UserError
    from megatron_rl.long2short.sampling import sample_responses

    if args.n < 1:
        raise UserError(f"--n must be ≥ 1 (got {args.n})")
    if Path(args.out).resolve() == Path(args.prompts).resolve():
        raise UserError(f"--out {args.out} is the --prompts file; write elsewhere")
    records, settings, backends = load_prompts_to_sample(args)
    with _engine(args) as session:
        print(f"{args.action}: {len(records)} prompts × {args.n} samples with the {session.description}", flush=True)
        responses = sample_responses(session, records, args.n, settings, backends, args.reward_workers)
    return records, responses


def _describe_samples(responses) -> str:
    everything = [response for sampled in responses.values() for response in sampled]
    if not everything:
        return "no prompt's requests succeeded"
    correct = sum(response.correct for response in everything) / len(everything)
    mean = sum(response.tokens for response in everything) / len(everything)
    return f"samples: {correct:.3f} correct, {mean:.1f} tokens on average"


def _shortest_rejection(args: argparse.Namespace) -> int:
    from megatron_rl.data.sft_data import write_records
    from megatron_rl.long2short.rejection import shortest_correct, shortest_rejection_records

    records, responses = _sample(args)
    kept = shortest_rejection_records(records, responses)
    write_records(args.out, kept)
    chosen = [shortest_correct(sampled) for sampled in responses.values()]
    lengths = [response.tokens for response in chosen if response is not None]
    mean = f", {sum(lengths) / len(lengths):.1f} tokens on average" if lengths else ""
    print(f"wrote {len(kept)} SFT records to {args.out} (the shortest correct of {args.n} for each prompt with "
          f"one{mean}; {_describe_samples(responses)})")
    return 0


def _dpo_pairs(args: argparse.Namespace) -> int:
    from megatron_rl.data.sft_data import write_records
    from megatron_rl.errors import UserError
    from megatron_rl.long2short.dpo_pairs import preference_pairs

    if args.length_ratio < 1:
        raise UserError(f"--length-ratio must be ≥ 1 (got {args.length_ratio})")
    records, responses = _sample(args)
    pairs = preference_pairs(records, responses, args.length_ratio)
    write_records(args.out, pairs)
    prompts = len({pair.id.rsplit("-", 1)[0] for pair in pairs})
    print(f"wrote {len(pairs)} preference pairs of {prompts} prompts to {args.out} ({_describe_samples(responses)})")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from megatron_rl.long2short.sampling import evaluate

    records, settings, backends = load_prompts_to_sample(args)
    with _engine(args) as session:
        result = evaluate(session, records, settings, backends, args.reward_workers)
    print(f"accuracy {result.accuracy:.3f} on {result.prompts} prompts, {result.mean_response_tokens:.1f} response "
          f"tokens on average ({result.truncated_fraction:.2f} truncated at {args.max_new_tokens})")
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(result), indent=2) + "\n")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from megatron_rl.errors import UserError
    from megatron_rl.long2short.merge import merge_checkpoints

    for name in ("tp", "pp"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} must be ≥ 1 (got {getattr(args, name)})")
    manifest = merge_checkpoints(args.a, args.b, args.weight, args.out, args.tp, args.pp)
    print(f"wrote {args.out}: {args.weight:g}·{args.a} + {1 - args.weight:g}·{args.b} (TP={manifest.tp}, PP={manifest.pp})")
    return 0
