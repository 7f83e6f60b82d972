"""The embedded engine: a HF causal LM (torch + transformers, CPU) behind a continuous-batching scheduler.

No HTTP here (`embedded_server.py` puts SGLang's native API in front of it). All model work runs on one
scheduler thread; other threads talk to it through `submit` (generation) and control calls, which are
executed by the scheduler between steps and answered through `concurrent.futures.Future`s.

Scheduling (continuous batching)
    Requests wait in a FIFO queue; before every step the scheduler admits waiting requests into the
    running batch up to `max_running_requests`, steps every running request once, and removes the ones
    that finished. A request that arrives while others run joins at the next step; a finished one
    leaves at the end of its step, so nobody waits for a whole batch. Each request owns its KV cache (a
    transformers `DynamicCache`). A step advances a request by up to `prefill_chunk` prompt tokens
    (prefill, interleaved with the others' decoding) or by one token (decode), then samples.
    `stats()` exposes the last steps' batch compositions (`recent_batches`: step number and rids).

Determinism guarantee
    Every token of every request goes through the model as its own forward (one token, its own KV
    cache), for prompt and generated tokens alike. On CPU, batched GEMMs are not row-invariant: a
    row's result changes bitwise with the number of rows (gemv for one row, differently blocked gemm
    for 2..15 rows), and padded attention changes its reduction order. So instead of batching
    arithmetic, the scheduler batches *requests*: the logits of a request's token t are a pure
    function of (weights, its tokens[0..t]) and bitwise independent of which requests share the
    batch, of prefill chunking, and of retraction. Hence at temperature 0, generating N tokens equals
    generating k tokens and then continuing from prompt+those k tokens for N-k more. The price is
    throughput (no GEMM batching; prefill costs one forward per prompt token) — this engine serves
    tiny models in tests and small CPU demos; production rollouts use SGLang.

Sampling and log-probs (SGLang 0.5.23 conventions)
    temperature < 1e-6 is greedy: argmax of the raw logits, and the temperature is treated as 1
    (`sglang/srt/sampling/sampling_params.py`: `temperature = 1.0; top_k = 1`). Otherwise the
    distribution is softmax(logits / temperature), filtered by top_k, top_p, min_p and renormalized
    for sampling. The returned `output_token_logprobs` are log_softmax(logits / temperature) over the
    full vocabulary at the sampled token — temperature-scaled, before top-k/top-p filtering — which is
    SGLang's default (`sglang/srt/layers/sampler.py` `Sampler.forward`: `logits.div_(temperatures)`,
    `probs = softmax(logits)`, `logprobs = torch.log(probs)`; the raw-logit variant needs env
    `SGLANG_RETURN_ORIGINAL_LOGPROB=1`; the greedy path returns `log_softmax(logits)`). With
    temperature 1 they are the model's plain log-probs. `min_new_tokens` masks EOS/stop tokens to -inf
    before sampling (as SGLang's penalizer does), so the log-probs reflect that mask.
    `sampling_seed` seeds a per-request generator (SGLang's seeded sampler hashes positions instead,
    so seeded samples are reproducible here but not equal to SGLang's).

Memory release (CPU analogue of SGLang's memory saver + `--enable-weights-cpu-backup`)
    release("weights") writes the parameters to a private safetensors file on local disk and drops
    them from RAM; resume("weights") reads them back, so the same weights return. release needs an
    idle engine (no running requests; waiting ones are allowed while paused) as in SGLang;
    generating while weights or KV cache are released fails with `EngineStateError`.
"""
from __future__ import annotations

import itertools
import logging
import math
import shutil
import tempfile
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from megatron_rl.errors import UserError
from megatron_rl.rollout.protocol import (
    MEMORY_TAGS, FinishReason, GenerateResponse, MetaInfo, SamplingParams, UpdateWeightsResult, WeightVersionSpan,
)

log = logging.getLogger(__name__)

