"""`megatron-rl sandbox ...` subcommands: serve, run, capabilities."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from megatron_rl.errors import UserError

_LANGUAGE_BY_SUFFIX = {".py": "python", ".cpp": "cpp", ".cc": "cpp", ".cxx": "cpp"}
# RunRequest field → the `sandbox run` flag that sets it, for error messages.
_FLAG_BY_FIELD = {"program": "PROGRAM", "stdin": "--stdin", "timeout_s": "--timeout", "cpu_time_s": "--cpu-time",
                  "memory_mb": "--memory-mb", "max_processes": "--max-processes",
                  "max_output_bytes": "--max-output-bytes", "language": "--language"}


def register(subparsers) -> None:
    sandbox = subparsers.add_parser("sandbox", help="the code-execution sandbox (bubblewrap + seccomp + cgroups)")
    actions = sandbox.add_subparsers(dest="action", required=True, metavar="ACTION")

    serve = actions.add_parser("serve", help="serve a pre-warmed pool of sandboxes over HTTP")
    add_serve_arguments(serve)
    serve.set_defaults(handler=run_serve)

    run = actions.add_parser("run", help="run one program in a sandbox and print its verdict as JSON "
                                         "(exit status 0 when the verdict is ok, 1 otherwise)")
    run.add_argument("program", metavar="PROGRAM", help="source file: .py, or .cpp/.cc/.cxx (needs g++)")
    run.add_argument("--language", choices=("python", "cpp"), help="default: from PROGRAM's suffix")
    run.add_argument("--stdin", metavar="FILE", help="file to feed on standard input (default: empty)")
    run.add_argument("--timeout", type=float, default=10.0, metavar="S", help="wall-clock limit (default 10)")
    run.add_argument("--cpu-time", type=float, metavar="S", help="CPU-time limit (default: --timeout)")
    run.add_argument("--memory-mb", type=int, default=512, metavar="M", help="memory limit (default 512)")
    run.add_argument("--max-processes", type=int, default=32, help="processes and threads (default 32)")
    run.add_argument("--max-output-bytes", type=int, default=8 << 20, help="stdout + stderr (default 8 MiB)")
    _add_isolation_arguments(run)
    run.set_defaults(handler=run_run)

    capabilities = actions.add_parser("capabilities", help="print the isolation this machine offers, as JSON")
    _add_isolation_arguments(capabilities)
    capabilities.set_defaults(handler=run_capabilities)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=30080, help="TCP port (default 30080)")
    parser.add_argument("--workers", type=int, default=None, help="pre-started sandboxes (default: CPU cores)")
    parser.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"))
    _add_isolation_arguments(parser)


def _add_isolation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--python", help="interpreter for Python programs (default: this one's base interpreter)")
    parser.add_argument("--scratch-mb", type=int, default=64, help="size of each sandbox's /tmp and /dev/shm")
    parser.add_argument("--allow-unisolated", action="store_true",
                        help="run programs without bubblewrap when it is unavailable (rlimits only; unsafe)")


def _isolation(args: argparse.Namespace):
    from megatron_rl.reward.sandbox.isolation import detect

    if args.scratch_mb < 1:
        raise UserError(f"--scratch-mb must be ≥ 1 (got {args.scratch_mb})")
    if args.python is not None and not Path(args.python).is_file():
        raise UserError(f"--python {args.python}: no such file")
    return detect(python=args.python, scratch_mb=args.scratch_mb)


def run_serve(args: argparse.Namespace) -> int:
    from megatron_rl.reward.sandbox.pool import SandboxPool
    from megatron_rl.net import check_port
    from megatron_rl.reward.sandbox.server import serve

    check_port(args.host, args.port)
    pool = SandboxPool(_isolation(args), workers=args.workers, allow_unisolated=args.allow_unisolated)
    return serve(pool, host=args.host, port=args.port, log_level=args.log_level)


def run_run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from megatron_rl.reward.sandbox.pool import SandboxPool
    from megatron_rl.reward.sandbox.protocol import RunRequest

    program = _read_text(args.program, "PROGRAM")
    language = args.language or _LANGUAGE_BY_SUFFIX.get(Path(args.program).suffix)
    if language is None:
        raise UserError(f"PROGRAM {args.program}: cannot tell the language from its suffix; pass --language")
    try:
        request = RunRequest(program=program, language=language,
                             stdin=_read_text(args.stdin, "--stdin") if args.stdin else "",
                             timeout_s=args.timeout, cpu_time_s=args.cpu_time, memory_mb=args.memory_mb,
                             max_processes=args.max_processes, max_output_bytes=args.max_output_bytes)
    except ValidationError as error:
        first = error.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else ""
        raise UserError(f"{_FLAG_BY_FIELD.get(field, field)}: {first['msg']}") from None
    with SandboxPool(_isolation(args), workers=1, allow_unisolated=args.allow_unisolated) as pool:
        result = pool.run(request)
    print(json.dumps(result.model_dump(mode="json"), indent=2))
    return 0 if result.status == "ok" else 1


def run_capabilities(args: argparse.Namespace) -> int:
    print(json.dumps(_isolation(args).capabilities().model_dump(mode="json"), indent=2))
    return 0


def _read_text(path: str, flag: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as error:
        raise UserError(f"{flag} {path}: cannot read ({error.strerror})") from None
    except UnicodeDecodeError:
        raise UserError(f"{flag} {path}: not UTF-8 text") from None

