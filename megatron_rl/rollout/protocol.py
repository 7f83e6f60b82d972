"""Wire formats of the engine boundary: SGLang 0.5.23's native HTTP API, in one place.

Every HTTP request and response body that `EngineClient` sends or reads, and that the embedded engine
server accepts or returns, is a model here. Field names, JSON shapes and defaults are SGLang's
(`sglang/srt/managers/io_struct.py`, `sglang/api/v1/api_types.py`, `sglang/srt/entrypoints/http_server.py`
of the 0.5.23 wheel); `tests/test_rollout_contract.py` checks each request model's fields and types
against those files, so a field SGLang lacks cannot be added here unnoticed.

Request bodies forbid unknown keys (the embedded server answers 400 naming the key); response bodies
ignore unknown keys, so the client reads a real SGLang server's richer responses.

Two kinds of classes:
* wire bodies (`GenerateBody`, `GenerateResponse`, `UpdateWeightsFromDiskBody`, ...), one per endpoint;
* the client's per-request API (`GenerateRequest` in, `GenerateResult` out), built on `SamplingParams`.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# ---------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------


class EngineError(RuntimeError):
    """An engine call failed. The message names the endpoint, the URL and the server's error text."""

    def __init__(self, message: str, *, endpoint: str = "", url: str = "", status: int | None = None,
                 server_message: str = "", body: Any = None):
        super().__init__(message)
        self.endpoint = endpoint
        self.url = url
        self.status = status
        self.server_message = server_message
        self.body = body  # the parsed JSON error body, when there was one


class EngineUnreachable(EngineError):
    """No HTTP connection could be made: the server is down, the port is wrong, or the host is unknown."""


class EngineConnectionLost(EngineError):
    """The connection broke before an answer came: the engine most likely died mid-request."""


class EngineLostWeights(EngineError):
    """The engine came back from a crash without the weight version pushed into it (hybrid.weight_sync
    cuda_ipc or nccl): nothing on its side can restore it, the trainer must push it again."""

    def __init__(self, message: str, *, weight_version: str, url: str = ""):
        super().__init__(message, url=url)
        self.weight_version = weight_version


# ---------------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------------

FinishType = Literal["stop", "length", "abort"]
PauseMode = Literal["abort", "retract", "in_place"]
MemoryTag = Literal["weights", "kv_cache", "cuda_graph"]  # sglang/srt/constants.py GPU_MEMORY_TYPE_*
MEMORY_TAGS: tuple[str, ...] = ("weights", "kv_cache", "cuda_graph")

# Every key SGLang 0.5.23 accepts in `sampling_params` (api_types.SamplingParams; the contract test
# compares this list with the wheel). Keys here but not in our `SamplingParams` are valid SGLang that
# the embedded engine does not implement: it answers 400 "not supported" instead of "unknown field".
SGLANG_SAMPLING_PARAM_KEYS: tuple[str, ...] = (
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n", "json_schema",
    "regex", "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
    "no_stop_trim", "stream_interval", "logit_bias", "sampling_seed", "custom_params", "beam_width",
    "watermark", "choice",
)

SAMPLING_EPS = 1e-6  # sglang/srt/sampling/sampling_params.py _SAMPLING_EPS: temperature below it is greedy


class SglangStruct:
    """Where a wire model's SGLang counterpart lives: `file` inside the wheel, `names` of the structs.

    `match="all"`: every field of ours must exist (with a compatible type) in every named struct.
    `match="any"`: each field must exist in at least one of them (for tagged unions such as FinishReason).
    `direction`: "request" bodies are type-checked (what we send must be accepted); "response" bodies
    are name-checked (what we read must be something SGLang sends).
    """

    def __init__(self, *targets: tuple[str, str], match: Literal["all", "any"] = "all",
                 direction: Literal["request", "response"] = "request", tag_fields: tuple[str, ...] = ()):
        self.targets = targets
        self.match = match
        self.direction = direction
        self.tag_fields = tag_fields


