"""SGLang's native HTTP API in front of the embedded engine (FastAPI + uvicorn).

`megatron-rl engine serve --model DIR --port P` (or `python -m megatron_rl.rollout.embedded_server ...`).
Request/response bodies are the models of `protocol.py`; paths, methods and status codes follow SGLang
0.5.23 (`sglang/srt/entrypoints/http_server.py`), so `EngineClient` talks to both the same way:

    POST|PUT /generate                 single or batched input_ids → one result or a JSON list
    GET  /health                       liveness: 200 while the scheduler thread runs (no generation, like
                                       SGLang with SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=false)
    GET  /health_generate              1-token greedy generation; 503 while paused, released or stuck
    GET  /model_info, /get_model_info  model_path, weight_version, ...   (SGLang 0.5.23 has no
                                       /get_weight_version: weight_version is read from /model_info)
    GET  /server_info, /get_server_info  settings (SGLang's names: enable_deterministic_inference,
                                       chunked_prefill_size, max_total_tokens, ...) + internal_states[0]
                                       = scheduler stats, including `recent_batches` (the rids of each
                                       step's batch) and `kv_cache_tokens`
    GET|POST /flush_cache?timeout=s    200 text when idle, else 400 text
    POST /update_weights_from_disk     {"success", "message", "num_paused_requests"}; 400 when success=false
    POST /begin_weight_update, /end_weight_update        the session tensor and distributed updates need
    POST /update_weights_from_tensor   one payload (TP size 1): CPU tensors in shared memory, by handle
    POST /init_weights_update_group, /update_weights_from_distributed, /destroy_weights_update_group
                                       broadcast from the trainer (backend gloo on CPU)
    POST /update_weight_version        these answer {"success", "message"}; 400 when success=false
    GET|POST /release_memory_occupation, /resume_memory_occupation   200 `null`
    POST /abort_request                200, empty body
    POST /pause_generation             mode abort | retract | in_place
    POST /continue_generation

Errors are SGLang's `{"error": {"message": ...}}`: 400 for an invalid body (the message names the
field), 503 when the engine cannot generate now (memory released, shutting down). Handlers never
block the event loop: generation and control calls run on the engine's scheduler thread and are
awaited as futures.
"""
from __future__ import annotations

import asyncio
import hmac
import sys
import time
import uuid
from concurrent.futures import Future
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ValidationError

from megatron_rl.net import check_port
from megatron_rl.rollout.embedded_engine import (
    HEALTH_CHECK_RID_PREFIX, EmbeddedEngine, EngineRequest, EngineStateError, RequestError,
)
from megatron_rl.rollout.protocol import (
    AbortRequestBody, BeginWeightUpdateBody, ContinueGenerationBody, DestroyWeightsUpdateGroupBody,
    EndWeightUpdateBody, ErrorBody, ErrorDetail, GenerateBody, InitWeightsUpdateGroupBody, PauseGenerationBody, ReleaseMemoryOccupationBody,
    ResumeMemoryOccupationBody, SamplingParams, UpdateWeightsFromDiskBody, UpdateWeightsFromDistributedBody,
    UpdateWeightsFromTensorBody, UpdateWeightVersionBody, WeightControlResult, describe_validation_error,
)
from megatron_rl.rollout.weight_transport import PayloadError, load_payload, named_tensors

HEALTH_CHECK_TIMEOUT_S = 20.0
SERVER_VERSION = "megatron-rl-embedded-0.1"
TP_SIZE = 1  # the embedded engine is one process: one payload per update, rank rank_offset in a group

Body = TypeVar("Body", bound=BaseModel)


