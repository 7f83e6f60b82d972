"""The embedded engine: a HF causal LM (torch + transformers, CPU) behind a continuous-batching scheduler.

No HTTP here (`embedded_server.py` puts SGLang's native API in front of it). All model work runs on one
scheduler thread; other threads talk to it through `submit` (generation) and control calls, which are
executed by the scheduler between steps and answered through `concurrent.futures.Future`s.

Scheduling (continuous batching, both modes)
    Requests wait in a FIFO queue; before every step the scheduler admits waiting requests into the
    running batch (bounded by `max_running_requests` and `max_total_tokens`), steps the running
    requests, and removes the ones that finished. A request that arrives while others run joins at the
    next step; a finished one leaves at the end of its step, so nobody waits for a whole batch. A step
    gives a request at most one new token. `stats()` exposes the last steps' batch compositions
    (`recent_batches`: step number and the rids whose tokens went through the model in that step).

Batched mode (the default)
    Each step runs one forward for all running requests that are decoding (one token each) on one
    batched KV cache (`kv_batch.KVBatch`: rows share a column axis, shorter rows are left-padded with
    masked holes, positions are passed per row). Newly admitted requests are prefilled packed into one
    row without padding (`kv_batch.PackedPrefill`), in a second forward of at most
    `chunked_prefill_size` tokens per step, so a long prompt stalls the decoding requests by one bounded
    forward per step. A request samples its first token and joins the decode batch in the step that
    processes the end of its prompt; requests admitted while a packed group is being prefilled form
    the next group. A finished or aborted request's row is removed at the end of the step
    (index-select on the batch dim; leading columns that are holes in every row are cut).
    Guarantee: the logits of each token equal a 1-row forward over the request's tokens up to float
    rounding (~1e-6 on the tiny test models), so greedy outputs equal deterministic mode's and
    transformers' `generate` except at exact near-ties, and log-probs agree to ~1e-5. They are not
    bitwise independent of the batch: GEMM blocking and the attention reduction order depend on which
    rows and columns are present. The same requests submitted the same way give the same bits.

Deterministic mode (`enable_deterministic_inference`, SGLang's `--enable-deterministic-inference`)
    Every token of every request goes through the model as its own forward (one token, its own
    `DynamicCache`), for prompt and generated tokens alike; a step advances a prefilling request by up
    to `chunked_prefill_size` prompt tokens. On CPU, batched GEMMs are not row-invariant: a row's result
    changes bitwise with the number of rows (gemv for one row, differently blocked gemm for 2..15
    rows), and padded attention changes its reduction order. So instead of batching arithmetic, this
    mode batches *requests*: the logits of a request's token t are a pure function of (weights, its
    tokens[0..t]) and bitwise independent of which requests share the batch, of prefill chunking, and
    of retraction. Hence at temperature 0, generating N tokens equals generating k tokens and then
    continuing from prompt+those k tokens for N-k more. The price is throughput (no GEMM batching;
    prefill costs one forward per prompt token): SmolLM2-135M on 2 cores decodes about 10 tok/s in all,
    against 120-170 tok/s in batched mode at 32-64 requests (benchmarks/RESULTS.md).

KV memory bound (`max_total_tokens`, SGLang's `--max-total-tokens`)
    A request is admitted only while the KV of the running requests, each counted at its worst case
    (its tokens so far + the new tokens it may still generate), stays within `max_total_tokens` slots:
    in batched mode rows × the longest row (the holes of shorter rows are allocated too), in
    deterministic mode their sum. So the cache never outgrows the bound and nothing is retracted for
    memory. A request that could not fit alone is rejected (HTTP 400). Default: a quarter of the
    machine's RAM divided by the model's KV bytes per token.

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
    Prompt log-probs (`logprob_start_len` k ≥ 0 with `return_logprob`; -1, the default, means none):
    `input_token_logprobs` has an entry per prompt token from position k on, the first with logprob
    null, the others log_softmax(logits) of the position before at the prompt token — from the raw
    logits, not temperature-scaled: SGLang 0.5.23 computes input log-probs in its logits processor
    (`layers/logprob_processor.py`, plain log_softmax), and only the sampler scales by temperature. So
    at temperature 1 prompt and output log-probs are the same function of the logits. k greater than
    the prompt length is rejected (SGLang aborts such a request with 400). They are computed once, in
    the request's (first) prefill: in batched mode the packed prefill keeps the logits of those prompt
    positions, for the requests that ask, besides the last position of every request.
    A sampled token is drawn by inverting the CDF of the filtered distribution at one uniform number
    from the request's generator. `sampling_seed` seeds a per-request generator, so a seeded request
    draws the same numbers in either mode and whatever shares its batch (SGLang's seeded sampler
    hashes positions instead, so seeded samples are reproducible here but not equal to SGLang's).

Memory release (CPU analogue of SGLang's memory saver + `--enable-weights-cpu-backup`)
    release("weights") writes the parameters to a private safetensors file on local disk and drops
    them from RAM; resume("weights") reads them back, so the same weights return. release needs an
    idle engine (no running requests; waiting ones are allowed while paused) as in SGLang;
    generating while weights or KV cache are released fails with `EngineStateError`. KV exists only
    for running requests (the batch cache is dropped when the last one leaves, retracted requests keep
    none), so an idle engine holds none; `stats()["kv_cache_tokens"]` shows what is held.

Weight updates (SGLang 0.5.23's rules, sglang-api.md §1.7-§1.10)
    From disk (`update_weights_from_disk`), from tensors shared by handle (`update_weights_from_tensor`,
    the payloads decoded by `weight_transport.py`), and by broadcast in a process group the trainer
    hosts (`init_weights_update_group`, `update_weights_from_distributed`; gloo here, rank
    `rank_offset`). Tensor and distributed updates must run inside a session opened by
    `begin_weight_update` and closed by `end_weight_update`, else they fail with SGLang's message.
    Each update, session calls included, runs on the scheduler thread once the requests submitted
    before it have finished (SGLang's writer lock), at once when paused. Names are HF names; a call's
    tensors are all checked (names, shapes) before any is copied, so a refused call changes nothing.
    A distributed update receives before it checks, so the trainer's broadcast always completes. On
    success `weight_version` (when given) becomes the version reported; with `flush_cache` (the
    default) a call made while requests still run fails after loading, as in SGLang. Group joins run
    on a thread of their own (they block until the trainer joins); receives block the scheduler.
"""
from __future__ import annotations

