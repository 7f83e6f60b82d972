"""The run-metadata store: a small key-value interface with compare-and-swap, leases and watches.

The trainer, the per-pod sidecars and the `megatron-rl runs ...` CLI keep run metadata here (phase,
iteration, weight version, sidecar heartbeats, weight shards, operator commands). Two implementations
share the `MetadataStore` interface: `EtcdStore` (etcd_store.py) for clusters, and `MemoryStore` (this
module) for the embedded CPU default, where every component lives in one process and must share one
`MemoryStore` instance. `store_from_config(config.control)` picks one.

Keys are str. Values are bytes on the way out; `put` also takes str (stored as UTF-8). `get_json` /
`put_json` carry JSON documents and pydantic models. Every single-key operation is atomic, and
`put_many` applies several keys in one transaction.
"""
from __future__ import annotations

import abc
import bisect
import dataclasses
import itertools
import json
import logging
import queue
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping

from pydantic import BaseModel

from megatron_rl.errors import UserError

if TYPE_CHECKING:
    from megatron_rl.config import ControlConfig

__all__ = [
    "RUNS_PREFIX", "KeepAlive", "Lease", "LeaseExpired", "MemoryStore", "MetadataStore", "StoreError",
    "StoreUnavailable", "Watch", "WatchEvent", "run_prefix", "store_from_config",
]

_log = logging.getLogger(__name__)

RUNS_PREFIX = "/megatron-rl/runs/"

Value = bytes | str
WatchCallback = Callable[["WatchEvent"], None]


class StoreError(Exception):
    """A metadata-store operation failed."""


class StoreUnavailable(StoreError, UserError):
    """The store cannot be reached (etcd down or misconfigured). Also a UserError: the fix is the user's."""


class LeaseExpired(StoreError):
    """The lease has expired or was revoked; keys can no longer be attached to it or kept alive by it."""


def run_prefix(run_name: str) -> str:
    """The key prefix that holds everything of one run: /megatron-rl/runs/<run_name>/."""
    if not run_name or "/" in run_name or run_name.strip() != run_name:
        raise UserError(f"control.run_name={run_name!r} is not a valid run name: use a non-empty name "
                        "without '/' or surrounding spaces")
    return f"{RUNS_PREFIX}{run_name}/"


@dataclasses.dataclass(frozen=True)
class WatchEvent:
    """One change seen by a watch. `value` is None for deletes (including lease expiry)."""

    kind: Literal["put", "delete"]
    key: str
    value: bytes | None
    revision: int  # the store revision of the change; the keys of one `put_many` share it


class Watch(abc.ABC):
    """A registered watch. Callbacks run on a background thread, one event at a time, in revision order;
    keep them short, and do not call `watch()` from one (with etcd, registering waits for that thread)."""

    @abc.abstractmethod
    def cancel(self) -> None:
        """Stop delivering events. Idempotent."""

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc_info) -> None:
        self.cancel()


class Lease(abc.ABC):
    """A liveness lease: keys put with it vanish when it expires or is revoked."""

    id: int
    ttl: int  # granted TTL in seconds (etcd may raise a short request to its minimum)

    @abc.abstractmethod
    def refresh(self) -> None:
        """Reset the TTL. Raises LeaseExpired if the lease is gone."""

    @abc.abstractmethod
    def revoke(self) -> None:
        """End the lease now, deleting its keys. Idempotent."""

    def keep_alive(self, interval: float | None = None,
                   on_lost: Callable[[Lease], None] | None = None) -> KeepAlive:
        """Refresh from a background thread every `interval` s (default ttl/3) until `stop()`."""
        return KeepAlive(self, self.ttl / 3 if interval is None else interval, on_lost)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc_info) -> None:
        self.revoke()


class KeepAlive:
    """Keeps one lease alive from a daemon thread. A brief store outage is retried at the next tick;
    once the lease is gone, `lost` is set, `on_lost(lease)` is called and the thread ends."""

    def __init__(self, lease: Lease, interval: float, on_lost: Callable[[Lease], None] | None):
        if interval <= 0:
            raise ValueError(f"keep-alive interval must be positive, got {interval}")
        self.lease = lease
        self.interval = interval
        self.lost = threading.Event()
        self._on_lost = on_lost
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-keep-alive-{lease.id:x}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(self.interval):
            try:
                self.lease.refresh()
            except StoreUnavailable as error:
                _log.warning("lease %x keep-alive: %s", self.lease.id, error)
            except LeaseExpired:
                self.lost.set()
                if self._on_lost is not None:
                    try:
                        self._on_lost(self.lease)
                    except Exception:
                        _log.exception("on_lost callback of lease %x failed", self.lease.id)
                return
            except StoreError as error:  # e.g. the store was closed
                _log.warning("lease %x keep-alive stopped: %s", self.lease.id, error)
                return

    def stop(self) -> None:
        self._stopped.set()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def __enter__(self) -> KeepAlive:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def to_bytes(value: Value) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    raise TypeError(f"store values are bytes or str, got {type(value).__name__}")