IO_STRUCT = "sglang/srt/managers/io_struct.py"
API_TYPES = "sglang/api/v1/api_types.py"


class _RequestBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    sglang: ClassVar[SglangStruct]


class _ResponseBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    sglang: ClassVar[SglangStruct]


# ---------------------------------------------------------------------------------------------------
# /generate
# ---------------------------------------------------------------------------------------------------


class SamplingParams(_RequestBody):
    """Per-request sampling, SGLang's names and defaults (`max_new_tokens` defaults to 128 there too).

    temperature 0 is greedy (SGLang: temperature < 1e-6 → top_k = 1, temperature := 1); top_k -1 = all.
    """

    sglang: ClassVar[SglangStruct] = SglangStruct((API_TYPES, "SamplingParams"))

    max_new_tokens: int = Field(128, ge=0)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = -1
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    min_new_tokens: int = Field(0, ge=0)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    sampling_seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value: int) -> int:
        if value != -1 and value < 1:
            raise ValueError(f"top_k must be -1 (disable) or at least 1, got {value}")
        return value

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS


class GenerateBody(_RequestBody):
    """`POST /generate` body: one prompt (`input_ids: [int]`) or a batch (`[[int], ...]`).

    `sampling_params`, `return_logprob` and `rid` are one value for all or a list with one per prompt;
    a single `rid` string for a batch becomes `f"{rid}_{i}"` (SGLang's `_normalize_rid`).
    """

    sglang: ClassVar[SglangStruct] = SglangStruct((IO_STRUCT, "GenerateReqInput"), (API_TYPES, "GenerateRequest"))

    input_ids: list[int] | list[list[int]]
    sampling_params: SamplingParams | list[SamplingParams] | None = None
    return_logprob: bool | list[bool] | None = None
    # -1: log-probs of output tokens only; k ≥ 0: also of the prompt tokens from position k on (needs return_logprob)
    logprob_start_len: int | list[int] | None = None
    rid: str | list[str] | None = None
    stream: bool = False

    @property
    def is_batch(self) -> bool:
        return bool(self.input_ids) and isinstance(self.input_ids[0], list)


class FinishReason(_ResponseBody):
    """`meta_info.finish_reason`: stop {matched}, length {length}, abort {message, status_code, err_type}."""

    sglang: ClassVar[SglangStruct] = SglangStruct(
        (API_TYPES, "FinishStop"), (API_TYPES, "FinishLength"), (API_TYPES, "FinishAbort"),
        match="any", direction="response", tag_fields=("type",))

    type: FinishType
    matched: int | str | list[int] | None = None
    length: int | None = None
    message: str | None = None
    status_code: int | None = None
    err_type: str | None = None


class WeightVersionSpan(_ResponseBody):
    """Which weight version produced output tokens [start, end) (SGLang 0.5.20+)."""

    sglang: ClassVar[SglangStruct] = SglangStruct((API_TYPES, "WeightVersionSpan"), direction="response")

    version: str
    start: int
    end: int


class MetaInfo(_ResponseBody):
    """`meta_info` of one /generate result. Log-prob entries are `[logprob, token_id, text]`.

    `input_token_logprobs` (with `logprob_start_len` ≥ 0) has one entry per prompt token from that position
    on; the first entry's logprob is null (SGLang does not compute the position before the start).
    """

    sglang: ClassVar[SglangStruct] = SglangStruct((API_TYPES, "GenerateMetaInfo"), direction="response")

    id: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int | None = None  # SGLang omits it for requests aborted in the waiting queue
    completion_tokens: int = 0
    cached_tokens: int = 0
    weight_version: str | None = None
    weight_versions: list[WeightVersionSpan] = []
    e2e_latency: float | None = None
    output_token_logprobs: list[tuple[float | None, int, str | None]] | None = None
    input_token_logprobs: list[tuple[float | None, int, str | None]] | None = None