import itertools
import logging
import math
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch

from megatron_rl.errors import UserError
from megatron_rl.rollout.kv_batch import KVBatch, PackedPrefill, check_supported
from megatron_rl.rollout.protocol import (
    MEMORY_TAGS, FinishReason, GenerateResponse, MetaInfo, SamplingParams, UpdateWeightsResult,
    WeightControlResult, WeightVersionSpan,
)
from megatron_rl.rollout.weight_transport import join_weights_update_group, leave_weights_update_group, receive_broadcast

log = logging.getLogger(__name__)

HEALTH_CHECK_RID_PREFIX = "HEALTH_CHECK"
RECENT_BATCHES = 2048
DEFAULT_CHUNKED_PREFILL_SIZE = {False: 512, True: 64}  # by enable_deterministic_inference (see __init__)
KV_MEMORY_FRACTION = 0.25  # of physical RAM, for the default max_total_tokens
_MIN_LOGPROB = torch.finfo(torch.float32).min  # SGLang clamps too; JSON has no -inf
WEIGHTS_GROUP_TIMEOUT = timedelta(minutes=10)  # joins and broadcasts of a weight-update group
SESSION_REQUIRED = "{} must run between begin_weight_update() and end_weight_update()"  # SGLang's message


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
    logprob_start_len: int = -1  # ≥ 0 (with return_logprob): prompt log-probs from this position on

    @property
    def wants_input_logprobs(self) -> bool:
        return self.return_logprob and self.logprob_start_len >= 0


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
    input_logprobs: list[float] = field(default_factory=list)  # of prompt tokens logprob_start_len+1, ...
    cache: Any = None                        # deterministic mode: DynamicCache holding KV of tokens[:processed]
    processed: int = 0
    num_retractions: int = 0

    @property
    def rid(self) -> str:
        return self.request.rid

    def missing_input_logprob_positions(self) -> range:
        """Prompt positions whose next-token log-prob is wanted and not computed yet (position p scores
        prompt token p+1; they are computed in order, so what is missing is a tail)."""
        if not self.request.wants_input_logprobs:
            return range(0)
        start = self.request.logprob_start_len
        return range(start + len(self.input_logprobs), len(self.request.input_ids) - 1)

    @property
    def final_length(self) -> int:
        """Tokens this request's KV may reach: its prompt plus every token it may generate."""
        return len(self.request.input_ids) + self.request.sampling_params.max_new_tokens