HEALTH_CHECK_RID_PREFIX = "HEALTH_CHECK"
RECENT_BATCHES = 2048
_MIN_LOGPROB = torch.finfo(torch.float32).min  # SGLang clamps too; JSON has no -inf


class RequestError(ValueError):
    """The request is invalid for this model (HTTP 400)."""


class EngineStateError(RuntimeError):
    """The engine cannot serve the request in its current state: memory released, shutting down (HTTP 503)."""


@dataclass
class EngineRequest:
    input_ids: list[int]
    sampling_params: SamplingParams
    return_logprob: bool = False
    rid: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class _Request:
    request: EngineRequest
    seq: int
    future: Future
    generator: torch.Generator | None
    created: float
    tokens: list[int]                       # prompt + generated so far
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)  # weight version of each output token
    cache: Any = None                        # DynamicCache holding KV of tokens[:processed]
    processed: int = 0
    num_retractions: int = 0

    @property
    def rid(self) -> str:
        return self.request.rid


@dataclass
class _Control:
    fn: Callable[[], Any]
    future: Future
    drain_barrier: int | None = None   # run only when every request older than this has finished


def sample_next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
                      banned: list[int] | None = None) -> tuple[int, float]:
    """Pick the next token from one row of float logits; return it with its log-prob (see module doc)."""
    logits = logits.float()
    if banned:
        logits = logits.clone()
        logits[banned] = float("-inf")
    if params.greedy:
        token = int(torch.argmax(logits))
        return token, max(float(torch.log_softmax(logits, dim=-1)[token]), _MIN_LOGPROB)
    logprobs = torch.log_softmax(logits / params.temperature, dim=-1)
    probs = logprobs.exp()
    keep = torch.ones_like(probs, dtype=torch.bool)
    if 1 <= params.top_k < probs.numel():
        kth = torch.topk(probs, params.top_k).values[-1]
        keep &= probs >= kth
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        drop_sorted = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) > params.top_p  # SGLang's rule
        drop = torch.zeros_like(keep)
        drop[order] = drop_sorted
        keep &= ~drop
    if params.min_p > 0.0:
        keep &= probs >= params.min_p * probs.max()
    filtered = torch.where(keep, probs, torch.zeros_like(probs))
    if not bool(filtered.sum() > 0):  # everything filtered (cannot happen with valid params): fall back
        filtered = probs
    token = int(torch.multinomial(filtered / filtered.sum(), 1, generator=generator))
    return token, max(float(logprobs[token]), _MIN_LOGPROB)


def _weight_version_spans(versions: list[str]) -> list[WeightVersionSpan]:
    spans: list[WeightVersionSpan] = []
    for index, version in enumerate(versions):
        if spans and spans[-1].version == version:
            spans[-1].end = index + 1
        else:
            spans.append(WeightVersionSpan(version=version, start=index, end=index + 1))
    return spans


def _eos_token_ids(directory: Path, config) -> set[int]:
    ids: set[int] = set()

    def add(value):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))

    add(getattr(config, "eos_token_id", None))
    generation_config = directory / "generation_config.json"
    if generation_config.is_file():
        import json

        try:
            add(json.loads(generation_config.read_text()).get("eos_token_id"))
        except (OSError, ValueError, AttributeError):
            pass
    return ids


