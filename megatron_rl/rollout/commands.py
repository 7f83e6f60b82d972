"""`megatron-rl engine ...` subcommands."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    engine = subparsers.add_parser("engine", help="the embedded rollout engine (SGLang's HTTP API on CPU)")
    actions = engine.add_subparsers(dest="action", required=True, metavar="ACTION")

    serve = actions.add_parser(
        "serve", help="serve a HF causal LM over SGLang's native HTTP API (torch + transformers, continuous batching)")
    add_serve_arguments(serve)
    serve.set_defaults(handler=run_serve)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF model directory (config.json + safetensors, or one .gguf)")
    parser.add_argument("--port", type=int, default=30000, help="TCP port (default 30000, as SGLang)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--api-key", default=None,
                        help="as SGLang's: every request but /health must send 'Authorization: Bearer KEY' "
                             "(required to listen beyond loopback)")
    parser.add_argument("--load-format", choices=("auto", "dummy"), default="auto",
                        help="auto: load the weights; dummy: random weights from config.json (until a weight sync)")
    parser.add_argument("--max-running-requests", type=int, default=8, help="bound on the running batch")
    parser.add_argument("--enable-deterministic-inference", action="store_true",
                        help="batch-invariant mode (SGLang's flag): every token is its own 1-row forward, bitwise "
                             "independent of the batch; over 10x slower than the default batched mode at 32+ requests")
    parser.add_argument("--chunked-prefill-size", type=int, default=None,
                        help="prompt tokens per prefill forward (batched mode, default 512) or per request and step "
                             "(deterministic mode, default 64); -1: no chunking")
    parser.add_argument("--max-total-tokens", type=int, default=None,
                        help="KV cache bound in tokens; admission keeps the running requests' worst case within it "
                             "(default: a quarter of RAM)")
    parser.add_argument("--weight-version", default="default", help="initial weight_version (SGLang's default: 'default')")
    parser.add_argument("--random-seed", type=int, default=None, help="seed for unseeded sampling and dummy weights")
    parser.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"))


def run_serve(args: argparse.Namespace) -> int:
    from megatron_rl.errors import UserError

    if args.max_running_requests < 1:
        raise UserError(f"--max-running-requests must be ≥ 1 (got {args.max_running_requests})")
    from megatron_rl.net import is_loopback

    if not args.api_key and not is_loopback(args.host):
        raise UserError(f"--host {args.host} is not a loopback address: pass --api-key KEY too (anyone who reaches "
                        "the engine could otherwise replace its weights), or listen on 127.0.0.1")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise UserError(f"the embedded engine needs fastapi and uvicorn ({error}); pip install fastapi uvicorn") from None
    from megatron_rl.rollout.embedded_server import serve

    return serve(args.model, host=args.host, port=args.port, load_format=args.load_format,
                 max_running_requests=args.max_running_requests, weight_version=args.weight_version,
                 enable_deterministic_inference=args.enable_deterministic_inference,
                 chunked_prefill_size=args.chunked_prefill_size, max_total_tokens=args.max_total_tokens,
                 random_seed=args.random_seed, log_level=args.log_level, api_key=args.api_key)
