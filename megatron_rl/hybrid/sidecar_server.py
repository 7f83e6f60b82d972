"""The sidecar's HTTP control API (FastAPI + uvicorn) and `megatron-rl sidecar`.

Endpoints and error format: `sidecar_protocol.py`. Every endpoint but `GET /v1/health` (for probes)
needs `Authorization: Bearer <token>`, the token coming from hybrid.sidecar_token_file or env
MEGATRON_RL_SIDECAR_TOKEN, compared in constant time.

Without a token the sidecar starts only when hybrid.sidecar_host is a loopback address: then only
processes of its own network namespace (the pod's containers) can reach it, the same ones that could
reach the engine's own unauthenticated API anyway. On any other address it refuses to start.
"""
from __future__ import annotations

import contextlib
import hmac
import logging
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from megatron_rl.errors import UserError
from megatron_rl.hybrid.sidecar import Sidecar, sidecar_from_config
from megatron_rl.hybrid.sidecar_protocol import (
    SIDECAR_TOKEN_ENV, HealthBody, LoadWeightsBody, MemoryTagsBody, SidecarAuthError, SidecarError, SidecarStatus,
    WeightsPushedBody, load_sidecar_token,
)
from megatron_rl.hybrid.weight_delivery import served_weight_file
from megatron_rl.net import check_port, free_port, is_loopback
from megatron_rl.rollout.engine_process import engine_url
from megatron_rl.rollout.protocol import describe_validation_error

if TYPE_CHECKING:
    from megatron_rl.config import Config

_log = logging.getLogger(__name__)

Body = TypeVar("Body", bound=BaseModel)
MAX_READY_WAIT_S = 60.0  # bound on one GET /v1/ready, which holds a worker thread while it waits


class _BadRequest(Exception):
    pass


class _WeightFileResponse(FileResponse):
    chunk_size = 2**22  # not starlette's 64 KiB: a shard of GBs in fewer trips through the event loop


def create_app(sidecar: Sidecar, token: str | None) -> FastAPI:
    app = FastAPI(title="megatron-rl sidecar", docs_url=None, redoc_url=None, openapi_url=None)
    expected = f"Bearer {token}".encode() if token is not None else None

    def error(status: int, message: str, kind: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)

    @app.exception_handler(SidecarError)
    async def _sidecar_error(request: Request, exc: SidecarError):
        return error(exc.http_status, str(exc), type(exc).__name__)

    @app.exception_handler(_BadRequest)
    async def _bad_request(request: Request, exc: _BadRequest):
        return error(400, str(exc), "SidecarRequestError")

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        _log.exception("sidecar: %s failed", request.url.path)
        return error(500, f"internal error in {request.url.path}: {type(exc).__name__}: {exc}", "SidecarError")

    @app.middleware("http")
    async def _authenticate(request: Request, call_next):
        if expected is not None and request.url.path != "/v1/health":
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                reason = "missing" if not given else "wrong"
                failure = SidecarAuthError(f"Authorization: {reason} bearer token; send 'Authorization: Bearer "
                                           f"<token>' with the token of hybrid.sidecar_token_file or "
                                           f"{SIDECAR_TOKEN_ENV}")
                return error(failure.http_status, str(failure), type(failure).__name__)
        return await call_next(request)

    async def parse(request: Request, model: type[Body]) -> Body:
        raw = await request.body()
        try:
            return model.model_validate_json(raw if raw.strip() else b"{}")
        except ValidationError as exc:
            raise _BadRequest(describe_validation_error(exc)) from None

    async def respond(operation: Callable[[], SidecarStatus]) -> JSONResponse:
        # Engine operations block (a restart can take minutes): off the event loop, so status stays answerable.
        status = await run_in_threadpool(operation)
        return JSONResponse(status.model_dump(mode="json"))

    @app.get("/v1/health")
    async def health():
        state = sidecar.status().state
        return JSONResponse(HealthBody(state=state).model_dump(), status_code=503 if state == "failed" else 200)

    @app.get("/v1/status")
    async def status():
        return JSONResponse(sidecar.status().model_dump(mode="json"))

    @app.get("/v1/ready")
    async def ready(timeout: float = 10.0, weight_version: str | None = None):
        if not 0 <= timeout <= MAX_READY_WAIT_S:
            raise _BadRequest(f"timeout: must be in 0..{MAX_READY_WAIT_S:g} s (got {timeout:g}); "
                              "poll again for longer waits")
        return await respond(lambda: sidecar.wait_ready(timeout, weight_version))

    @app.post("/v1/weights")
    async def load_weights(request: Request):
        body = await parse(request, LoadWeightsBody)
        return await respond(lambda: sidecar.load_weights(body.path, body.weight_version, body.sources))

    @app.post("/v1/weights/pushed")
    async def weights_pushed(request: Request):
        body = await parse(request, WeightsPushedBody)
        return await respond(lambda: sidecar.weights_pushed(body.weight_version))

    @app.post("/v1/memory/release")
    async def release_memory(request: Request):
        body = await parse(request, MemoryTagsBody)
        return await respond(lambda: sidecar.release_memory(body.tags))

    @app.post("/v1/memory/resume")
    async def resume_memory(request: Request):
        body = await parse(request, MemoryTagsBody)
        return await respond(lambda: sidecar.resume_memory(body.tags))

    @app.post("/v1/engine/restart")
    async def restart_engine():
        return await respond(sidecar.restart_engine)

    @app.post("/v1/engine/stop")
    async def stop_engine():
        return await respond(sidecar.stop_engine)

    @app.post("/v1/engine/start")
    async def start_engine():
        return await respond(sidecar.start_engine)

    @app.get("/v1/weight-files/{run_directory}/{version_directory}/{name}")
    async def weight_file(run_directory: str, version_directory: str, name: str):
        return _WeightFileResponse(served_weight_file(sidecar.shm_dir, run_directory, version_directory, name),
                                   media_type="application/octet-stream")

    return app