@dataclass
class _Control:
    fn: Callable[[], Any]
    future: Future
    drain_barrier: int | None = None   # run only when every request older than this has finished


def _filtered(probs: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """One row's probabilities with top_k, top_p and min_p applied (not renormalized)."""
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
    return filtered if bool(filtered.sum() > 0) else probs  # all filtered cannot happen with valid params


def sample_tokens(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator],
                  banned: list[list[int] | None]) -> list[tuple[int, float]]:
    """The next token of each row of logits [rows, vocab] with its log-prob (see the module doc).

    Row-wise work is done for all rows at once (one log_softmax, one cumsum), so a decode step of many
    requests costs a few tensor ops rather than a few per request. A sampled row draws one uniform
    number from its own generator and takes the inverse of its distribution's CDF.
    """
    logits = logits.float()
    if any(banned):
        logits = logits.clone()
        for row, ids in enumerate(banned):
            if ids:
                logits[row, ids] = float("-inf")
    temperatures = [1.0 if p.greedy else p.temperature for p in params]
    scaled = logits if all(t == 1.0 for t in temperatures) else logits / torch.tensor(temperatures).unsqueeze(1)
    logprobs = torch.log_softmax(scaled, dim=-1)
    tokens = torch.empty(len(params), dtype=torch.long)
    greedy = [row for row, p in enumerate(params) if p.greedy]
    if greedy:
        tokens[greedy] = torch.argmax(logits[greedy], dim=-1)
    sampled = [row for row, p in enumerate(params) if not p.greedy]
    if sampled:
        probs = logprobs[sampled].exp()
        for index, row in enumerate(sampled):
            p = params[row]
            if 1 <= p.top_k < probs.shape[1] or p.top_p < 1.0 or p.min_p > 0.0:
                probs[index] = _filtered(probs[index], p)
        # float32 is enough: each token's share of the CDF is off by at most one rounding of the running
        # sum (~6e-8); the drift of the sum is a common scale, undone by scaling the draw by the total
        cdf = torch.cumsum(probs, dim=-1)
        uniform = torch.cat([torch.rand(1, generator=generators[row]) for row in sampled])
        drawn = torch.searchsorted(cdf, (uniform * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
        tokens[sampled] = drawn.clamp_(max=probs.shape[1] - 1)
    chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1).clamp_(min=_MIN_LOGPROB)
    return list(zip(tokens.tolist(), chosen.tolist()))


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
                 weight_version: str = "default", enable_deterministic_inference: bool = False,
                 chunked_prefill_size: int | None = None, max_total_tokens: int | None = None,
                 random_seed: int | None = None, served_model_name: str | None = None):
        """`enable_deterministic_inference`: the per-request 1-row path (see the module docstring).
        `chunked_prefill_size`: prompt tokens per prefill forward in batched mode (default 512), per
        request and step in deterministic mode (default 64); -1: no bound. `max_total_tokens`: KV slots
        (default: from RAM, see the module docstring)."""
        if load_format not in ("auto", "dummy"):
            raise UserError(f"--load-format must be auto or dummy (got {load_format!r})")
        if max_running_requests < 1:
            raise UserError(f"--max-running-requests must be ≥ 1 (got {max_running_requests})")
        if chunked_prefill_size is not None and chunked_prefill_size != -1 and chunked_prefill_size < 1:
            raise UserError(f"--chunked-prefill-size must be ≥ 1, or -1 for no chunking (got {chunked_prefill_size})")
        if max_total_tokens is not None and max_total_tokens < 1:
            raise UserError(f"--max-total-tokens must be ≥ 1 (got {max_total_tokens})")
        from megatron_rl.hf_checkpoint import resolve_hf_dir

        self.model_dir = resolve_hf_dir(model_dir)
        self.model_path = str(model_dir)
        self.served_model_name = served_model_name or self.model_path
        self.load_format = load_format
        self.max_running_requests = max_running_requests
        self.deterministic = enable_deterministic_inference
        if chunked_prefill_size is None:
            chunked_prefill_size = DEFAULT_CHUNKED_PREFILL_SIZE[self.deterministic]
        self.chunked_prefill_size = chunked_prefill_size
        self._prefill_bound: int | None = None if chunked_prefill_size == -1 else chunked_prefill_size
        self.weight_version = weight_version
        self.model = self._load_model(self.model_dir, load_format, random_seed)
        config = self.model.config
        if not self.deterministic and (reason := check_supported(config)):
            raise UserError(f"the embedded engine's batched mode cannot serve {self.model_dir}: {reason}; "
                            f"serve it with --enable-deterministic-inference")
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.context_length = getattr(config, "max_position_embeddings", None)
        self.max_total_tokens = max_total_tokens or self._default_max_total_tokens()
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
        self._weight_update_session = False  # begin_weight_update ... end_weight_update
        self._weight_groups: dict[str, Any] = {}  # group name → process group (None while being joined)
        self._weight_groups_lock = threading.Lock()
        self._join_lock = threading.Lock()  # one group construction at a time (torch's group registry is global)
        self._stopping = False
        self._step_count = 0
        self._recent_batches: deque[tuple[int, list[str]]] = deque(maxlen=RECENT_BATCHES)
        self._completed = 0
        # batched mode: the decode batch (row i is _batch_rows[i]) and the packed group being prefilled
        self._batch: KVBatch | None = None
        self._batch_rows: list[_Request] = []
        self._prefill: PackedPrefill | None = None
        self._prefill_rows: list[_Request] = []
        # KV token slots in use, for stats(): batched mode counts rows × width of the batch cache (holes
        # included) + the packed prefill's tokens; deterministic mode the tokens in the requests' caches
        self._kv_tokens = 0
        self._thread = threading.Thread(target=self._loop, name="embedded-engine-scheduler", daemon=True)

    # ------------------------------------------------------------------ loading

    def _default_max_total_tokens(self) -> int:
        config = self.model.config.get_text_config(decoder=True)
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        bytes_per_token = 2 * config.num_hidden_layers * kv_heads * head_dim * 4  # keys + values, fp32
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return max(1, int(ram * KV_MEMORY_FRACTION) // bytes_per_token)

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
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
            else:
                model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="sdpa")
        except (OSError, ValueError, KeyError) as error:
            raise UserError(f"cannot load a causal LM from {directory}: {error}") from None
        model.eval()
        model.requires_grad_(False)
        # Own, 64-byte aligned memory for every weight: from_pretrained can leave them at other offsets
        # (8 and 40 bytes mod 64 seen), and 1-row CPU GEMMs change in the last bits with the alignment, so
        # a release/resume (which reallocates) would not give back the same bits otherwise.
        for parameter in model.parameters():
            parameter.data = parameter.data.clone()
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
        with self._weight_groups_lock:
            groups = [group for group in self._weight_groups.values() if group is not None]
            self._weight_groups.clear()
        for group in groups:
            leave_weights_update_group(group)

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
        if request.logprob_start_len < -1:
            raise RequestError(f"logprob_start_len: must be -1 (output log-probs only) or a prompt position ≥ 0, "
                               f"got {request.logprob_start_len}")
        if request.return_logprob and request.logprob_start_len > len(ids):
            raise RequestError(f"logprob_start_len: {request.logprob_start_len} is higher than the number of input "
                               f"tokens ({len(ids)}); use a smaller logprob_start_len")
        for token in params.stop_token_ids or ():
            if not 0 <= token < self.vocab_size:
                raise RequestError(f"sampling_params.stop_token_ids: token id {token} is out of range for vocab size {self.vocab_size}")
        if len(ids) + params.max_new_tokens > self.max_total_tokens:
            raise RequestError(
                f"sampling_params.max_new_tokens: {len(ids)} input tokens + {params.max_new_tokens} new tokens exceed "
                f"the engine's KV bound of {self.max_total_tokens} tokens (--max-total-tokens)")

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

    def begin_weight_update(self) -> Future:
        """Open the session tensor and distributed updates need (fails if one is open); waits like an update."""
        return self._control(self._begin_weight_update, drain=True)

    def end_weight_update(self) -> Future:
        return self._control(self._end_weight_update, drain=True)

    def update_weights_from_tensor(self, named_tensors: list[tuple[str, torch.Tensor]], *,
                                   weight_version: str | None = None, flush_cache: bool = True,
                                   abort_all_requests: bool = False) -> Future:
        """Copy (HF name, tensor) pairs into the weights, inside a session. The tensors may be views of
        another process's shared memory: they are read before the future resolves, never after."""
        def run() -> WeightControlResult:
            return self._update_weights_from_tensor(named_tensors, weight_version, flush_cache, abort_all_requests)

        return self._control(run, drain=not abort_all_requests)

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str, backend: str) -> WeightControlResult:
        """Join a broadcast group as rank `rank_offset` (TP size 1). Blocking until every rank joined: call
        it from a thread of its own, not the scheduler's (generation goes on meanwhile)."""
        failed = "Failed to initialize custom process group: "
        if backend != "gloo":
            return WeightControlResult(success=False, message=f"{failed}backend {backend!r} is not available: the "
                                       f"embedded engine runs on CPU and joins weight-update groups with backend 'gloo'.")
        if rank_offset >= world_size:
            return WeightControlResult(success=False, message=f"{failed}rank_offset {rank_offset} leaves no rank for "
                                       f"this engine in a group of world_size {world_size}; the embedded engine has TP "
                                       f"size 1, so world_size must be at least rank_offset + 1.")
        with self._weight_groups_lock:
            if group_name in self._weight_groups:
                return WeightControlResult(success=False, message=f"{failed}a group named {group_name!r} already "
                                           f"exists; destroy it first.")
            self._weight_groups[group_name] = None
        try:
            with self._join_lock:
                group = join_weights_update_group(master_address, master_port, rank_offset, world_size, group_name,
                                                  backend, WEIGHTS_GROUP_TIMEOUT)
        except Exception as error:
            with self._weight_groups_lock:
                del self._weight_groups[group_name]
            return WeightControlResult(success=False, message=f"{failed}{error}.")
        with self._weight_groups_lock:
            self._weight_groups[group_name] = group
        return WeightControlResult(success=True, message="Succeeded to initialize custom process group.")

    def update_weights_from_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]], *,
                                        group_name: str, load_format: str | None = None,
                                        weight_version: str | None = None, flush_cache: bool = True,
                                        abort_all_requests: bool = False) -> Future:
        """Receive tensors broadcast from rank 0 of `group_name` (in `names` order) and load them, inside a session."""
        def run() -> WeightControlResult:
            return self._update_weights_from_distributed(names, dtypes, shapes, group_name, load_format,
                                                         weight_version, flush_cache, abort_all_requests)

        return self._control(run, drain=not abort_all_requests)

    def destroy_weights_update_group(self, group_name: str) -> Future:
        return self._control(lambda: self._destroy_weights_update_group(group_name))

    def update_weight_version(self, new_version: str, abort_all_requests: bool = True) -> Future:
        """Set the reported weight version (SGLang aborts every request first by default)."""
        return self._control(lambda: self._update_weight_version(new_version, abort_all_requests))

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
                "max_total_tokens": self.max_total_tokens,
                "kv_cache_tokens": self._kv_tokens,
                "enable_deterministic_inference": self.deterministic,
                "weight_version": self.weight_version,
                "weight_update_session": self._weight_update_session,
                "weight_update_groups": sorted(self._weight_groups),
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
                    result = control.fn()
                    self._compact()  # free the KV of requests it aborted before its caller hears back
                    control.future.set_result(result)
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
                    self._drop_kv()

    def _kv_reservation(self, requests: list[_Request]) -> int:
        """KV slots these requests may need at most together (see "KV memory bound" in the module doc)."""
        if not requests:
            return 0
        if self.deterministic:
            return sum(r.final_length for r in requests)
        return len(requests) * max(r.final_length for r in requests)

    def _admit(self) -> None:
        admitted = []
        with self._cond:
            barrier = self._barrier()
            while (self._waiting and len(self._running) < self.max_running_requests
                   and self._waiting[0].seq < barrier
                   and self._kv_reservation(self._running + [self._waiting[0]]) <= self.max_total_tokens):
                request = self._waiting.popleft()
                self._running.append(request)
                admitted.append(request)
        for request in admitted:
            if self._released:
                self._fail(request, EngineStateError(self._released_message()))
            elif request.request.sampling_params.max_new_tokens == 0 and not request.missing_input_logprob_positions():
                self._finish(request, {"type": "length", "length": 0})  # nothing to compute

    def _step(self) -> None:
        if self.deterministic:
            stepped = [r for r in self._running if not r.future.done()]
        else:
            stepped = self._plan_batched()
        with self._cond:  # recorded before the forwards: a caller woken by its result sees its last step
            self._step_count += 1
            self._recent_batches.append((self._step_count, [r.rid for r in stepped]))
        with torch.inference_mode():
            if self.deterministic:
                self._step_deterministic(stepped)
            else:
                self._step_batched()
        self._compact()

    def _step_deterministic(self, batch: list[_Request]) -> None:
        """Each request advances alone: up to chunked_prefill_size prompt tokens or one decode token, one
        forward per token on its own cache."""
        from transformers import DynamicCache

        for request in batch:
            if request.cache is None:
                request.cache = DynamicCache(config=self.model.config)
                request.processed = 0
            pending = len(request.tokens) - request.processed
            logits = None
            for _ in range(min(pending, self._prefill_bound or pending)):
                position = request.processed
                output = self.model(
                    input_ids=torch.tensor([[request.tokens[position]]]),
                    position_ids=torch.tensor([[position]]),
                    past_key_values=request.cache, use_cache=True,
                )
                request.processed += 1
                logits = output.logits[0, -1]
                missing = request.missing_input_logprob_positions()
                if missing and position == missing.start:
                    logprob = torch.log_softmax(logits.float(), dim=-1)[request.tokens[position + 1]]
                    request.input_logprobs.append(float(logprob.clamp(min=_MIN_LOGPROB)))
            if request.processed == len(request.tokens) and logits is not None:
                self._accept([request], logits.unsqueeze(0))

    def _plan_batched(self) -> list[_Request]:
        """Start a packed prefill group of the admitted requests not prefilled yet, unless one is in
        progress; return the requests this step computes (the decode batch and the next chunk's)."""
        if self._prefill is None:
            decoding = set(map(id, self._batch_rows))
            pending = [r for r in self._running if id(r) not in decoding and not r.future.done()]
            if pending:
                self._prefill = PackedPrefill(self.model, [r.tokens for r in pending],
                                              [r.missing_input_logprob_positions() for r in pending])
                self._prefill_rows = pending
        stepped = list(self._batch_rows)
        if self._prefill is not None:
            stepped += [self._prefill_rows[i] for i in self._prefill.next_chunk(self._prefill_bound)
                        if not self._prefill_rows[i].future.done()]
        return stepped

    def _step_batched(self) -> None:
        """One forward decodes every request of the decode batch; one forward prefills the next chunk of the
        packed group, after which the requests whose prompts ended in it sample their first token and join
        the decode batch."""
        decoding = list(self._batch_rows)
        if decoding:
            logits = self._batch.decode(self.model, [r.tokens[-1] for r in decoding])
            for request in decoding:
                request.processed += 1
            self._accept(decoding, logits)
        if self._prefill is None:
            return
        prefill, group = self._prefill, self._prefill_rows
        ended, scored = prefill.forward_chunk(self.model, self._prefill_bound)
        for segment, logprobs in scored.items():
            group[segment].input_logprobs.extend(logprobs.tolist())
        for segment in ended:
            group[segment].processed = len(group[segment].tokens)
        live = [segment for segment in ended if not group[segment].future.done()]
        if live:
            self._accept([group[segment] for segment in live], torch.stack([ended[segment] for segment in live]))
        joining = [segment for segment in ended if not group[segment].future.done()]
        if joining:
            self._batch = KVBatch.concat(self._batch, prefill.to_batch(joining))
            self._batch_rows += [group[segment] for segment in joining]
        if prefill.finished:
            self._prefill, self._prefill_rows = None, []

    def _compact(self) -> None:
        """Drop the KV of requests that left (finished, aborted, failed) and count what is held."""
        if self.deterministic:
            self._kv_tokens = sum(r.processed for r in self._running if r.cache is not None)
            return
        keep = [i for i, r in enumerate(self._batch_rows) if not r.future.done()]
        if len(keep) < len(self._batch_rows):
            self._batch = self._batch.select(keep)
            self._batch_rows = [self._batch_rows[i] for i in keep]
        if self._prefill is not None and all(self._prefill_rows[s].future.done() for s in self._prefill.unfinished()):
            self._prefill, self._prefill_rows = None, []
        self._kv_tokens = (self._batch.slots() if self._batch is not None else 0) + \
                          (self._prefill.slots() if self._prefill is not None else 0)

    def _drop_kv(self) -> None:
        """Forget every request's KV (retraction, release); their tokens are kept and prefilled again on admission."""
        with self._cond:
            requests = self._running + list(self._waiting)
        for request in requests:
            request.cache = None
            request.processed = 0
        self._batch, self._batch_rows = None, []
        self._prefill, self._prefill_rows = None, []
        self._kv_tokens = 0

    def _accept(self, requests: list[_Request], logits: torch.Tensor) -> None:
        """Sample each request's next token from its row of logits, record it, and finish the requests that stop."""
        prefill_only = [row for row, r in enumerate(requests) if r.request.sampling_params.max_new_tokens == 0]
        if prefill_only:  # prompt log-probs only (SGLang's prefill-only requests): done, nothing sampled
            for row in prefill_only:
                self._finish(requests[row], {"type": "length", "length": 0})
            keep = [row for row in range(len(requests)) if row not in prefill_only]
            requests, logits = [requests[row] for row in keep], logits[keep]
            if not requests:
                return
        stop_ids, banned = [], []
        for request in requests:
            params = request.request.sampling_params
            stops = [] if params.ignore_eos else sorted(set(params.stop_token_ids or ()) | self.eos_token_ids)
            stop_ids.append(stops)
            banned.append(stops if len(request.output_ids) < params.min_new_tokens else None)
        samples = sample_tokens(logits, [r.request.sampling_params for r in requests],
                                [r.generator if r.generator is not None else self._rng for r in requests], banned)
        for request, stops, (token, logprob) in zip(requests, stop_ids, samples):
            request.output_ids.append(token)
            request.logprobs.append(logprob)
            request.versions.append(self.weight_version)
            request.tokens.append(token)
            limit = request.request.sampling_params.max_new_tokens
            if token in stops:
                self._finish(request, {"type": "stop", "matched": token})
            elif len(request.output_ids) >= limit:
                self._finish(request, {"type": "length", "length": limit})

    # ------------------------------------------------------------------ finishing

    def _response(self, request: _Request, finish: dict, include_prompt_tokens: bool = True) -> GenerateResponse:
        logprobs = input_logprobs = None
        if request.request.return_logprob:
            logprobs = [(lp, token, None) for lp, token in zip(request.logprobs, request.output_ids)]
        if request.request.wants_input_logprobs and not request.missing_input_logprob_positions():
            scored = request.request.input_ids[request.request.logprob_start_len:]
            input_logprobs = [(lp, token, None) for lp, token in zip([None, *request.input_logprobs], scored)]
        text = None
        if self.tokenizer is not None:
            text = self.tokenizer.decode(request.output_ids, skip_special_tokens=True)
        meta = MetaInfo(
            id=request.rid, finish_reason=FinishReason(**finish),
            prompt_tokens=len(request.request.input_ids) if include_prompt_tokens else None,
            completion_tokens=len(request.output_ids), cached_tokens=0,
            weight_version=self.weight_version, weight_versions=_weight_version_spans(request.versions),
            e2e_latency=time.monotonic() - request.created, output_token_logprobs=logprobs,
            input_token_logprobs=input_logprobs,
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
        request.cache = None  # deterministic mode; batched mode drops the row in _compact

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
            self._drop_kv()
            with self._cond:
                retracted = list(self._running)
                self._running.clear()
                for request in reversed(retracted):
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
            self._drop_kv()  # idle: nothing is running; retracted requests recompute their KV on admission
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
                parameter.data = saved[name].clone()  # aligned, as at load (see _load_model)
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
        parameters = dict(self.model.named_parameters())
        self._copy_weights([(name, tensors[name]) for name in parameters], parameters)
        self.model_path = str(model_path)
        paused = len(self._running) + len(self._waiting) if self._paused else 0
        result = self._loaded("Succeeded to update model weights.", weight_version, flush_cache)
        return UpdateWeightsResult(success=result.success, message=result.message, num_paused_requests=paused)

    # A refused session call or update answers success=false (HTTP 400), with SGLang's message where it has one.

    @staticmethod
    def _refused(message: str) -> WeightControlResult:
        return WeightControlResult(success=False, message=message)

    def _weights_released(self) -> WeightControlResult | None:
        if "weights" in self._released:
            return self._refused("Failed to update weights: the weights are released; call /resume_memory_occupation "
                                 "with tags ['weights'] first")
        return None

    def _weight_targets(self, named_tensors: list[tuple[str, torch.Tensor]]) -> dict[str, torch.nn.Parameter]:
        """The parameter each tensor goes into (tied aliases such as lm_head.weight included); ValueError
        naming the first tensor whose name or shape does not match the served model."""
        parameters = dict(self.model.named_parameters(remove_duplicate=False))
        for name, tensor in named_tensors:
            parameter = parameters.get(name)
            if parameter is None:
                raise ValueError(f"tensor {name!r} is not a weight of the served model (HF names, such as "
                                 f"{next(iter(parameters))!r}, are expected)")
            if tuple(tensor.shape) != tuple(parameter.shape):
                raise ValueError(f"tensor {name} has shape {tuple(tensor.shape)}, the served model expects "
                                 f"{tuple(parameter.shape)}")
        return parameters

    @torch.no_grad()
    def _copy_weights(self, named_tensors: list[tuple[str, torch.Tensor]], parameters: dict) -> None:
        for name, tensor in named_tensors:
            parameters[name].copy_(tensor)

    def _loaded(self, message: str, weight_version: str | None, flush_cache: bool) -> WeightControlResult:
        """After new weights were copied in: record the version, then apply SGLang's flush rule."""
        if weight_version is not None:
            self.weight_version = weight_version
            message += f" Weight version updated to {weight_version}."
        if flush_cache and self._running:
            return self._refused("Weights were updated, but the cache was not flushed because requests are still "
                                 "running or queued. Retract or finish them, then call /flush_cache.")
        return WeightControlResult(success=True, message=message)

    def _begin_weight_update(self) -> WeightControlResult:
        if self._weight_update_session:
            return self._refused("a weight-update session is already open; call end_weight_update() first")
        self._weight_update_session = True
        return WeightControlResult(success=True, message="Success")

    def _end_weight_update(self) -> WeightControlResult:
        if not self._weight_update_session:
            return self._refused("no weight-update session is open; call begin_weight_update() first")
        self._weight_update_session = False
        return WeightControlResult(success=True, message="Success")

    def _update_weights_from_tensor(self, named_tensors: list[tuple[str, torch.Tensor]], weight_version: str | None,
                                    flush_cache: bool, abort_all_requests: bool) -> WeightControlResult:
        if abort_all_requests:
            self._abort("", abort_all=True)
        if not self._weight_update_session:
            return self._refused(SESSION_REQUIRED.format("update_weights_from_tensor"))
        if refusal := self._weights_released():
            return refusal
        try:
            parameters = self._weight_targets(named_tensors)
        except ValueError as error:
            return self._refused(f"Failed to update weights: {error}. The previous weights are kept.")
        self._copy_weights(named_tensors, parameters)
        return self._loaded("Success", weight_version, flush_cache)

    def _update_weights_from_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                         group_name: str, load_format: str | None, weight_version: str | None,
                                         flush_cache: bool, abort_all_requests: bool) -> WeightControlResult:
        if abort_all_requests:
            self._abort("", abort_all=True)
        if not self._weight_update_session:
            return self._refused(SESSION_REQUIRED.format("update_weights_from_distributed"))
        with self._weight_groups_lock:
            group = self._weight_groups.get(group_name)
            joined = sorted(name for name, value in self._weight_groups.items() if value is not None)
        if group is None:
            return self._refused(f"Failed to receive weights: Group {group_name} not in {joined}. Please call "
                                 f"`init_weights_update_group` first.")
        try:  # received before anything is checked, so the sender's broadcast completes whatever happens next
            received = receive_broadcast(group, names, dtypes, shapes, load_format)
        except Exception as error:
            return self._refused(f"Failed to receive weights: {error}")
        if refusal := self._weights_released():
            return refusal
        try:
            parameters = self._weight_targets(received)
        except ValueError as error:
            return self._refused(f"Failed to update parameter online: {error}. The previous weights are kept.")
        self._copy_weights(received, parameters)
        return self._loaded("Succeeded to update parameter online.", weight_version, flush_cache)

    def _destroy_weights_update_group(self, group_name: str) -> WeightControlResult:
        with self._weight_groups_lock:
            group = self._weight_groups.get(group_name)
            if group is None:  # absent, or still being joined
                return self._refused("The group to be destroyed does not exist.")
            del self._weight_groups[group_name]
        try:
            leave_weights_update_group(group)
        except Exception as error:
            return self._refused(f"Failed to destroy custom process group: {error}.")
        return WeightControlResult(success=True, message="Succeeded to destroy custom process group.")

    def _update_weight_version(self, new_version: str, abort_all_requests: bool) -> WeightControlResult:
        if abort_all_requests:
            self._abort("", abort_all=True)
        self.weight_version = new_version
        return WeightControlResult(success=True, message=f"Weight version updated to {new_version}")
