"""`EngineClient`: the one way rollout code, the sidecar and weight sync talk to an inference engine.

It speaks SGLang 0.5.23's native HTTP API (bodies in `protocol.py`), so the same client drives a real
SGLang server and the embedded CPU engine (`megatron-rl engine serve`). Standard library only (urllib),
thread-safe (every call opens its own connection), and environment proxies are ignored: engines are
reached directly.

Failures raise `EngineError` whose message names the endpoint, the URL and the server's error text;
a server that cannot be connected to raises `EngineUnreachable` ("cannot reach engine at URL: ...;
is it running?"), and a connection that breaks before the answer `EngineConnectionLost` (the engine died).
"""
from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any, Iterable, Sequence

from pydantic import BaseModel, ValidationError

from megatron_rl.rollout.protocol import (
    AbortRequestBody, BeginWeightUpdateBody, ContinueGenerationBody, DestroyWeightsUpdateGroupBody,
    EndWeightUpdateBody, EngineConnectionLost, EngineError, EngineUnreachable, GenerateBody, GenerateRequest,
    GenerateResponse, GenerateResult, InitWeightsUpdateGroupBody, ModelInfo, PauseGenerationBody, ReleaseMemoryOccupationBody,
    ResumeMemoryOccupationBody, UpdateWeightsFromDiskBody, UpdateWeightsFromDistributedBody,
    UpdateWeightsFromTensorBody, UpdateWeightsResult, UpdateWeightVersionBody, WeightControlResult,
)

__all__ = ["EngineClient", "EngineConnectionLost", "EngineError", "EngineUnreachable"]


def _server_message(raw: bytes) -> tuple[str, Any]:
    """The error text of a response body: SGLang's {"error": {"message"}}, {"error": str}, {"message"}, or text."""
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        body = json.loads(text)
    except ValueError:
        return text or "(empty body)", None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"]), body
        if isinstance(error, str):
            return error, body
        for key in ("message", "detail"):
            if key in body:
                return str(body[key]), body
    return text, body