@contextlib.contextmanager
def serving_in_thread(sidecar: Sidecar, token: str | None = None, host: str = "127.0.0.1") -> Iterator[str]:
    """`sidecar`'s control API on a free port of `host`, served by a thread of this process (benchmarks and
    tests; `megatron-rl sidecar` serves in the foreground); yields its URL."""
    import uvicorn

    config = uvicorn.Config(create_app(sidecar, token), host=host, port=free_port(), log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="sidecar-api", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the sidecar's control API did not start on {host} (see the log above)")
        time.sleep(0.02)
    try:
        yield engine_url(host, config.port)
    finally:
        server.should_exit = True
        thread.join(10)


def _exit_cleanly(signum, frame) -> None:
    raise SystemExit(0)


def serve(config: Config, *, log_dir: Path | None = None, engine_port: int | None = None) -> int:
    """Run the sidecar of `config` (model.*, rollout.*, hybrid.*, control.*) until SIGINT/SIGTERM."""
    import uvicorn

    from megatron_rl.control.store import StoreUnavailable, store_from_config
    from megatron_rl.hybrid.sidecar_metadata import SidecarRegistration

    hybrid = config.hybrid
    token = load_sidecar_token(hybrid)
    if token is None and not is_loopback(hybrid.sidecar_host):
        raise UserError(f"hybrid.sidecar_host={hybrid.sidecar_host} is not a loopback address, and the sidecar has no "
                        f"token: set hybrid.sidecar_token_file (or env {SIDECAR_TOKEN_ENV}), or listen on 127.0.0.1")
    check_port(hybrid.sidecar_host, hybrid.sidecar_port)
    log_dir = Path(log_dir) if log_dir else Path(tempfile.gettempdir()) / f"megatron-rl-sidecar-{hybrid.pod_name}"
    log_dir.mkdir(parents=True, exist_ok=True)
    sidecar = sidecar_from_config(config, log_dir, engine_port=engine_port)
    sidecar.control_url = engine_url(hybrid.sidecar_host, hybrid.sidecar_port, hybrid.advertise_host)

    registration = None
    if config.control.store == "etcd":
        try:
            store = store_from_config(config.control)  # bad endpoints fail here, as a UserError
            connect = lambda: store  # noqa: E731
        except StoreUnavailable as error:
            _log.warning("sidecar: %s; serving anyway, and publishing once etcd answers", error)
            connect = lambda: store_from_config(config.control)  # noqa: E731
        registration = SidecarRegistration(sidecar, connect, run_name=config.control.run_name,
                                           lease_ttl_s=hybrid.sidecar_lease_ttl_s)
    else:
        _log.info("sidecar: control.store=%s: no metadata record (use etcd for the trainer to see this sidecar)",
                  config.control.store)

    # uvicorn shuts down on SIGTERM and then raises the signal again; with this handler that ends in
    # SystemExit, so the engine is stopped and the record removed instead of the process dying on the spot.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        sidecar.start()
        if registration is not None:
            registration.start()
        server_config = uvicorn.Config(create_app(sidecar, token), host=hybrid.sidecar_host, port=hybrid.sidecar_port,
                                       log_level="warning", access_log=False, timeout_graceful_shutdown=5)
        print(f"sidecar {hybrid.pod_name}: control API at http://{hybrid.sidecar_host}:{hybrid.sidecar_port}/v1/ "
              f"({'token required' if token else 'no token: loopback only'}); {config.rollout.engine} engine at "
              f"{sidecar.engine_url} (log: {log_dir / 'engine.log'})", flush=True)
        uvicorn.Server(server_config).run()
    finally:
        sidecar.close()  # first: an engine operation in flight fails fast instead of being waited for
        if registration is not None:
            registration.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m megatron_rl.hybrid.sidecar_server ARGS` is `megatron-rl sidecar ARGS`."""
    from megatron_rl.cli import main as cli_main

    return cli_main(["sidecar", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