def check_ttl(ttl_seconds: int) -> None:
    if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int) or ttl_seconds < 1:
        raise ValueError(f"lease TTL must be a whole number of seconds >= 1, got {ttl_seconds!r}")


def check_key(key: str, what: str = "key") -> None:
    if not isinstance(key, str) or not key:
        raise ValueError(f"store {what} must be a non-empty str, got {key!r}")


class MetadataStore(abc.ABC):
    """The operations every component uses. Implementations are thread-safe."""

    @abc.abstractmethod
    def get(self, key: str) -> bytes | None:
        """The value of `key`, or None if absent."""

    @abc.abstractmethod
    def get_prefix(self, prefix: str) -> dict[str, bytes]:
        """All keys starting with `prefix`, sorted by key."""

    @abc.abstractmethod
    def put(self, key: str, value: Value, lease: Lease | None = None) -> None:
        """Set `key`; with a lease the key is deleted when the lease ends."""

    @abc.abstractmethod
    def put_many(self, values: Mapping[str, Value], *, expected: Mapping[str, Value | None] | None = None,
                 lease: Lease | None = None) -> bool:
        """Set all `values` in one transaction, only if every key in `expected` holds the given value
        (None: the key is absent). Returns whether it was applied; nothing is written otherwise."""

    @abc.abstractmethod
    def delete(self, key: str) -> bool:
        """Delete `key`; True if it existed."""

    @abc.abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every key starting with `prefix` (one transaction); the number deleted."""

    @abc.abstractmethod
    def lease(self, ttl_seconds: int) -> Lease:
        """Grant a lease of `ttl_seconds` (whole seconds, at least 1)."""

    @abc.abstractmethod
    def watch(self, key: str, callback: WatchCallback, prefix: bool = True) -> Watch:
        """Call `callback(WatchEvent)` for every change of `key` (or of every key under it when `prefix`)
        from this call on."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections and threads; watches stop. Leases are left to expire. Idempotent."""

    def put_if(self, key: str, value: Value, expected: Value | None, lease: Lease | None = None) -> bool:
        """Compare-and-swap: set `key` only if it holds `expected` (None: only if absent). Of two writers
        racing from the same `expected`, exactly one succeeds."""
        return self.put_many({key: value}, expected={key: expected}, lease=lease)

    def get_json(self, key: str) -> Any:
        """The JSON document at `key`, or None if absent (validate it with `Model.model_validate`)."""
        raw = self.get(key)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError as error:
            raise StoreError(f"value at {key} is not JSON ({error}): {raw[:200]!r}") from None

    def put_json(self, key: str, value: Any, lease: Lease | None = None) -> None:
        """Store `value` (a JSON-serialisable object or a pydantic model) as compact JSON."""
        if isinstance(value, BaseModel):
            encoded = value.model_dump_json().encode()
        else:
            encoded = json.dumps(value, separators=(",", ":"), sort_keys=True).encode()
        self.put(key, encoded, lease=lease)

    def __enter__(self) -> MetadataStore:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def check_put_many(values: Mapping[str, Value], expected: Mapping[str, Value | None] | None
                   ) -> tuple[dict[str, bytes], dict[str, bytes | None]]:
    """`put_many` arguments as bytes, validated before anything is sent."""
    if not values:
        raise ValueError("put_many needs at least one key to write")
    encoded = {}
    for key, value in values.items():
        check_key(key)
        encoded[key] = to_bytes(value)
    compares = {}
    for key, value in (expected or {}).items():
        check_key(key)
        compares[key] = None if value is None else to_bytes(value)
    return encoded, compares


# --------------------------------------------------------------------------------------------- memory


@dataclasses.dataclass
class _Record:
    value: bytes
    lease_id: int | None


@dataclasses.dataclass
class _LeaseState:
    ttl: int
    deadline: float  # time.monotonic() at which the lease expires
    keys: set[str]