class EmbeddedEngine:
    """A HF causal LM served by a continuous-batching scheduler thread. See the module docstring."""

    def __init__(self, model_dir: str | Path, *, load_format: str = "auto", max_running_requests: int = 8,
                 weight_version: str = "default", prefill_chunk: int = 64, random_seed: int | None = None,
                 served_model_name: str | None = None):
        if load_format not in ("auto", "dummy"):
            raise UserError(f"--load-format must be auto or dummy (got {load_format!r})")
        if max_running_requests < 1:
            raise UserError(f"--max-running-requests must be ≥ 1 (got {max_running_requests})")
        from megatron_rl.hf_checkpoint import resolve_hf_dir

        self.model_dir = resolve_hf_dir(model_dir)
        self.model_path = str(model_dir)
        self.served_model_name = served_model_name or self.model_path
        self.load_format = load_format
        self.max_running_requests = max_running_requests
        self.prefill_chunk = max(1, prefill_chunk)
        self.weight_version = weight_version
        self.model = self._load_model(self.model_dir, load_format, random_seed)
        config = self.model.config
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.context_length = getattr(config, "max_position_embeddings", None)
        self.eos_token_ids = _eos_token_ids(self.model_dir, config)
        self.tokenizer, self.tokenizer_path = self._load_tokenizer(self.model_dir)
        self._rng = torch.Generator().manual_seed(random_seed if random_seed is not None else int(time.time_ns() % 2**62))

        self._cond = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._controls: deque[_Control] = deque()
        self._active_rids: set[str] = set()
        self._seq = itertools.count()
        self._paused: str | None = None
        self._released: set[str] = set()
        self._weights_backup: Path | None = None
        self._stopping = False
        self._step_count = 0
        self._recent_batches: deque[tuple[int, list[str]]] = deque(maxlen=RECENT_BATCHES)
        self._completed = 0
        self._thread = threading.Thread(target=self._loop, name="embedded-engine-scheduler", daemon=True)

    # ------------------------------------------------------------------ loading

    @staticmethod
    def _load_model(directory: Path, load_format: str, random_seed: int | None):
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        try:
            if load_format == "dummy":
                if random_seed is not None:
                    torch.manual_seed(random_seed)
                config = AutoConfig.from_pretrained(directory)
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            else:
                model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        except (OSError, ValueError, KeyError) as error:
            raise UserError(f"cannot load a causal LM from {directory}: {error}") from None
        model.eval()
        model.requires_grad_(False)
        return model

    @staticmethod
    def _load_tokenizer(directory: Path):
        if not any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
            return None, None
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(directory), str(directory)
        except Exception as error:  # a broken tokenizer must not stop a token-id engine
            log.warning("ignoring the tokenizer in %s: %s", directory, error)
            return None, None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> EmbeddedEngine:
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        error = EngineStateError("the engine is shutting down")
        with self._cond:
            pending = list(self._waiting) + list(self._running)
            self._waiting.clear()
            self._running.clear()
            controls = list(self._controls)
            self._controls.clear()
        for request in pending:
            if not request.future.done():
                request.future.set_exception(error)
        for control in controls:
            if not control.future.done():
                control.future.set_exception(error)
        if self._weights_backup is not None:
            shutil.rmtree(self._weights_backup, ignore_errors=True)

    # ------------------------------------------------------------------ submission

    def validate(self, request: EngineRequest) -> None:
        """Raise RequestError if `request` cannot run on this model (checked before anything is queued)."""
        ids = request.input_ids
        if not ids:
            raise RequestError("input_ids: must not be empty")
        for index, token in enumerate(ids):
            if not 0 <= token < self.vocab_size:
                raise RequestError(f"input_ids[{index}]: token id {token} is out of range for vocab size {self.vocab_size}")
        params = request.sampling_params
        if self.context_length is not None:
            if len(ids) >= self.context_length:
                raise RequestError(f"input_ids: the input ({len(ids)} tokens) is longer than the model's context length ({self.context_length} tokens)")
            if len(ids) + params.max_new_tokens > self.context_length:
                raise RequestError(
                    f"sampling_params.max_new_tokens: requested token count exceeds the model's maximum context length "
                    f"of {self.context_length} tokens: {len(ids)} input tokens + {params.max_new_tokens} new tokens")
        for token in params.stop_token_ids or ():
            if not 0 <= token < self.vocab_size:
                raise RequestError(f"sampling_params.stop_token_ids: token id {token} is out of range for vocab size {self.vocab_size}")

    def submit_many(self, requests: list[EngineRequest]) -> list[Future]:
        """Queue requests atomically: all are validated first, none is queued if one is invalid."""
        for request in requests:
            self.validate(request)
        rids = [r.rid for r in requests]
        if len(set(rids)) != len(rids):
            raise RequestError("rid: duplicate request ids in one batch")
        now = time.monotonic()
        with self._cond:
            if self._stopping:
                raise EngineStateError("the engine is shutting down")
            if self._released:
                raise EngineStateError(self._released_message())
            busy = [rid for rid in rids if rid in self._active_rids]
            if busy:
                raise RequestError(f"rid: request id {busy[0]!r} is already in flight")
            futures = []
            for request in requests:
                generator = None
                seed = request.sampling_params.sampling_seed
                if seed is not None:
                    generator = torch.Generator().manual_seed(seed % 2**64)
                state = _Request(request=request, seq=next(self._seq), future=Future(), generator=generator,
                                 created=now, tokens=list(request.input_ids))
                self._waiting.append(state)
                self._active_rids.add(request.rid)
                futures.append(state.future)
            self._cond.notify_all()
        return futures

    def submit(self, request: EngineRequest) -> Future:
        return self.submit_many([request])[0]

    def generate(self, request: EngineRequest, timeout: float | None = None) -> GenerateResponse:
        """Blocking convenience for in-process use."""
        return self.submit(request).result(timeout)

    def _released_message(self) -> str:
        return (f"engine memory is released ({', '.join(sorted(self._released))}); "
                f"call /resume_memory_occupation before generating")

    # ------------------------------------------------------------------ control calls (run on the scheduler thread)

    def _control(self, fn: Callable[[], Any], drain: bool = False) -> Future:
        future: Future = Future()
        with self._cond:
            if self._stopping:
                raise EngineStateError("the engine is shutting down")
            barrier = next(self._seq) if drain else None
            self._controls.append(_Control(fn, future, barrier))
            self._cond.notify_all()
        return future

    def abort(self, rid: str = "", abort_all: bool = False) -> Future:
        return self._control(lambda: self._abort(rid, abort_all))

    def pause(self, mode: str) -> Future:
        return self._control(lambda: self._pause(mode))

    def continue_generation(self) -> Future:
        return self._control(self._continue)

    def release_memory(self, tags: list[str] | None) -> Future:
        return self._control(lambda: self._release(tags))

    def resume_memory(self, tags: list[str] | None) -> Future:
        return self._control(lambda: self._resume(tags))

    def flush_cache(self) -> Future:
        return self._control(self._flush_cache)

    def update_weights_from_disk(self, model_path: str, *, load_format: str | None = None,
                                 weight_version: str | None = None, flush_cache: bool = True,
                                 abort_all_requests: bool = False) -> Future:
        """Load HF safetensors from `model_path`. Unless paused, waits (like SGLang's writer lock) until
        every request submitted before it has finished; newer requests wait for the update."""
        def run() -> UpdateWeightsResult:
            return self._update_weights(model_path, load_format, weight_version, flush_cache, abort_all_requests)

        return self._control(run, drain=not abort_all_requests)

    @property
    def paused(self) -> str | None:
        return self._paused

    @property
    def released(self) -> set[str]:
        return set(self._released)

    def stats(self) -> dict:
        with self._cond:
            return {
                "num_running_reqs": len(self._running),
                "num_waiting_reqs": len(self._waiting),
                "running_rids": [r.rid for r in self._running],
                "waiting_rids": [r.rid for r in self._waiting],
                "running_progress": {r.rid: len(r.output_ids) for r in self._running},
                "paused": self._paused,
                "released_tags": sorted(self._released),
                "step_count": self._step_count,
                "num_completed_reqs": self._completed,
                "max_running_requests": self.max_running_requests,
                "weight_version": self.weight_version,
                "recent_batches": [{"step": step, "rids": rids} for step, rids in self._recent_batches],
            }

    def model_info(self) -> dict:
        config = self.model.config
        return {
            "model_path": self.model_path,
            "served_model_name": self.served_model_name,
            "tokenizer_path": self.tokenizer_path,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": self.weight_version,
            "load_format": self.load_format,
            "model_type": getattr(config, "model_type", None),
            "architectures": getattr(config, "architectures", None),
        }

    # ------------------------------------------------------------------ scheduler loop

    def _barrier(self) -> float:
        barriers = [c.drain_barrier for c in self._controls if c.drain_barrier is not None]
        return min(barriers) if barriers else math.inf

    def _ready_controls(self) -> list[_Control]:
        """Controls to run now, in order. A draining one (weight update) waits for its barrier unless the
        engine is paused; the draining ones behind it wait too, other controls (abort, pause) go ahead —
        as in SGLang, where pause/abort are how a caller unblocks an update waiting for running requests."""
        ready, blocked = [], []
        for control in self._controls:
            if control.drain_barrier is not None and self._paused is None and (blocked or self._running or any(
                    r.seq < control.drain_barrier for r in self._waiting)):
                blocked.append(control)
            else:
                ready.append(control)
        self._controls = deque(blocked)
        return ready

    def _has_work(self) -> bool:
        if self._paused is not None:
            return False
        if self._running:
            return True
        barrier = self._barrier()
        return any(r.seq < barrier for r in self._waiting)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        return
                    controls = self._ready_controls()
                    if controls or self._has_work():
                        break
                    self._cond.wait()
            for control in controls:
                try:
                    control.future.set_result(control.fn())
                except BaseException as error:  # the caller gets it; the scheduler keeps running
                    control.future.set_exception(error)
            if self._paused is None:
                try:
                    self._admit()
                    if self._running:
                        self._step()
                except BaseException as error:  # pragma: no cover - a bug; fail the batch, keep serving
                    log.exception("scheduler step failed")
                    for request in list(self._running):
                        self._fail(request, error)

    def _admit(self) -> None:
        admitted = []
        with self._cond:
            barrier = self._barrier()
            while (self._waiting and len(self._running) < self.max_running_requests
                   and self._waiting[0].seq < barrier):
                request = self._waiting.popleft()
                self._running.append(request)
                admitted.append(request)
        for request in admitted:
            if self._released:
                self._fail(request, EngineStateError(self._released_message()))
            elif request.request.sampling_params.max_new_tokens == 0:
                self._finish(request, {"type": "length", "length": 0})

    def _step(self) -> None:
        from transformers import DynamicCache

        with self._cond:
            self._step_count += 1
            batch = list(self._running)
            self._recent_batches.append((self._step_count, [r.rid for r in batch]))
        for request in batch:
            if request.future.done():
                continue
            params = request.request.sampling_params
            if request.cache is None:
                request.cache = DynamicCache(config=self.model.config)
                request.processed = 0
            pending = len(request.tokens) - request.processed
            logits = None
            with torch.inference_mode():
                for _ in range(min(pending, self.prefill_chunk)):
                    position = request.processed
                    output = self.model(
                        input_ids=torch.tensor([[request.tokens[position]]]),
                        position_ids=torch.tensor([[position]]),
                        past_key_values=request.cache, use_cache=True,
                    )
                    request.processed += 1
                    logits = output.logits[0, -1]
            if request.processed < len(request.tokens) or logits is None:
                continue  # still prefilling
            stop_ids = [] if params.ignore_eos else sorted(set(params.stop_token_ids or ()) | self.eos_token_ids)
            banned = stop_ids if len(request.output_ids) < params.min_new_tokens else None
            generator = request.generator if request.generator is not None else self._rng
            token, logprob = sample_next_token(logits, params, generator, banned)
            request.output_ids.append(token)
            request.logprobs.append(logprob)
            request.versions.append(self.weight_version)
            request.tokens.append(token)
            if token in stop_ids:
                self._finish(request, {"type": "stop", "matched": token})
            elif len(request.output_ids) >= params.max_new_tokens:
                self._finish(request, {"type": "length", "length": params.max_new_tokens})

    # ------------------------------------------------------------------ finishing

    def _response(self, request: _Request, finish: dict, include_prompt_tokens: bool = True) -> GenerateResponse:
        logprobs = None
        if request.request.return_logprob:
            logprobs = [(lp, token, None) for lp, token in zip(request.logprobs, request.output_ids)]
        text = None
        if self.tokenizer is not None:
            text = self.tokenizer.decode(request.output_ids, skip_special_tokens=True)
        meta = MetaInfo(
            id=request.rid, finish_reason=FinishReason(**finish),
            prompt_tokens=len(request.request.input_ids) if include_prompt_tokens else None,
            completion_tokens=len(request.output_ids), cached_tokens=0,
            weight_version=self.weight_version, weight_versions=_weight_version_spans(request.versions),
            e2e_latency=time.monotonic() - request.created, output_token_logprobs=logprobs,
        )
        return GenerateResponse(text=text, output_ids=list(request.output_ids), meta_info=meta)

    def _remove(self, request: _Request) -> None:
        with self._cond:
            if request in self._running:
                self._running.remove(request)
            elif request in self._waiting:
                self._waiting.remove(request)
            self._active_rids.discard(request.rid)
            self._completed += 1
        request.cache = None

    def _finish(self, request: _Request, finish: dict, include_prompt_tokens: bool = True) -> None:
        self._remove(request)
        if not request.future.done():
            request.future.set_result(self._response(request, finish, include_prompt_tokens))

    def _fail(self, request: _Request, error: BaseException) -> None:
        self._remove(request)
        if not request.future.done():
            request.future.set_exception(error)

    # ------------------------------------------------------------------ control implementations

    def _abort(self, rid: str, abort_all: bool) -> int:
        with self._cond:
            if abort_all:
                running, waiting = list(self._running), list(self._waiting)
            elif rid and rid in self._active_rids:  # SGLang: the exact rid must exist, then prefix match
                running = [r for r in self._running if r.rid.startswith(rid)]
                waiting = [r for r in self._waiting if r.rid.startswith(rid)]
            else:
                running, waiting = [], []
        for request in running:
            self._finish(request, {"type": "abort", "message": "Aborted", "status_code": None, "err_type": None})
        for request in waiting:
            self._finish(request, {"type": "abort", "message": "Abort in waiting queue"}, include_prompt_tokens=False)
        return len(running) + len(waiting)

    def _pause(self, mode: str) -> None:
        if mode == "abort":
            self._abort("", abort_all=True)
        elif mode == "retract":
            with self._cond:
                retracted = list(self._running)
                self._running.clear()
                for request in reversed(retracted):
                    request.cache = None
                    request.processed = 0
                    request.num_retractions += 1
                    self._waiting.appendleft(request)
        elif mode != "in_place":
            raise RequestError(f"mode: unsupported pause mode {mode!r}; use abort, retract or in_place")
        self._paused = mode

    def _continue(self) -> None:
        self._paused = None

    def _flush_cache(self) -> bool:
        """No prefix cache here: succeeds when idle (SGLang: waiting requests are ignored while paused)."""
        return not self._running and (self._paused is not None or not self._waiting)

    @staticmethod
    def _tags(tags: list[str] | None) -> list[str]:
        if not tags:
            return list(MEMORY_TAGS)
        unknown = [t for t in tags if t not in MEMORY_TAGS]
        if unknown:
            raise RequestError(f"tags: unknown memory tag {unknown[0]!r}; use {', '.join(MEMORY_TAGS)}")
        return list(dict.fromkeys(tags))

    def _release(self, tags: list[str] | None) -> None:
        tags = self._tags(tags)
        if self._running:
            raise EngineStateError(
                f"release_memory_occupation needs an idle engine, but {len(self._running)} request(s) are running; "
                f"abort them or pause_generation(mode='abort' or 'retract') first")
        if "weights" in tags and "weights" not in self._released:
            backup = Path(tempfile.mkdtemp(prefix="megatron-rl-engine-weights-"))
            from safetensors.torch import save_file

            parameters = dict(self.model.named_parameters())
            save_file({name: p.detach().contiguous() for name, p in parameters.items()}, str(backup / "weights.safetensors"))
            for parameter in parameters.values():
                parameter.data = torch.empty(0, dtype=parameter.dtype)
            self._weights_backup = backup
        if "kv_cache" in tags:
            for request in self._waiting:  # retracted requests: their KV is recomputed on admission
                request.cache = None
                request.processed = 0
        with self._cond:
            self._released.update(tags)

    def _resume(self, tags: list[str] | None) -> None:
        tags = self._tags(tags)
        missing = [t for t in tags if t not in self._released]
        if missing:
            raise RequestError(f"tags: {missing[0]!r} is not released (released: {sorted(self._released) or 'none'})")
        if "weights" in tags:
            from safetensors.torch import load_file

            assert self._weights_backup is not None
            saved = load_file(str(self._weights_backup / "weights.safetensors"))
            for name, parameter in self.model.named_parameters():
                parameter.data = saved[name]
            shutil.rmtree(self._weights_backup, ignore_errors=True)
            self._weights_backup = None
        with self._cond:
            self._released.difference_update(tags)

    def _read_checkpoint(self, model_path: str, load_format: str | None) -> dict[str, torch.Tensor]:
        """All tensors of `model_path`, checked against the model's names and shapes (raises ValueError)."""
        from megatron_rl.hf_checkpoint import SafetensorsReader, resolve_hf_dir

        if load_format not in (None, "auto", "safetensors"):
            raise ValueError(f"load_format {load_format!r} is not supported by the embedded engine (use auto)")
        try:
            directory = resolve_hf_dir(model_path)
            reader = SafetensorsReader(directory)
        except UserError as error:
            raise ValueError(str(error)) from None
        parameters = dict(self.model.named_parameters())
        known = set(self.model.state_dict().keys())  # includes tied aliases such as lm_head.weight
        names = set(reader.names())
        missing = sorted(set(parameters) - names)
        unexpected = sorted(names - known)
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} tensor(s) ({', '.join(missing[:5])})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected tensor(s) ({', '.join(unexpected[:5])})")
            raise ValueError(f"{directory}: tensor names do not match the served model: {'; '.join(parts)}")
        tensors = {}
        for name, parameter in parameters.items():
            try:
                tensor = reader.get(name)
            except UserError as error:
                raise ValueError(str(error)) from None
            if tuple(tensor.shape) != tuple(parameter.shape):
                raise ValueError(f"{directory}: tensor {name} has shape {tuple(tensor.shape)}, "
                                 f"the served model expects {tuple(parameter.shape)}")
            tensors[name] = tensor.to(parameter.dtype)
        return tensors

    def _update_weights(self, model_path: str, load_format: str | None, weight_version: str | None,
                        flush_cache: bool, abort_all_requests: bool) -> UpdateWeightsResult:
        if abort_all_requests:
            self._abort("", abort_all=True)
        if "weights" in self._released:
            return UpdateWeightsResult(success=False, message="Failed to update weights: the weights are released; "
                                       "call /resume_memory_occupation with tags ['weights'] first")
        try:
            tensors = self._read_checkpoint(model_path, load_format)  # all read before any is copied
        except Exception as error:
            return UpdateWeightsResult(success=False, message=f"Failed to update weights: {error}. "
                                       f"The previous weights are kept.")
        with torch.no_grad():
            for name, parameter in self.model.named_parameters():
                parameter.copy_(tensors[name])
        self.model_path = str(model_path)
        if weight_version is not None:
            self.weight_version = weight_version
        paused = len(self._running) + len(self._waiting) if self._paused else 0
        if flush_cache and self._running:
            return UpdateWeightsResult(
                success=False, num_paused_requests=paused,
                message="Weights were updated, but the cache was not flushed because requests are still running "
                        "or queued. Retract or finish them, then call /flush_cache.")
        return UpdateWeightsResult(success=True, message="Succeeded to update model weights.", num_paused_requests=paused)