class GenerateResponse(_ResponseBody):
    """One /generate result (a batch request returns a JSON list of these). `text` only with a tokenizer."""

    sglang: ClassVar[SglangStruct] = SglangStruct((API_TYPES, "GenerateResponse"), direction="response")

    text: str | None = None
    output_ids: list[int]
    meta_info: MetaInfo


class GenerateRequest(BaseModel):
    """One prompt for `EngineClient.generate` (the client packs a list of these into one GenerateBody)."""

    model_config = ConfigDict(extra="forbid")

    input_ids: list[int] = Field(min_length=1)
    sampling_params: SamplingParams = Field(default_factory=SamplingParams)
    return_logprob: bool = True
    # ≥ 0: also return the log-probs of the prompt tokens from this position on (`GenerateResult.input_logprobs`)
    logprob_start_len: int = Field(-1, ge=-1)
    rid: str | None = None


class GenerateResult(BaseModel):
    """What `EngineClient.generate` returns per request.

    `output_ids` holds every sampled token, the EOS/stop token included (SGLang does not trim it).
    `output_logprobs[i]` is the log-prob of `output_ids[i]` (None when return_logprob was false).
    `input_logprobs[i]` is the log-prob of `input_ids[logprob_start_len + i]` given the tokens before it, the
    first one None (only with logprob_start_len ≥ 0). SGLang computes both from the raw logits for the
    prompt and temperature-scaled ones for the output (see the embedded engine's module docstring).
    """

    rid: str
    output_ids: list[int]
    output_logprobs: list[float] | None
    finish_reason: FinishType
    finish_matched: int | str | list[int] | None = None
    finish_message: str | None = None
    weight_version: str | None
    weight_versions: list[WeightVersionSpan] = []
    prompt_tokens: int
    completion_tokens: int
    text: str | None = None
    input_logprobs: list[float | None] | None = None

    @classmethod
    def from_response(cls, response: GenerateResponse, request: GenerateRequest | None = None) -> GenerateResult:
        meta = response.meta_info
        finish = meta.finish_reason
        if finish is None:
            raise ValueError(f"request {meta.id}: response has no finish_reason (an unfinished stream chunk?)")
        logprobs = None
        if meta.output_token_logprobs is not None:
            logprobs = [float("nan") if entry[0] is None else float(entry[0]) for entry in meta.output_token_logprobs]
        input_logprobs = None
        if meta.input_token_logprobs is not None:
            input_logprobs = [None if entry[0] is None else float(entry[0]) for entry in meta.input_token_logprobs]
        prompt_tokens = meta.prompt_tokens
        if prompt_tokens is None:
            prompt_tokens = len(request.input_ids) if request is not None else 0
        return cls(
            rid=meta.id, output_ids=list(response.output_ids), output_logprobs=logprobs,
            finish_reason=finish.type,
            finish_matched=finish.matched if finish.type == "stop" else None,
            finish_message=finish.message, weight_version=meta.weight_version,
            weight_versions=list(meta.weight_versions), prompt_tokens=prompt_tokens,
            completion_tokens=meta.completion_tokens, text=response.text, input_logprobs=input_logprobs,
        )


# ---------------------------------------------------------------------------------------------------
# Control endpoints
# ---------------------------------------------------------------------------------------------------


class UpdateWeightsFromDiskBody(_RequestBody):
    """`POST /update_weights_from_disk`: load HF safetensors from `model_path` (names must match the model)."""

    sglang: ClassVar[SglangStruct] = SglangStruct((IO_STRUCT, "UpdateWeightFromDiskReqInput"))

    model_path: str = Field(min_length=1)
    load_format: str | None = None
    weight_version: str | None = None
    flush_cache: bool = True
    abort_all_requests: bool = False


class UpdateWeightsResult(_ResponseBody):
    """Answer of `/update_weights_from_disk` (HTTP 200 on success, 400 with success=false otherwise)."""

    sglang: ClassVar[SglangStruct] = SglangStruct((IO_STRUCT, "UpdateWeightFromDiskReqOutput"), direction="response")

    success: bool
    message: str
    num_paused_requests: int = 0