class EngineClient:
    """HTTP client of one engine server (SGLang or embedded). `timeout` (s) bounds each call; `api_key`: the
    engine's `--api-key` (sent as `Authorization: Bearer`), for an engine listening beyond loopback."""

    def __init__(self, base_url: str, timeout: float = 600.0, api_key: str | None = None):
        if "://" not in base_url:
            base_url = "http://" + base_url
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.api_key = api_key
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def __repr__(self) -> str:
        return f"EngineClient({self.base_url!r}, timeout={self.timeout})"

    def with_timeout(self, timeout: float) -> EngineClient:
        """The same engine and key, another bound per call."""
        return EngineClient(self.base_url, timeout=timeout, api_key=self.api_key)

    # ------------------------------------------------------------------ transport

    def _call(self, method: str, path: str, body: BaseModel | None = None, *, query: dict | None = None,
              timeout: float | None = None, ok: Iterable[int] = ()) -> tuple[int, bytes]:
        """Send one request; return (status, body) for 2xx and for statuses in `ok`, raise otherwise."""
        url = self.base_url + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = None
        headers = {"Accept": "application/json"}
        if self.api_key is not None:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if body is not None:
            data = json.dumps(body.model_dump(mode="json", exclude_none=True)).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        limit = self.timeout if timeout is None else timeout
        try:
            with self._opener.open(request, timeout=limit) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            raw = error.read()
            if error.code in tuple(ok):
                return error.code, raw
            message, parsed = _server_message(raw)
            raise EngineError(f"{method} {path} failed at {url}: HTTP {error.code}: {message}",
                              endpoint=path, url=url, status=error.code, server_message=message, body=parsed) from None
        except urllib.error.URLError as error:
            reason = error.reason
            raise EngineUnreachable(f"cannot reach engine at {self.base_url}: {reason}; is it running? "
                                    f"({method} {path})", endpoint=path, url=url) from None
        except (TimeoutError, socket.timeout):
            raise EngineError(f"{method} {path} at {url} timed out after {limit:g} s", endpoint=path, url=url) from None
        except (ConnectionError, http.client.HTTPException) as error:
            raise EngineConnectionLost(f"{method} {path} at {url}: connection lost ({type(error).__name__}: {error}); "
                              f"did the engine crash?", endpoint=path, url=url) from None

    def _json(self, method: str, path: str, body: BaseModel | None = None, **kwargs) -> Any:
        status, raw = self._call(method, path, body, **kwargs)
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise EngineError(f"{method} {path} at {self.base_url + path}: HTTP {status} but the body is not JSON: "
                              f"{raw[:200]!r}", endpoint=path, url=self.base_url + path, status=status) from None

    def _parse(self, model: type[BaseModel], value: Any, path: str) -> Any:
        try:
            return model.model_validate(value)
        except ValidationError as error:
            raise EngineError(f"{path} at {self.base_url + path}: unexpected response for {model.__name__}: "
                              f"{error.errors()[0]['loc']}: {error.errors()[0]['msg']}",
                              endpoint=path, url=self.base_url + path) from None

    # ------------------------------------------------------------------ generation

    def generate(self, requests: Sequence[GenerateRequest], timeout: float | None = None) -> list[GenerateResult]:
        """Generate for a batch of token-id prompts in one `/generate` call; results in request order.

        Requests without `rid` get a fresh uuid, so each can be aborted with `abort_request(rid)`.
        An aborted request returns normally with `finish_reason == "abort"` and its partial output.
        """
        requests = [r if r.rid is not None else r.model_copy(update={"rid": uuid.uuid4().hex}) for r in requests]
        if not requests:
            return []
        body = GenerateBody(
            input_ids=[list(r.input_ids) for r in requests],
            sampling_params=[r.sampling_params for r in requests],
            return_logprob=[r.return_logprob for r in requests],
            logprob_start_len=[r.logprob_start_len for r in requests]
            if any(r.logprob_start_len != -1 for r in requests) else None,
            rid=[r.rid for r in requests],
        )
        payload = self._json("POST", "/generate", body, timeout=timeout)
        if isinstance(payload, dict):
            payload = [payload]
        if not isinstance(payload, list) or len(payload) != len(requests):
            raise EngineError(f"/generate at {self.base_url}/generate: expected {len(requests)} results, got "
                              f"{len(payload) if isinstance(payload, list) else type(payload).__name__}",
                              endpoint="/generate", url=self.base_url + "/generate")
        results = []
        for request, item in zip(requests, payload):
            response = self._parse(GenerateResponse, item, "/generate")
            results.append(GenerateResult.from_response(response, request))
        return results

    def abort_request(self, rid: str | None = None, *, abort_all: bool = False) -> None:
        """Abort the request `rid` (SGLang: and those whose rid starts with it), or every request."""
        if rid is None and not abort_all:
            raise ValueError("abort_request needs a rid or abort_all=True")
        self._call("POST", "/abort_request", AbortRequestBody(rid=rid or "", abort_all=abort_all))

    def pause_generation(self, mode: str = "abort") -> None:
        """abort: running requests return now with finish_reason abort; retract / in_place: they wait.
        In every mode new requests are held until `continue_generation`."""
        self._call("POST", "/pause_generation", PauseGenerationBody(mode=mode))

    def continue_generation(self) -> None:
        self._call("POST", "/continue_generation", ContinueGenerationBody())

    def flush_cache(self, timeout: float = 0.0) -> None:
        """Raises EngineError (HTTP 400) when requests are pending (after waiting up to `timeout` s)."""
        self._call("POST", "/flush_cache", query={"timeout": timeout} if timeout else None)

    # ------------------------------------------------------------------ weights and memory

    def update_weights_from_disk(self, model_path: str, weight_version: str | None = None, *,
                                 load_format: str | None = None, flush_cache: bool = True,
                                 abort_all_requests: bool = False) -> UpdateWeightsResult:
        """Load HF safetensors from `model_path` into the served model; raises EngineError if success=false
        (the error's `.body` holds the server's {"success", "message", "num_paused_requests"})."""
        body = UpdateWeightsFromDiskBody(model_path=str(model_path), weight_version=weight_version,
                                         load_format=load_format, flush_cache=flush_cache,
                                         abort_all_requests=abort_all_requests)
        return self._weight_call("/update_weights_from_disk", body, UpdateWeightsResult)

    def _weight_call(self, path: str, body: BaseModel, answer: type[BaseModel] = WeightControlResult,
                     timeout: float | None = None) -> Any:
        """POST a weight-control call; its {"success", "message", ...} answer, or EngineError when success=false
        (HTTP 400 too; the error's `.body` holds the server's answer)."""
        status, raw = self._call("POST", path, body, ok=(400,), timeout=timeout)
        message, parsed = _server_message(raw)
        if not isinstance(parsed, dict) or "success" not in parsed:
            raise EngineError(f"POST {path} failed at {self.base_url + path}: HTTP {status}: {message}",
                              endpoint=path, url=self.base_url + path, status=status, server_message=message, body=parsed)
        result = self._parse(answer, parsed, path)
        if not result.success:
            raise EngineError(f"POST {path} failed at {self.base_url + path}: {result.message}", endpoint=path,
                              url=self.base_url + path, status=status, server_message=result.message, body=parsed)
        return result

    def begin_weight_update(self) -> WeightControlResult:
        """Open the weight-update session (SGLang 0.5.21+: tensor and distributed updates fail outside one)."""
        return self._weight_call("/begin_weight_update", BeginWeightUpdateBody())

    def end_weight_update(self) -> WeightControlResult:
        return self._weight_call("/end_weight_update", EndWeightUpdateBody())

    def update_weights_from_tensor(self, serialized_named_tensors: list[str], *, load_format: str | None = None,
                                   weight_version: str | None = None, flush_cache: bool = True,
                                   abort_all_requests: bool = False) -> WeightControlResult:
        """Load tensors shared by handle: one payload per engine TP rank (`weight_transport.dump_payload`).
        Keep the shared tensors alive until this returns."""
        body = UpdateWeightsFromTensorBody(serialized_named_tensors=list(serialized_named_tensors),
                                           load_format=load_format, weight_version=weight_version,
                                           flush_cache=flush_cache, abort_all_requests=abort_all_requests)
        return self._weight_call("/update_weights_from_tensor", body)

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str = "weight_update_group", backend: str = "nccl",
                                  timeout: float | None = None) -> WeightControlResult:
        """Have the engine join a broadcast group; returns once every rank joined, so the caller's own
        rank 0 must join concurrently (`weight_transport.join_weights_update_group`)."""
        body = InitWeightsUpdateGroupBody(master_address=master_address, master_port=master_port,
                                          rank_offset=rank_offset, world_size=world_size, group_name=group_name,
                                          backend=backend)
        return self._weight_call("/init_weights_update_group", body, timeout=timeout)

    def update_weights_from_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]], *,
                                        group_name: str = "weight_update_group", load_format: str | None = None,
                                        weight_version: str | None = None, flush_cache: bool = True,
                                        abort_all_requests: bool = False,
                                        timeout: float | None = None) -> WeightControlResult:
        """Announce tensors the caller then broadcasts from group rank 0 in `names` order; returns once received."""
        body = UpdateWeightsFromDistributedBody(names=list(names), dtypes=list(dtypes),
                                                shapes=[list(shape) for shape in shapes], group_name=group_name,
                                                load_format=load_format, weight_version=weight_version,
                                                flush_cache=flush_cache, abort_all_requests=abort_all_requests)
        return self._weight_call("/update_weights_from_distributed", body, timeout=timeout)

    def destroy_weights_update_group(self, group_name: str = "weight_update_group") -> WeightControlResult:
        return self._weight_call("/destroy_weights_update_group", DestroyWeightsUpdateGroupBody(group_name=group_name))

    def update_weight_version(self, new_version: str, *, abort_all_requests: bool = False) -> WeightControlResult:
        """Set the version the engine reports. SGLang's default aborts every request; ours does not."""
        body = UpdateWeightVersionBody(new_version=new_version, abort_all_requests=abort_all_requests)
        return self._weight_call("/update_weight_version", body)

    def release_memory_occupation(self, tags: list[str] | None = None) -> None:
        """Release `tags` (weights, kv_cache, cuda_graph; None = all). The engine must be idle."""
        self._call("POST", "/release_memory_occupation", ReleaseMemoryOccupationBody(tags=tags))

    def resume_memory_occupation(self, tags: list[str] | None = None) -> None:
        self._call("POST", "/resume_memory_occupation", ResumeMemoryOccupationBody(tags=tags))

    # ------------------------------------------------------------------ health and info

    def health(self) -> bool:
        """Liveness without generation: True on 200, False on 503 (raises EngineUnreachable if down)."""
        return self._call("GET", "/health", ok=(503,))[0] == 200

    def health_generate(self) -> bool:
        """True if a 1-token generation succeeds (200); False on 503 (starting, paused, released, stuck)."""
        return self._call("GET", "/health_generate", ok=(503,))[0] == 200

    def get_model_info(self) -> ModelInfo:
        """`GET /model_info` (0.5.15+; SGLang 0.5.23 has no /get_weight_version)."""
        return self._parse(ModelInfo, self._json("GET", "/model_info"), "/model_info")

    def weight_version(self) -> str | None:
        return self.get_model_info().weight_version

    def server_info(self) -> dict:
        return self._json("GET", "/server_info")

    def wait_until_ready(self, timeout: float = 120.0, interval: float = 0.2) -> None:
        """Poll `/health` until it answers 200; raise the last error (EngineUnreachable ...) at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.health():
                    return
                last: EngineError = EngineError(f"GET /health at {self.base_url}/health: HTTP 503 for {timeout:g} s",
                                                endpoint="/health", url=self.base_url + "/health", status=503)
            except EngineError as error:
                last = error
            if time.monotonic() >= deadline:
                raise last
            time.sleep(interval)
