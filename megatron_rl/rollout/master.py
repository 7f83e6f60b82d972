"""The rollout master: one queue of generation requests spread over N engine servers (data-parallel rollout).

`RolloutMaster.submit(request)` returns a `Future` at once; the master sends the request to an engine when
one has a free slot, choosing among those the engine with the fewest queued tokens (the prompt and
`max_new_tokens` of every request it is running), so short and long requests spread evenly. An engine
takes at most `slots` requests at a time (its `max_running_requests`); the rest wait here, in order, so
a request always goes to the engine that frees up first instead of queueing behind a busy one.

Failures, per request:
- the engine is gone (connection refused or broken: it died): the engine is marked down and the request
  goes back to the front of the queue, to be sent to another engine (from the start: a broken connection
  returns nothing). A down engine is probed every `probe_interval` s and used again once it answers with
  the weight version of the newest request (one restarted without its pushed weights stays out until the
  next weight sync reaches it: `weights_synced`). When no engine is up, `recover(engine, weight_version)`
  (e.g. the sidecar waiting for its engine's restart) is called and must return once the engine is back,
  or raise (the queued requests then fail with its error); without it they fail with `RolloutFailed`.
  A request that loses its engine more than MAX_ENGINE_LOSSES_PER_REQUEST times fails too.
- no answer within `request_timeout` s: the request is aborted on that engine and retried once elsewhere;
- an error answer: 4xx fails the request at once (it would fail again), others are retried once elsewhere;
- the answer carries another weight version than the caller expects: `StaleWeightsError`.
A future resolves exactly once: a request is never answered twice, and nothing is lost while an engine
can still serve.

`abort(futures)` stops requests and returns at once: each resolves with the output generated so far and
finish_reason "abort" (SGLang returns an aborted request's partial output; one still queued here resolves
with no tokens). The aborts go out in parallel (an engine applies them between steps), and since one can
reach an engine before the request it names, they are repeated until the requests return.

The master also keeps the slot occupancy of every engine (the time integral of its running requests,
capped at its slots), from which `busy_fraction` gives the share of slot time that was in use.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from megatron_rl.rollout.client import EngineClient
from megatron_rl.rollout.protocol import (
    EngineConnectionLost, EngineError, EngineUnreachable, GenerateRequest, GenerateResult,
)

logger = logging.getLogger(__name__)

MAX_ENGINE_LOSSES_PER_REQUEST = 3
DEFAULT_SLOTS = 64  # when an engine does not report its max_running_requests
ABORT_REPEAT_S = 1.0
# Aborts are sent in parallel: an engine applies control calls between its steps, so one after the other
# they would take a step each.
ABORT_THREADS = 16


class RolloutFailed(RuntimeError):
    """The rollout cannot go on (no engine can serve, or every request failed); the message says why."""


class StaleWeightsError(RuntimeError):
    """The engine answered with other weights than the trainer's current ones."""


@dataclass
class CompletedRequest:
    """An engine's answer to one submitted request, and where and how long it ran."""

    result: GenerateResult
    engine_url: str | None  # None: aborted before it was sent
    seconds: float  # from submit to answer, queueing included
    attempts: int  # sends it took (1 unless an engine died or failed under it)


@dataclass
class EngineStats:
    url: str
    slots: int
    up: bool
    running: int
    queued_tokens: int
    completed: int
    lost: int  # times it was found gone
    busy_slot_seconds: float


@dataclass
class _Engine:
    client: EngineClient
    slots: int
    up: bool = True
    incarnation: int = 0  # counts the times it came back: losses seen on an older one are stale news
    running: int = 0
    queued_tokens: int = 0
    completed: int = 0
    lost: int = 0
    last_probe: float = 0.0
    refused_version: str | None = None  # the weight version it came back with, while that is not wanted
    busy_slot_seconds: float = 0.0
    last_change: float = field(default_factory=time.monotonic)

    def account(self, now: float) -> None:
        self.busy_slot_seconds += min(self.running, self.slots) * (now - self.last_change)
        self.last_change = now


@dataclass
class _Job:
    request: GenerateRequest
    weight_version: str | None
    future: Future
    load: int  # queued tokens it stands for: prompt + max_new_tokens
    submitted: float
    rid: str = ""
    engine: _Engine | None = None  # while sent
    incarnation: int = 0
    attempts: int = 0
    errors: int = 0
    losses: int = 0
    last_engine: _Engine | None = None
    abort_requested: bool = False
    last_error: str = ""