class HTTPFailure(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _requests_from_body(body: GenerateBody) -> list[EngineRequest]:
    """SGLang's GenerateReqInput normalization for token-id prompts (one value for all, or one per prompt)."""
    if body.stream:
        raise HTTPFailure(400, "stream: streaming is not supported by the embedded engine; send stream=false")
    prompts: list[list[int]] = body.input_ids if body.is_batch else [body.input_ids]  # type: ignore[assignment]
    if not prompts:
        raise HTTPFailure(400, "input_ids: must not be empty")
    count = len(prompts)

    def per_prompt(name: str, value: Any, default: Any) -> list:
        if value is None:
            return [default] * count
        if isinstance(value, list):
            if not body.is_batch:
                raise HTTPFailure(400, f"{name}: a list is only allowed for a batch of prompts (input_ids: [[...], ...])")
            if len(value) != count:
                raise HTTPFailure(400, f"{name}: got {len(value)} values for a batch of {count} prompts")
            return value
        return [value] * count

    params = per_prompt("sampling_params", body.sampling_params, SamplingParams())
    logprobs = per_prompt("return_logprob", body.return_logprob, False)
    starts = per_prompt("logprob_start_len", body.logprob_start_len, -1)
    if isinstance(body.rid, str):
        rids = [f"{body.rid}_{i}" for i in range(count)] if body.is_batch else [body.rid]
    else:
        rids = per_prompt("rid", body.rid, None)
        rids = [rid if rid is not None else uuid.uuid4().hex for rid in rids]
    return [EngineRequest(input_ids=list(ids), sampling_params=p, return_logprob=bool(lp), rid=rid, logprob_start_len=start)
            for ids, p, lp, rid, start in zip(prompts, params, logprobs, rids, starts)]


def create_app(engine: EmbeddedEngine, api_key: str | None = None) -> FastAPI:
    """`api_key` (SGLang's --api-key): every request but the /health probes must carry it as a bearer token."""
    app = FastAPI(title="megatron-rl embedded engine", docs_url=None, redoc_url=None, openapi_url=None)
    expected = f"Bearer {api_key}".encode() if api_key else None

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse(ErrorBody(error=ErrorDetail(message=message)).model_dump(), status_code=status)

    @app.middleware("http")
    async def _authorize(request: Request, call_next):
        if expected is not None and request.url.path not in ("/health", "/health_generate"):
            if not hmac.compare_digest(request.headers.get("authorization", "").encode(), expected):
                return error(401, "Unauthorized: this engine was started with --api-key; send "
                                  "'Authorization: Bearer <key>'")
        return await call_next(request)

    @app.exception_handler(HTTPFailure)
    async def _failure(request: Request, exc: HTTPFailure):
        return error(exc.status, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": str(exc)}
        field = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query"))
        return error(400, f"{field or 'request'}: {first.get('msg')}")

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        return error(500, f"internal error in {request.url.path}: {type(exc).__name__}: {exc}")

    async def parse(request: Request, model: type[Body]) -> Body:
        raw = await request.body()
        if not raw.strip():
            raw = b"{}"
        try:
            return model.model_validate_json(raw)
        except ValidationError as exc:
            raise HTTPFailure(400, describe_validation_error(exc)) from None

    async def wait(future: Future) -> Any:
        try:
            return await asyncio.wrap_future(future)
        except RequestError as exc:
            raise HTTPFailure(400, str(exc)) from None
        except EngineStateError as exc:
            raise HTTPFailure(400, str(exc)) from None

    @app.api_route("/generate", methods=["POST", "PUT"])
    async def generate(request: Request):
        body = await parse(request, GenerateBody)
        items = _requests_from_body(body)
        try:
            futures = engine.submit_many(items)
        except RequestError as exc:
            raise HTTPFailure(400, str(exc)) from None
        except EngineStateError as exc:
            raise HTTPFailure(503, str(exc)) from None
        try:
            results = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        except EngineStateError as exc:
            raise HTTPFailure(503, str(exc)) from None
        payload = [r.model_dump(mode="json", exclude_none=True) for r in results]
        return JSONResponse(payload if body.is_batch else payload[0])

    @app.get("/health")
    async def health():
        return Response(status_code=200 if engine.alive else 503)

    @app.get("/health_generate")
    async def health_generate():
        if not engine.alive:
            return error(503, "the scheduler is not running")
        if engine.paused is not None:
            return error(503, f"generation is paused (mode {engine.paused}); call /continue_generation")
        if engine.released:
            return error(503, f"memory is released ({', '.join(sorted(engine.released))})")
        probe = EngineRequest(input_ids=[0], sampling_params=SamplingParams(max_new_tokens=1, temperature=0.0),
                              rid=f"{HEALTH_CHECK_RID_PREFIX}_{uuid.uuid4().hex}")
        try:
            future = engine.submit(probe)
            await asyncio.wait_for(asyncio.wrap_future(future), HEALTH_CHECK_TIMEOUT_S)
        except asyncio.TimeoutError:
            engine.abort(probe.rid)
            return error(503, f"no generation output within {HEALTH_CHECK_TIMEOUT_S:.0f} s")
        except (EngineStateError, RequestError) as exc:
            return error(503, str(exc))
        return Response(status_code=200)

    @app.get("/model_info")
    @app.get("/get_model_info")
    async def model_info():
        return engine.model_info()

    @app.get("/server_info")
    @app.get("/get_server_info")
    async def server_info():
        return {
            "version": SERVER_VERSION,
            "engine": "embedded",
            "model_path": engine.model_path,
            "load_format": engine.load_format,
            "tp_size": TP_SIZE,
            "max_running_requests": engine.max_running_requests,
            "enable_deterministic_inference": engine.deterministic,
            "chunked_prefill_size": engine.chunked_prefill_size,
            "max_total_tokens": engine.max_total_tokens,
            "context_length": engine.context_length,
            "internal_states": [engine.stats()],
        }

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache(timeout: float = 0.0):
        if timeout < 0:
            raise HTTPFailure(400, "timeout: must be ≥ 0")
        deadline = time.monotonic() + timeout
        while True:
            if await wait(engine.flush_cache()):
                return PlainTextResponse("Cache flushed.\nThe embedded engine keeps no prefix cache; "
                                         "nothing was running.\n")
            if time.monotonic() >= deadline:
                message = ("Timed out waiting for idle state." if timeout > 0
                           else "Cache not flushed because there are pending requests")
                return PlainTextResponse(message, status_code=400)
            await asyncio.sleep(0.05)

    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(request: Request):
        body = await parse(request, UpdateWeightsFromDiskBody)
        result = await wait(engine.update_weights_from_disk(
            body.model_path, load_format=body.load_format, weight_version=body.weight_version,
            flush_cache=body.flush_cache, abort_all_requests=body.abort_all_requests))
        return JSONResponse(result.model_dump(mode="json"), status_code=200 if result.success else 400)

    def answered(result: WeightControlResult) -> JSONResponse:
        return JSONResponse(result.model_dump(mode="json"), status_code=200 if result.success else 400)

    @app.post("/begin_weight_update")
    async def begin_weight_update(request: Request):
        await parse(request, BeginWeightUpdateBody)  # selector: one model here, no draft
        return answered(await wait(engine.begin_weight_update()))

    @app.post("/end_weight_update")
    async def end_weight_update(request: Request):
        await parse(request, EndWeightUpdateBody)
        return answered(await wait(engine.end_weight_update()))

    def decoded_tensors(body: UpdateWeightsFromTensorBody) -> list:
        if body.load_format not in (None, "flattened_bucket"):
            raise HTTPFailure(400, f"load_format: {body.load_format!r} is not supported by the embedded engine; "
                                   f"use null (a list of (name, tensor)) or 'flattened_bucket'")
        if len(body.serialized_named_tensors) != TP_SIZE:
            raise HTTPFailure(400, f"serialized_named_tensors: got {len(body.serialized_named_tensors)} payloads, but "
                                   f"the embedded engine has TP size {TP_SIZE} (one payload per engine TP rank)")
        try:
            return named_tensors(load_payload(body.serialized_named_tensors[0]), body.load_format)
        except PayloadError as exc:
            raise HTTPFailure(400, f"serialized_named_tensors[0]: {exc}") from None

    @app.post("/update_weights_from_tensor")
    async def update_weights_from_tensor(request: Request):
        body = await parse(request, UpdateWeightsFromTensorBody)
        tensors = await asyncio.to_thread(decoded_tensors, body)
        return answered(await wait(engine.update_weights_from_tensor(
            tensors, weight_version=body.weight_version, flush_cache=body.flush_cache,
            abort_all_requests=body.abort_all_requests)))

    @app.post("/init_weights_update_group")
    async def init_weights_update_group(request: Request):
        body = await parse(request, InitWeightsUpdateGroupBody)
        return answered(await asyncio.to_thread(
            engine.init_weights_update_group, body.master_address, body.master_port, body.rank_offset,
            body.world_size, body.group_name, body.backend))

    @app.post("/update_weights_from_distributed")
    async def update_weights_from_distributed(request: Request):
        body = await parse(request, UpdateWeightsFromDistributedBody)
        return answered(await wait(engine.update_weights_from_distributed(
            body.names, body.dtypes, body.shapes, group_name=body.group_name, load_format=body.load_format,
            weight_version=body.weight_version, flush_cache=body.flush_cache,
            abort_all_requests=body.abort_all_requests)))

    @app.post("/destroy_weights_update_group")
    async def destroy_weights_update_group(request: Request):
        body = await parse(request, DestroyWeightsUpdateGroupBody)
        return answered(await wait(engine.destroy_weights_update_group(body.group_name)))

    @app.post("/update_weight_version")
    async def update_weight_version(request: Request):
        body = await parse(request, UpdateWeightVersionBody)
        await wait(engine.update_weight_version(body.new_version, body.abort_all_requests))
        return {"success": True, "message": f"Weight version updated to {body.new_version}",
                "new_version": body.new_version}

    @app.api_route("/release_memory_occupation", methods=["GET", "POST"])
    async def release_memory_occupation(request: Request):
        body = await parse(request, ReleaseMemoryOccupationBody)
        await wait(engine.release_memory(body.tags))
        return JSONResponse(None)

    @app.api_route("/resume_memory_occupation", methods=["GET", "POST"])
    async def resume_memory_occupation(request: Request):
        body = await parse(request, ResumeMemoryOccupationBody)
        await wait(engine.resume_memory(body.tags))
        return JSONResponse(None)

    @app.post("/abort_request")
    async def abort_request(request: Request):
        body = await parse(request, AbortRequestBody)
        await wait(engine.abort(body.rid, body.abort_all))
        return Response(status_code=200)

    @app.post("/pause_generation")
    async def pause_generation(request: Request):
        body = await parse(request, PauseGenerationBody)
        await wait(engine.pause(body.mode))
        return {"message": "Generation paused successfully.", "status": "ok"}

    @app.post("/continue_generation")
    async def continue_generation(request: Request):
        await parse(request, ContinueGenerationBody)
        await wait(engine.continue_generation())
        return {"message": "Generation continued successfully.", "status": "ok"}

    return app


# ---------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------


def serve(model: str, *, host: str = "127.0.0.1", port: int = 30000, load_format: str = "auto",
          max_running_requests: int = 8, weight_version: str = "default",
          enable_deterministic_inference: bool = False, chunked_prefill_size: int | None = None,
          max_total_tokens: int | None = None, random_seed: int | None = None, log_level: str = "warning",
          api_key: str | None = None) -> int:
    """Load the model, start the scheduler and serve until SIGINT/SIGTERM."""
    import uvicorn

    check_port(host, port)
    engine = EmbeddedEngine(model, load_format=load_format, max_running_requests=max_running_requests,
                            weight_version=weight_version, enable_deterministic_inference=enable_deterministic_inference,
                            chunked_prefill_size=chunked_prefill_size, max_total_tokens=max_total_tokens,
                            random_seed=random_seed).start()
    try:
        config = uvicorn.Config(create_app(engine, api_key), host=host, port=port, log_level=log_level,
                                access_log=False, timeout_graceful_shutdown=5)
        mode = "deterministic" if engine.deterministic else "batched"
        print(f"embedded engine: serving {model} ({mode} mode, weight_version {weight_version!r}, "
              f"max {max_running_requests} running, max {engine.max_total_tokens} KV tokens) "
              f"at http://{host}:{port}", flush=True)
        uvicorn.Server(config).run()
    finally:
        engine.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m megatron_rl.rollout.embedded_server ARGS` is `megatron-rl engine serve ARGS`."""
    from megatron_rl.cli import main as cli_main

    return cli_main(["engine", "serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