class BeginWeightUpdateBody(_RequestBody):
    """`POST /begin_weight_update` (0.5.21+): opens the session that tensor and distributed updates need."""

    sglang: ClassVar[SglangStruct] = SglangStruct((IO_STRUCT, "BeginWeightUpdateReqInput"))

    selector: Literal["target", "draft", "all"] = "all"


class EndWeightUpdateBody(_RequestBody):
    """`POST /end_weight_update` `{}`: closes the session (SGLang finalizes the loaded weights here)."""

    sglang: ClassVar[SglangStruct] = SglangStruct((IO_STRUCT, "EndWeightUpdateReqInput"))


class UpdateWeightsFromTensorBody(_RequestBody):
    """`POST /update_weights_from_tensor`: one base64 ForkingPickler payload per engine TP rank.

    load_format null: the payload is a list of (HF name, tensor); "flattened_bucket": a dict with
    `flattened_tensor` and `metadata` (see `weight_transport.py`). Tensors travel as handles (CUDA IPC on
    GPU, shared memory on CPU); the producer keeps them alive until the call returns.
    """

    sglang: ClassVar[SglangStruct] = SglangStruct((IO_STRUCT, "UpdateWeightsFromTensorReqInput"))

    serialized_named_tensors: list[str] = Field(min_length=1)
    load_format: str | None = None
    weight_version: str | None = None
    flush_cache: bool = True
    abort_all_requests: bool = False


class InitWeightsUpdateGroupBody(_RequestBody):
    """`POST /init_weights_update_group`: the engine's TP rank r joins as rank `rank_offset + r`; the call
    returns once every rank (the trainer's rank 0 too) has joined."""

    sglang: ClassVar[SglangStruct] = SglangStruct((IO_STRUCT, "InitWeightsUpdateGroupReqInput"))

    master_address: str = Field(min_length=1)
    master_port: int = Field(ge=1, le=65535)
    rank_offset: int = Field(ge=1)
    world_size: int = Field(ge=2)
    group_name: str = Field("weight_update_group", min_length=1)
    backend: str = "nccl"


class UpdateWeightsFromDistributedBody(_RequestBody):
    """`POST /update_weights_from_distributed`: the engine receives these tensors by broadcast from group
    rank 0, in `names` order (one broadcast per tensor, or one of their concatenated bytes with
    load_format "flattened_bucket")."""

    sglang: ClassVar[SglangStruct] = SglangStruct((IO_STRUCT, "UpdateWeightsFromDistributedReqInput"))

    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str = Field("weight_update_group", min_length=1)
    load_format: str | None = None
    weight_version: str | None = None
    flush_cache: bool = True
    abort_all_requests: bool = False


class DestroyWeightsUpdateGroupBody(_RequestBody):
    """`POST /destroy_weights_update_group`."""

    sglang: ClassVar[SglangStruct] = SglangStruct((IO_STRUCT, "DestroyWeightsUpdateGroupReqInput"))

    group_name: str = Field("weight_update_group", min_length=1)


class UpdateWeightVersionBody(_RequestBody):
    """`POST /update_weight_version`. SGLang aborts every request unless abort_all_requests is false."""

    sglang: ClassVar[SglangStruct] = SglangStruct((IO_STRUCT, "UpdateWeightVersionReqInput"))

    new_version: str = Field(min_length=1)
    abort_all_requests: bool = True


class WeightControlResult(_ResponseBody):
    """`{"success", "message"}`: the answer of the weight-update control endpoints (HTTP 400 when success=false)."""

    sglang: ClassVar[SglangStruct] = SglangStruct(
        (IO_STRUCT, "BeginWeightUpdateReqOutput"), (IO_STRUCT, "EndWeightUpdateReqOutput"),
        (IO_STRUCT, "UpdateWeightsFromTensorReqOutput"), (IO_STRUCT, "UpdateWeightsFromDistributedReqOutput"),
        (IO_STRUCT, "InitWeightsUpdateGroupReqOutput"), (IO_STRUCT, "DestroyWeightsUpdateGroupReqOutput"),
        direction="response")

    success: bool
    message: str