class RolloutMaster:
    """Spreads `/generate` requests over `engines`; thread-safe. See the module docstring."""

    def __init__(self, engines: Sequence[EngineClient], *, slots: int | Sequence[int] | None = None,
                 request_timeout: float = 600.0,
                 recover: Callable[[EngineClient, str | None], None] | None = None,
                 probe_interval: float = 5.0, record_timeline: bool = False):
        if not engines:
            raise ValueError("RolloutMaster needs at least one engine")
        if slots is None:
            counts = [engine_slots(client) for client in engines]
        elif isinstance(slots, int):
            counts = [slots] * len(engines)
        else:
            counts = list(slots)
        if len(counts) != len(engines) or min(counts) < 1:
            raise ValueError(f"slots must be ≥ 1 per engine, got {counts} for {len(engines)} engines")
        self._engines = [_Engine(client, count) for client, count in zip(engines, counts)]
        self.request_timeout = request_timeout
        self._recover = recover
        self.probe_interval = probe_interval
        self._cond = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._jobs: dict[Future, _Job] = {}
        self._latest_weight_version: str | None = None  # of the newest request that names one
        self._closed = False
        self._aborter: threading.Thread | None = None
        # What the bench plots: (time, requests running on all engines) at every change.
        self.timeline: list[tuple[float, int]] | None = [] if record_timeline else None
        self._pool = ThreadPoolExecutor(sum(counts), thread_name_prefix="rollout-request")
        self._abort_pool = ThreadPoolExecutor(ABORT_THREADS, thread_name_prefix="rollout-abort")
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="rollout-master", daemon=True)
        self._dispatcher.start()

    # ------------------------------------------------------------------ public API

    @property
    def engines(self) -> list[EngineClient]:
        return [engine.client for engine in self._engines]

    @property
    def capacity(self) -> int:
        """Requests the engines that are up can run at once."""
        with self._cond:
            return sum(engine.slots for engine in self._engines if engine.up) or sum(e.slots for e in self._engines)

    def submit(self, request: GenerateRequest, weight_version: str | None = None) -> Future:
        """Queue `request`; the future resolves to a `CompletedRequest`, or raises (module docstring).
        `weight_version`: every output token must come from it (None: not checked)."""
        future: Future = Future()
        future.set_running_or_notify_cancel()  # resolved only here: callers stop a request with abort()
        job = _Job(request, weight_version, future, len(request.input_ids) + request.sampling_params.max_new_tokens,
                   time.monotonic())
        with self._cond:
            if self._closed:
                raise RuntimeError("the rollout master is closed")
            self._jobs[future] = job
            self._queue.append(job)
            if weight_version is not None:
                self._latest_weight_version = weight_version
            self._cond.notify_all()
        return future

    def abort(self, futures: Iterable[Future]) -> None:
        """Stop these requests; each resolves with its partial output (finish_reason "abort")."""
        unsent, sent = [], []
        with self._cond:
            for future in futures:
                job = self._jobs.get(future)
                if job is None or job.abort_requested:
                    continue
                job.abort_requested = True
                if job.engine is None:
                    if job in self._queue:
                        self._queue.remove(job)
                        unsent.append(job)
                else:
                    sent.append((job.engine, job.rid))
            if sent and (self._aborter is None or not self._aborter.is_alive()):
                self._aborter = threading.Thread(target=self._repeat_aborts, name="rollout-aborts", daemon=True)
                self._aborter.start()
        for job in unsent:
            self._resolve(job, _unsent_abort(job))
        for engine, rid in sent:
            self._abort_pool.submit(_abort_quietly, engine.client, rid)

    def busy_slot_seconds(self) -> float:
        """Slot-seconds in use on all engines so far (see `busy_fraction`)."""
        now = time.monotonic()
        with self._cond:
            for engine in self._engines:
                engine.account(now)
            return sum(engine.busy_slot_seconds for engine in self._engines)

    def busy_fraction(self, since_slot_seconds: float, seconds: float) -> float:
        """Share of all engines' slot time in use over the last `seconds`, given `busy_slot_seconds()` then."""
        total_slots = sum(engine.slots for engine in self._engines)
        if seconds <= 0:
            return 0.0
        return (self.busy_slot_seconds() - since_slot_seconds) / (seconds * total_slots)

    def weights_synced(self, weight_version: str) -> None:
        """Every engine was just given `weight_version` (a weight sync): the engines marked down that answer
        with it are used again now, not after their next probe."""
        with self._cond:
            self._latest_weight_version = weight_version
            down = [engine for engine in self._engines if not engine.up]
        for engine in down:
            self._probe(engine)

    def stats(self) -> list[EngineStats]:
        now = time.monotonic()
        with self._cond:
            for engine in self._engines:
                engine.account(now)
            return [EngineStats(e.client.base_url, e.slots, e.up, e.running, e.queued_tokens, e.completed, e.lost,
                                e.busy_slot_seconds) for e in self._engines]

    def close(self) -> None:
        """Stop dispatching; requests still queued fail, running ones are aborted."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            queued = list(self._queue)
            self._queue.clear()
            running = [job.future for job in self._jobs.values() if job.engine is not None]
            self._cond.notify_all()
        for job in queued:
            self._fail(job, RolloutFailed("the rollout master was closed"))
        self.abort(running)
        self._dispatcher.join(10)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._abort_pool.shutdown(wait=False)

    def __enter__(self) -> RolloutMaster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ dispatching

    def _pick_engine(self, job: _Job) -> _Engine | None:
        free = [engine for engine in self._engines if engine.up and engine.running < engine.slots]
        if not free:
            return None
        # A request that failed on an engine goes elsewhere when it can.
        elsewhere = [engine for engine in free if engine is not job.last_engine] or free
        return min(elsewhere, key=lambda engine: (engine.queued_tokens, engine.running))

    def _dispatch_loop(self) -> None:
        while True:
            sends: list[tuple[_Job, _Engine]] = []
            recover = False
            with self._cond:
                while not self._closed:
                    now = time.monotonic()
                    probes = [e for e in self._engines if not e.up and now - e.last_probe >= self.probe_interval]
                    while self._queue:
                        engine = self._pick_engine(self._queue[0])
                        if engine is None:
                            break
                        job = self._queue.popleft()
                        self._start(job, engine, now)
                        sends.append((job, engine))
                    recover = bool(self._queue) and not any(engine.up for engine in self._engines)
                    if sends or probes or recover:
                        break
                    wait = self.probe_interval if any(not e.up for e in self._engines) else None
                    self._cond.wait(wait)
                if self._closed:
                    return
                for engine in probes:
                    engine.last_probe = now
            for job, engine in sends:
                self._pool.submit(self._send, job, engine, job.incarnation)
            for engine in probes:  # off this thread: a host that does not answer must not hold up the queue
                threading.Thread(target=self._probe, args=(engine,), name="rollout-probe", daemon=True).start()
            if recover:
                self._recover_an_engine()

    def _start(self, job: _Job, engine: _Engine, now: float) -> None:
        engine.account(now)
        engine.running += 1
        engine.queued_tokens += job.load
        job.engine, job.incarnation = engine, engine.incarnation
        job.attempts += 1
        job.rid = uuid.uuid4().hex  # a fresh id per send: an abort of an earlier send cannot hit this one
        if self.timeline is not None:
            self.timeline.append((now, sum(e.running for e in self._engines)))

    def _release(self, job: _Job) -> None:
        """The job's send is over (answered or failed): its slot is free. Called with the lock held."""
        engine = job.engine
        now = time.monotonic()
        engine.account(now)
        engine.running -= 1
        engine.queued_tokens -= job.load
        job.last_engine, job.engine = engine, None
        if self.timeline is not None:
            self.timeline.append((now, sum(e.running for e in self._engines)))
        self._cond.notify_all()

    def _send(self, job: _Job, engine: _Engine, incarnation: int) -> None:
        request = job.request.model_copy(update={"rid": job.rid})
        try:
            result = engine.client.generate([request], timeout=self.request_timeout)[0]
        except EngineError as error:
            self._failed_send(job, engine, incarnation, error)
            return
        except BaseException as error:  # a bug or a bad answer: the caller hears of it, never a silent hang
            with self._cond:
                self._release(job)
            self._fail(job, error)
            return
        with self._cond:
            self._release(job)
            engine.completed += 1
        stale = _stale_weights(result, job.weight_version, engine.client)
        if stale is not None:
            self._fail(job, stale)
        else:
            self._resolve(job, CompletedRequest(result, engine.client.base_url, time.monotonic() - job.submitted,
                                                job.attempts))

    def _failed_send(self, job: _Job, engine: _Engine, incarnation: int, error: EngineError) -> None:
        job.last_error = str(error)
        lost = engine_lost(error)
        if not lost and error.endpoint == "/generate" and "timed out" in str(error):
            _abort_quietly(engine.client, job.rid)  # the engine must not keep generating for nobody
        with self._cond:
            self._release(job)
            if lost:
                if engine.up and engine.incarnation == incarnation:
                    engine.up = False
                    engine.lost += 1
                    engine.last_probe = time.monotonic()
                    logger.warning("engine %s is gone (%s); its requests go to the other engines",
                                   engine.client.base_url, error)
                job.losses += 1
                give_up = job.losses > MAX_ENGINE_LOSSES_PER_REQUEST
                failure: BaseException = RolloutFailed(
                    f"a rollout request lost its engine {job.losses} times; the last time: {error}")
            else:
                job.errors += 1
                # A request the engine rejects (4xx) fails the same way again; other failures may pass elsewhere.
                give_up = job.errors >= 2 or (error.status is not None and error.status < 500)
                failure = error
                if not give_up:
                    logger.warning("rollout request failed on %s, retrying once: %s", engine.client.base_url, error)
            if not give_up and not job.abort_requested:
                self._queue.appendleft(job)
                return
        if job.abort_requested:  # the caller wants it stopped anyway: it stops with what it has, nothing
            self._resolve(job, _unsent_abort(job))
        else:
            self._fail(job, failure)

    def _probe(self, engine: _Engine) -> None:
        probe = engine.client.with_timeout(min(5.0, self.probe_interval))
        try:
            if not probe.health():
                return
            serving = probe.weight_version()
        except EngineError:
            return
        with self._cond:
            wanted = self._latest_weight_version
            if wanted is not None and serving != wanted:
                if engine.refused_version != serving:
                    logger.warning("engine %s is back with weight version %s, not %s; it gets no requests until it "
                                   "serves %s", engine.client.base_url, serving, wanted, wanted)
                engine.refused_version = serving
                return
            engine.refused_version = None
            self._mark_up(engine)
        logger.warning("engine %s answers again; sending it requests", engine.client.base_url)

    def _mark_up(self, engine: _Engine) -> None:
        if not engine.up:
            engine.up = True
            engine.incarnation += 1
            engine.last_change = time.monotonic()
        self._cond.notify_all()

    def _recover_an_engine(self) -> None:
        """No engine is up and requests wait: bring one back through `recover`, or fail what waits."""
        with self._cond:
            waiting = list(self._queue)
            engine = next((e for e in self._engines if not e.up), None)
            if engine is None or not waiting:
                return
            weight_version = waiting[0].weight_version
        error: BaseException
        if self._recover is None:
            error = RolloutFailed(f"no engine can serve: every engine is unreachable (the last error: "
                                  f"{waiting[0].last_error or 'none'})")
        else:
            try:
                self._recover(engine.client, weight_version)
            except BaseException as raised:  # the caller's reason why it cannot come back
                error = raised
            else:
                with self._cond:
                    self._mark_up(engine)
                return
        with self._cond:
            failed = list(self._queue)
            self._queue.clear()
        for job in failed:
            self._fail(job, error)

    def _repeat_aborts(self) -> None:
        """An abort may reach the engine before the request it names: repeat it until the request returns."""
        while True:
            time.sleep(ABORT_REPEAT_S)
            with self._cond:
                pending = [(job.engine, job.rid) for job in self._jobs.values()
                           if job.abort_requested and job.engine is not None]
            if not pending:
                return
            for engine, rid in pending:
                try:
                    self._abort_pool.submit(_abort_quietly, engine.client, rid)
                except RuntimeError:  # closed: this thread sends them itself
                    _abort_quietly(engine.client, rid)

    # ------------------------------------------------------------------ resolving

    def _resolve(self, job: _Job, completed: CompletedRequest) -> None:
        with self._cond:
            self._jobs.pop(job.future, None)
        job.future.set_result(completed)

    def _fail(self, job: _Job, error: BaseException) -> None:
        with self._cond:
            self._jobs.pop(job.future, None)
        job.future.set_exception(error)