class MemoryLease(Lease):
    def __init__(self, store: MemoryStore, lease_id: int, ttl: int):
        self.id = lease_id
        self.ttl = ttl
        self._store = store

    def refresh(self) -> None:
        self._store._refresh_lease(self.id)

    def revoke(self) -> None:
        self._store._revoke_lease(self.id)

    def __repr__(self) -> str:
        return f"MemoryLease(id={self.id:x}, ttl={self.ttl})"


class MemoryWatch(Watch):
    def __init__(self, store: MemoryStore, key: str, callback: WatchCallback, prefix: bool):
        self.key = key
        self.prefix = prefix
        self.callback = callback
        self.cancelled = False
        self._store = store

    def matches(self, key: str) -> bool:
        return key.startswith(self.key) if self.prefix else key == self.key

    def cancel(self) -> None:
        self._store._remove_watch(self)


class MemoryStore(MetadataStore):
    """In-process store with etcd's semantics: a global revision, leases expiring on monotonic time
    (a background thread deletes their keys and emits delete events), ordered watch events delivered
    from one dispatcher thread."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._data: dict[str, _Record] = {}
        self._sorted_keys: list[str] = []
        self._leases: dict[int, _LeaseState] = {}
        self._lease_ids = itertools.count(1)
        self._revision = 1  # etcd starts at 1 too
        self._watches: list[MemoryWatch] = []
        self._events: queue.SimpleQueue[tuple[MemoryWatch, WatchEvent] | None] = queue.SimpleQueue()
        self._dispatcher: threading.Thread | None = None
        self._reaper: threading.Thread | None = None
        self._closed = False

    def __repr__(self) -> str:
        return "MemoryStore()"

    # All `_..._locked` helpers run with self._condition held.

    def _check_open_locked(self) -> None:
        if self._closed:
            raise StoreError("the metadata store is closed")
        self._expire_leases_locked()

    def _emit_locked(self, kind: Literal["put", "delete"], key: str, value: bytes | None) -> None:
        # Queued under the lock, so watchers see changes in commit order.
        for watch in self._watches:
            if watch.matches(key):
                self._events.put((watch, WatchEvent(kind, key, value, self._revision)))

    def _put_locked(self, key: str, value: bytes, lease_id: int | None) -> None:
        previous = self._data.get(key)
        if previous is None:
            bisect.insort(self._sorted_keys, key)
        elif previous.lease_id is not None and previous.lease_id in self._leases:
            self._leases[previous.lease_id].keys.discard(key)
        self._data[key] = _Record(value, lease_id)
        if lease_id is not None:
            self._leases[lease_id].keys.add(key)
        self._emit_locked("put", key, value)

    def _delete_locked(self, key: str) -> bool:
        record = self._data.pop(key, None)
        if record is None:
            return False
        del self._sorted_keys[bisect.bisect_left(self._sorted_keys, key)]
        if record.lease_id is not None and record.lease_id in self._leases:
            self._leases[record.lease_id].keys.discard(key)
        self._emit_locked("delete", key, None)
        return True

    def _keys_with_prefix_locked(self, prefix: str) -> list[str]:
        start = bisect.bisect_left(self._sorted_keys, prefix)
        keys = []
        for key in self._sorted_keys[start:]:
            if not key.startswith(prefix):
                break
            keys.append(key)
        return keys

    def _live_lease_id_locked(self, lease: Lease | None) -> int | None:
        if lease is None:
            return None
        if not isinstance(lease, MemoryLease) or lease._store is not self:
            raise TypeError(f"{lease!r} was not granted by this MemoryStore")
        if lease.id not in self._leases:
            raise LeaseExpired(f"lease {lease.id:x} has expired or was revoked")
        return lease.id

    def _end_lease_locked(self, lease_id: int) -> None:
        state = self._leases.pop(lease_id, None)
        if state is None or not state.keys:
            return
        self._revision += 1  # one revision for all of the lease's keys, as in etcd
        for key in sorted(state.keys):
            self._delete_locked(key)

    def _expire_leases_locked(self) -> float | None:
        """Expire due leases; the next deadline, or None if there are no leases."""
        now = time.monotonic()
        for lease_id in [i for i, state in self._leases.items() if state.deadline <= now]:
            self._end_lease_locked(lease_id)
        return min((state.deadline for state in self._leases.values()), default=None)

    def get(self, key: str) -> bytes | None:
        check_key(key)
        with self._condition:
            self._check_open_locked()
            record = self._data.get(key)
            return None if record is None else record.value

    def get_prefix(self, prefix: str) -> dict[str, bytes]:
        check_key(prefix, "prefix")
        with self._condition:
            self._check_open_locked()
            return {key: self._data[key].value for key in self._keys_with_prefix_locked(prefix)}

    def put(self, key: str, value: Value, lease: Lease | None = None) -> None:
        self.put_many({key: value}, lease=lease)

    def put_many(self, values: Mapping[str, Value], *, expected: Mapping[str, Value | None] | None = None,
                 lease: Lease | None = None) -> bool:
        encoded, compares = check_put_many(values, expected)
        with self._condition:
            self._check_open_locked()
            lease_id = self._live_lease_id_locked(lease)
            for key, value in compares.items():
                record = self._data.get(key)
                if (record.value if record is not None else None) != value:
                    return False
            self._revision += 1
            for key, value in encoded.items():
                self._put_locked(key, value, lease_id)
            return True

    def delete(self, key: str) -> bool:
        check_key(key)
        with self._condition:
            self._check_open_locked()
            if key not in self._data:
                return False
            self._revision += 1
            return self._delete_locked(key)

    def delete_prefix(self, prefix: str) -> int:
        check_key(prefix, "prefix")
        with self._condition:
            self._check_open_locked()
            keys = self._keys_with_prefix_locked(prefix)
            if keys:
                self._revision += 1
                for key in keys:
                    self._delete_locked(key)
            return len(keys)

    def lease(self, ttl_seconds: int) -> Lease:
        check_ttl(ttl_seconds)
        with self._condition:
            self._check_open_locked()
            lease_id = next(self._lease_ids)
            self._leases[lease_id] = _LeaseState(ttl_seconds, time.monotonic() + ttl_seconds, set())
            if self._reaper is None:
                self._reaper = threading.Thread(target=self._reap, name="memory-store-leases", daemon=True)
                self._reaper.start()
            self._condition.notify_all()
            return MemoryLease(self, lease_id, ttl_seconds)

    def _reap(self) -> None:
        """Expire leases on time even when nobody touches the store, so watchers see the deletes."""
        with self._condition:
            while not self._closed:
                next_deadline = self._expire_leases_locked()
                self._condition.wait(None if next_deadline is None else max(0.0, next_deadline - time.monotonic()))

    def _refresh_lease(self, lease_id: int) -> None:
        with self._condition:
            self._check_open_locked()
            state = self._leases.get(lease_id)
            if state is None:
                raise LeaseExpired(f"lease {lease_id:x} has expired or was revoked")
            state.deadline = time.monotonic() + state.ttl
            self._condition.notify_all()

    def _revoke_lease(self, lease_id: int) -> None:
        with self._condition:
            self._check_open_locked()
            self._end_lease_locked(lease_id)

    def watch(self, key: str, callback: WatchCallback, prefix: bool = True) -> Watch:
        check_key(key)
        with self._condition:
            self._check_open_locked()
            watch = MemoryWatch(self, key, callback, prefix)
            self._watches.append(watch)
            if self._dispatcher is None:
                self._dispatcher = threading.Thread(target=self._dispatch, name="memory-store-watch", daemon=True)
                self._dispatcher.start()
            return watch

    def _remove_watch(self, watch: MemoryWatch) -> None:
        with self._condition:
            watch.cancelled = True
            if watch in self._watches:
                self._watches.remove(watch)

    def _dispatch(self) -> None:
        while (item := self._events.get()) is not None:
            watch, event = item
            if watch.cancelled:
                continue
            try:
                watch.callback(event)
            except Exception:
                _log.exception("watch callback for %s failed on %s", watch.key, event)

    def close(self) -> None:
        with self._condition:
            if self._closed:
                return
            self._closed = True
            for watch in self._watches:
                watch.cancelled = True
            self._watches.clear()
            self._condition.notify_all()
        self._events.put(None)
        for thread in (self._dispatcher, self._reaper):
            if thread is not None and thread is not threading.current_thread():
                thread.join()


def store_from_config(control_config: ControlConfig) -> MetadataStore:
    """The store named by `control.store` ("memory": a new in-process MemoryStore; "etcd": a client of
    `control.etcd_endpoints`, checked to be reachable)."""
    if control_config.store == "memory":
        return MemoryStore()
    from megatron_rl.control.etcd_store import EtcdStore  # grpc is imported only when etcd is used

    return EtcdStore(control_config.etcd_endpoints)