class ReleaseMemoryOccupationBody(_RequestBody):
    """`POST /release_memory_occupation`: tags null/[] = all of weights, kv_cache, cuda_graph."""

    sglang: ClassVar[SglangStruct] = SglangStruct((IO_STRUCT, "ReleaseMemoryOccupationReqInput"))

    tags: list[MemoryTag] | None = None


class ResumeMemoryOccupationBody(_RequestBody):
    """`POST /resume_memory_occupation`: tags null/[] = all of weights, kv_cache, cuda_graph."""

    sglang: ClassVar[SglangStruct] = SglangStruct((IO_STRUCT, "ResumeMemoryOccupationReqInput"))

    tags: list[MemoryTag] | None = None


class AbortRequestBody(_RequestBody):
    """`POST /abort_request`: requests whose rid starts with `rid`, or everything with `abort_all`."""

    sglang: ClassVar[SglangStruct] = SglangStruct((IO_STRUCT, "AbortReq"))

    rid: str = ""
    abort_all: bool = False


class PauseGenerationBody(_RequestBody):
    """`POST /pause_generation`: abort (finish running requests as aborted), retract, or in_place."""

    sglang: ClassVar[SglangStruct] = SglangStruct((IO_STRUCT, "PauseGenerationReqInput"))

    mode: PauseMode = "abort"


class ContinueGenerationBody(_RequestBody):
    """`POST /continue_generation` (torch_empty_cache is a CUDA allocator hint; no-op on CPU)."""

    sglang: ClassVar[SglangStruct] = SglangStruct((IO_STRUCT, "ContinueGenerationReqInput"))

    torch_empty_cache: bool = True


class StatusMessage(_ResponseBody):
    """Answer of pause/continue: `{"message": "Generation paused successfully.", "status": "ok"}`."""

    message: str
    status: str


class ModelInfo(_ResponseBody):
    """`GET /model_info` (0.5.15+; `/get_model_info` is the deprecated alias). Carries `weight_version`."""

    model_path: str | None = None
    served_model_name: str | None = None
    tokenizer_path: str | None = None
    is_generation: bool = True
    weight_version: str | None = None
    load_format: str | None = None
    model_type: str | None = None
    architectures: list[str] | None = None


class ErrorDetail(BaseModel):
    message: str


class ErrorBody(BaseModel):
    """SGLang's error body: `{"error": {"message": ...}}` (`_create_error_response`)."""

    error: ErrorDetail


# ---------------------------------------------------------------------------------------------------
# Endpoint table: what the client calls and the embedded server serves (the contract test checks that
# each path exists in SGLang 0.5.23's http_server.py and each request body against io_struct/api_types).
# ---------------------------------------------------------------------------------------------------


class Endpoint:
    def __init__(self, path: str, methods: tuple[str, ...], body: type[BaseModel] | None = None,
                 response: type[BaseModel] | None = None):
        self.path = path
        self.methods = methods
        self.body = body
        self.response = response