def engine_slots(client: EngineClient, default: int = DEFAULT_SLOTS) -> int:
    """The engine's `max_running_requests` from /server_info (SGLang: its server args; the embedded engine
    reports it too), or `default` when it does not say (SGLang sizes it itself when unset)."""
    try:
        info = client.server_info()
    except EngineError:
        return default
    for source in (info, *(info.get("internal_states") or [])):
        value = source.get("max_running_requests") if isinstance(source, dict) else None
        if isinstance(value, int) and value > 0:
            return value
    return default


def engine_lost(error: EngineError) -> bool:
    """No HTTP answer at all: nothing listens, or the connection broke (the engine died mid-request)."""
    return isinstance(error, (EngineUnreachable, EngineConnectionLost))


def _stale_weights(result: GenerateResult, expected: str | None, client: EngineClient) -> StaleWeightsError | None:
    if expected is None or not result.output_ids:
        return None
    versions = {span.version for span in result.weight_versions} | {result.weight_version}
    if versions == {expected}:
        return None
    return StaleWeightsError(
        f"the engine at {client.base_url} generated with weight version(s) {sorted(v or '?' for v in versions)}, "
        f"but the trainer's weights are version {expected}: the weight sync did not reach the engine")


def _unsent_abort(job: _Job) -> CompletedRequest:
    result = GenerateResult(rid=job.rid or uuid.uuid4().hex, output_ids=[], output_logprobs=[], finish_reason="abort",
                            finish_message="aborted before it was sent", weight_version=None,
                            prompt_tokens=len(job.request.input_ids), completion_tokens=0)
    return CompletedRequest(result, None, time.monotonic() - job.submitted, job.attempts)


def _abort_quietly(client: EngineClient, rid: str) -> None:
    """Best effort: an engine that is gone has nothing left to abort."""
    try:
        client.abort_request(rid)
    except EngineError:
        pass
