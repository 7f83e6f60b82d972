"""The sandbox service: a `SandboxPool` behind HTTP (FastAPI + uvicorn).

`megatron-rl sandbox serve --port P` (or `python -m megatron_rl.reward.sandbox.server ...`). Bodies are the
models of `protocol.py`:

    POST /run            RunRequest → RunResult (200 whatever the verdict; 400 for an invalid request)
    GET  /health         Health: 200 while the pool serves, 503 once it is closed
    GET  /capabilities   Capabilities: the isolation detected at start-up

Errors are `{"error": {"message": ...}}` (400 names the field; 503 when the pool cannot run programs).
It listens on 127.0.0.1 unless told otherwise and has no authentication: anyone who can reach it can run
programs in it.
"""
from __future__ import annotations

import signal
import sys

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from megatron_rl.reward.sandbox.pool import SandboxPool
from megatron_rl.reward.sandbox.protocol import RunRequest, SandboxError


def _field_message(error: ValidationError | RequestValidationError) -> str:
    first = error.errors()[0]
    field = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    return f"{field or 'request'}: {first.get('msg')}"


def create_app(pool: SandboxPool) -> FastAPI:
    app = FastAPI(title="megatron-rl sandbox", docs_url=None, redoc_url=None, openapi_url=None)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message}}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return error(400, _field_message(exc))

    @app.exception_handler(SandboxError)
    async def _sandbox(request: Request, exc: SandboxError):
        return error(exc.status or 503, str(exc))

    @app.post("/run")
    async def run(request: Request):
        try:
            body = RunRequest.model_validate_json(await request.body() or b"{}")
        except ValidationError as exc:
            return error(400, _field_message(exc))
        # Blocking: waits for a worker and for the program; the threadpool keeps the event loop free.
        result = await run_in_threadpool(pool.run, body)
        return JSONResponse(result.model_dump(mode="json"))

    @app.get("/health")
    async def health():
        state = pool.health()
        return JSONResponse(state.model_dump(mode="json"), status_code=200 if state.status == "ok" else 503)

    @app.get("/capabilities")
    async def capabilities():
        return JSONResponse(pool.isolation.capabilities().model_dump(mode="json"))

    return app


def _exit_cleanly(signum, frame) -> None:
    raise SystemExit(0)


def serve(pool: SandboxPool, *, host: str = "127.0.0.1", port: int = 30080, log_level: str = "warning") -> int:
    """Serve `pool` until SIGINT/SIGTERM, then close it."""
    import uvicorn

    # uvicorn shuts down on SIGTERM and then raises the signal again; with this handler that ends in
    # SystemExit, so the pool below is closed (workers stopped, cgroups removed) instead of the process
    # dying on the spot.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        config = uvicorn.Config(create_app(pool), host=host, port=port, log_level=log_level, access_log=False,
                                timeout_graceful_shutdown=5)
        capabilities = pool.isolation.capabilities()
        print(f"sandbox: {pool.health().workers} workers ({capabilities.mode}, seccomp "
              f"{'on' if capabilities.seccomp else 'off'}, cgroup {capabilities.cgroup or 'off'}) "
              f"at http://{host}:{port}", flush=True)
        uvicorn.Server(config).run()
    finally:
        pool.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m megatron_rl.reward.sandbox.server ARGS` is `megatron-rl sandbox serve ARGS`."""
    from megatron_rl.cli import main as cli_main

    return cli_main(["sandbox", "serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