ENDPOINTS: dict[str, Endpoint] = {e.path: e for e in (
    Endpoint("/generate", ("POST", "PUT"), GenerateBody, GenerateResponse),
    Endpoint("/health", ("GET",)),
    Endpoint("/health_generate", ("GET",)),
    Endpoint("/model_info", ("GET",), None, ModelInfo),
    Endpoint("/get_model_info", ("GET",), None, ModelInfo),
    Endpoint("/server_info", ("GET",)),
    Endpoint("/get_server_info", ("GET",)),
    Endpoint("/flush_cache", ("GET", "POST")),
    Endpoint("/update_weights_from_disk", ("POST",), UpdateWeightsFromDiskBody, UpdateWeightsResult),
    Endpoint("/begin_weight_update", ("POST",), BeginWeightUpdateBody, WeightControlResult),
    Endpoint("/end_weight_update", ("POST",), EndWeightUpdateBody, WeightControlResult),
    Endpoint("/update_weights_from_tensor", ("POST",), UpdateWeightsFromTensorBody, WeightControlResult),
    Endpoint("/init_weights_update_group", ("POST",), InitWeightsUpdateGroupBody, WeightControlResult),
    Endpoint("/update_weights_from_distributed", ("POST",), UpdateWeightsFromDistributedBody, WeightControlResult),
    Endpoint("/destroy_weights_update_group", ("POST",), DestroyWeightsUpdateGroupBody, WeightControlResult),
    Endpoint("/update_weight_version", ("POST",), UpdateWeightVersionBody, WeightControlResult),
    Endpoint("/release_memory_occupation", ("GET", "POST"), ReleaseMemoryOccupationBody),
    Endpoint("/resume_memory_occupation", ("GET", "POST"), ResumeMemoryOccupationBody),
    Endpoint("/abort_request", ("POST",), AbortRequestBody),
    Endpoint("/pause_generation", ("POST",), PauseGenerationBody, StatusMessage),
    Endpoint("/continue_generation", ("POST",), ContinueGenerationBody, StatusMessage),
)}

REQUEST_BODIES: tuple[type[_RequestBody], ...] = (
    GenerateBody, SamplingParams, UpdateWeightsFromDiskBody, ReleaseMemoryOccupationBody,
    ResumeMemoryOccupationBody, AbortRequestBody, PauseGenerationBody, ContinueGenerationBody,
    BeginWeightUpdateBody, EndWeightUpdateBody, UpdateWeightsFromTensorBody, InitWeightsUpdateGroupBody,
    UpdateWeightsFromDistributedBody, DestroyWeightsUpdateGroupBody, UpdateWeightVersionBody,
)
RESPONSE_BODIES: tuple[type[_ResponseBody], ...] = (
    GenerateResponse, MetaInfo, FinishReason, WeightVersionSpan, UpdateWeightsResult, WeightControlResult,
)


# ---------------------------------------------------------------------------------------------------
# Validation messages
# ---------------------------------------------------------------------------------------------------

_MODEL_NAMES = {cls.__name__ for cls in (*REQUEST_BODIES, *RESPONSE_BODIES)}


def describe_validation_error(error: ValidationError, body: Any = None) -> str:
    """One line naming the offending field, e.g. `sampling_params.temperature: Input should be ...`.

    Pydantic reports a failing union once per member; only the most specific error is kept.
    """
    errors = error.errors()
    if not errors:
        return str(error)

    def path(loc) -> str:
        parts: list[str] = []
        for part in loc:
            if isinstance(part, int):
                parts.append(f"[{part}]")
            elif isinstance(part, str) and part.isidentifier() and part not in _MODEL_NAMES:
                parts.append(("." if parts else "") + part)
        return "".join(parts) or "body"

    # Prefer the deepest error (the member of a union that got furthest), then the first.
    best = max(errors, key=lambda e: len([p for p in e["loc"] if not (isinstance(p, str) and "[" in p)]))
    message = best["msg"]
    if best["type"] == "extra_forbidden":
        field = path(best["loc"])
        key = field.rsplit(".", 1)[-1]
        if field.startswith("sampling_params") and key in SGLANG_SAMPLING_PARAM_KEYS:
            message = "valid SGLang sampling parameter, but not supported by this engine"
        elif field == "text":
            message = "text prompts are not supported by this engine; send token ids in input_ids"
        else:
            message = "unknown or unsupported field"
    elif best["type"] == "json_invalid":
        return f"body is not valid JSON: {message}"
    return f"{path(best['loc'])}: {message}"
