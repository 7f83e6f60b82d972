"""`EtcdStore`: the MetadataStore on an etcd v3 cluster (python3-etcd3 0.13.0, the `import etcd3` API).

Every call is bounded by `timeout`; an unreachable etcd raises `StoreUnavailable` naming the endpoints.
After a failure an endpoint is rested for a second, then retried (or the next endpoint is used), so a
restarted etcd is picked up again without a new client. Watches survive an etcd restart: when their
stream ends they are registered again, resuming at the first revision not yet delivered, so no event is
lost or repeated (unless etcd compacted that history away or lost its data; both are logged).
"""
from __future__ import annotations

import contextlib
import logging
import threading
import types
import urllib.parse
from typing import Callable, Iterator, Mapping, Sequence, TypeVar

import etcd3
import etcd3.events
import etcd3.exceptions
import etcd3.utils
import etcd3.watch
import grpc

from megatron_rl.control.store import (
    Lease, LeaseExpired, MetadataStore, StoreError, StoreUnavailable, Value, Watch, WatchCallback, WatchEvent,
    check_key, check_put_many, check_ttl, to_bytes,
)
from megatron_rl.errors import UserError

__all__ = ["EtcdStore", "parse_endpoints"]

_log = logging.getLogger(__name__)

# python3-etcd3 0.13.0's watch.py calls six.itervalues without importing six: when a watch stream
# ends (etcd restart, close) the watcher thread dies with NameError and its callbacks never hear of it.
if not hasattr(etcd3.watch, "six"):
    etcd3.watch.six = types.SimpleNamespace(itervalues=lambda mapping: iter(mapping.values()))

DEFAULT_PORT = 2379
DEFAULT_TIMEOUT_SECONDS = 5.0
# How long an endpoint that just failed is skipped before it is tried again.
ENDPOINT_RETRY_SECONDS = 1.0
GRPC_OPTIONS = [
    # gRPC's default reconnect backoff grows to 120 s; cap it so a restarted etcd is reached within ~1 s.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # Each store its own connections: gRPC otherwise shares them process-wide, and a new store would
    # inherit another one's failed connection (and fail at once) while it waits out its backoff.
    ("grpc.use_local_subchannel_pool", 1),
    # Detect a silently dead peer (node lost, network partition) on a long-lived watch stream.
    # etcd refuses pings more often than every 5 s (--grpc-keepalive-min-time).
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
]
_UNAVAILABLE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
_UNAVAILABLE_ERRORS = (
    etcd3.exceptions.ConnectionFailedError, etcd3.exceptions.ConnectionTimeoutError,
    etcd3.exceptions.NoServerAvailableError, etcd3.exceptions.WatchTimedOut,
)
Result = TypeVar("Result")


def parse_endpoints(endpoints: Sequence[str]) -> list[tuple[str, int]]:
    """`control.etcd_endpoints` entries ("http://host:port", "host:port" or "host") as (host, port)."""
    example = "e.g. control.etcd_endpoints=[http://127.0.0.1:2379]"
    if isinstance(endpoints, str) or not endpoints:
        raise UserError(f"control.etcd_endpoints is {endpoints!r} but control.store=etcd needs a list of etcd "
                        f"client URLs, {example}")
    parsed_endpoints = []
    for endpoint in endpoints:
        text = str(endpoint).strip()
        url = urllib.parse.urlsplit(text if "://" in text else "http://" + text)
        try:
            port = url.port or DEFAULT_PORT
        except ValueError:
            port = None
        if url.scheme != "http" or not url.hostname or port is None or url.path not in ("", "/") or url.query:
            raise UserError(f"control.etcd_endpoints: {endpoint!r} is not an etcd client URL of the form "
                            f"http://HOST:PORT (TLS endpoints are not supported), {example}")
        parsed_endpoints.append((url.hostname, port))
    return parsed_endpoints


class EtcdLease(Lease):
    def __init__(self, store: EtcdStore, lease_id: int, ttl: int):
        self.id = lease_id
        self.ttl = ttl
        self._store = store

    def refresh(self) -> None:
        responses = self._store._call("refresh lease", lambda: list(self._store._client.refresh_lease(self.id)))
        if not responses or responses[-1].TTL <= 0:
            raise LeaseExpired(f"lease {self.id:x} has expired or was revoked")

    def revoke(self) -> None:
        try:
            self._store._call("revoke lease", lambda: self._store._client.revoke_lease(self.id))
        except LeaseExpired:
            pass  # already gone: revoking is idempotent

    def __repr__(self) -> str:
        return f"EtcdLease(id={self.id:x}, ttl={self.ttl})"


class EtcdWatch(Watch):
    """One watch that re-registers itself whenever its gRPC stream ends, until cancelled."""

    def __init__(self, store: EtcdStore, key: str, callback: WatchCallback, prefix: bool):
        self.key = key
        self.prefix = prefix
        self.callback = callback
        self._store = store
        self._lock = threading.Lock()
        self._watch_id: int | None = None
        self._next_revision = 0  # the first revision not yet delivered; 0 until registered
        self._cancelled = threading.Event()
        self._register()

    def _register(self) -> None:
        current_revision = self._store._current_revision(self.key)
        if self._next_revision == 0:
            self._next_revision = current_revision + 1
        elif self._next_revision > current_revision + 1:
            _log.warning("etcd at %s is at revision %d, before this watch's %d: its data was reset; watching %s "
                         "from now on", self._store.endpoints_text, current_revision, self._next_revision, self.key)
            self._next_revision = current_revision + 1
        watch_id = self._store._add_watch(self.key, self._on_response, self.prefix, self._next_revision)
        with self._lock:
            self._watch_id = watch_id
            cancelled = self._cancelled.is_set()
        if cancelled:
            self._store._cancel_watch(watch_id)

    def _on_response(self, response) -> None:
        """Runs on python-etcd3's watcher thread: a WatchResponse, or the stream's end (error or None)."""
        if self._cancelled.is_set() or self._store._closed:
            return
        if isinstance(response, etcd3.watch.WatchResponse):
            floor = self._next_revision  # events of one transaction share a revision
            for event in response.events:
                if event.mod_revision >= floor:
                    self._deliver(event)
                    self._next_revision = event.mod_revision + 1
            return
        with self._lock:
            self._watch_id = None
        if isinstance(response, etcd3.exceptions.RevisionCompactedError):
            self._skip_compacted(response)
        else:
            _log.info("watch on %s lost its stream (%s); registering it again", self.key, response)
        # Not on this thread: registering waits for the watcher thread, which is the one running us.
        threading.Thread(target=self._register_until_done, name=f"etcd-rewatch-{self.key}", daemon=True).start()

    def _skip_compacted(self, error: etcd3.exceptions.RevisionCompactedError) -> None:
        """Resume at the oldest revision etcd still has; the changes before it cannot be delivered."""
        _log.warning("etcd compacted its history past revision %d: changes of %s from revision %d to %d were "
                     "not delivered", error.compacted_revision, self.key, self._next_revision,
                     error.compacted_revision - 1)
        self._next_revision = error.compacted_revision

    def _deliver(self, event) -> None:
        if isinstance(event, etcd3.events.PutEvent):
            watch_event = WatchEvent("put", event.key.decode(), event.value, event.mod_revision)
        else:
            watch_event = WatchEvent("delete", event.key.decode(), None, event.mod_revision)
        try:
            self.callback(watch_event)
        except Exception:
            _log.exception("watch callback for %s failed on %s", self.key, watch_event)

    def _register_until_done(self) -> None:
        delay = 0.1
        while not (self._cancelled.is_set() or self._store._closed):
            try:
                self._register()
                return
            except etcd3.exceptions.RevisionCompactedError as error:
                self._skip_compacted(error)
                continue
            except StoreError as error:
                _log.debug("re-registering watch on %s: %s", self.key, error)
            self._cancelled.wait(delay)
            delay = min(2 * delay, 2.0)

    def cancel(self) -> None:
        with self._lock:
            self._cancelled.set()
            watch_id, self._watch_id = self._watch_id, None
        self._store._forget_watch(self)
        if watch_id is not None:
            self._store._cancel_watch(watch_id)


class EtcdStore(MetadataStore):
    """A client of the etcd cluster at `endpoints`; the constructor checks that etcd answers."""

    def __init__(self, endpoints: Sequence[str], timeout: float = DEFAULT_TIMEOUT_SECONDS):
        host_ports = parse_endpoints(endpoints)
        self.endpoints = [f"http://{host}:{port}" for host, port in host_ports]
        self.endpoints_text = ", ".join(self.endpoints)
        self.timeout = timeout
        self._closed = False
        self._watches: set[EtcdWatch] = set()
        self._watch_lock = threading.Lock()
        self._client = etcd3.MultiEndpointEtcd3Client(
            endpoints=[etcd3.Endpoint(host, port, secure=False, time_retry=ENDPOINT_RETRY_SECONDS, opts=GRPC_OPTIONS)
                       for host, port in host_ports],
            timeout=timeout, failover=True,
        )
        try:
            self._call("connect", self._client.status)
        except StoreError:
            self._client.close()
            raise

    def __repr__(self) -> str:
        return f"EtcdStore({self.endpoints!r})"

    def _unavailable(self, detail: str) -> StoreUnavailable:
        return StoreUnavailable(f"cannot reach etcd at {self.endpoints_text} ({detail}): is etcd running at "
                                f"{self.endpoints_text}? check control.etcd_endpoints")

    @contextlib.contextmanager
    def _translated_errors(self, operation: str) -> Iterator[None]:
        """python-etcd3 and gRPC errors as StoreError subclasses."""
        if self._closed:
            raise StoreError("the metadata store is closed")
        try:
            yield
        except _UNAVAILABLE_ERRORS as error:
            # python-etcd3 raises these from the gRPC error, dropping its details; show them.
            cause = error.__context__
            if isinstance(cause, grpc.RpcError):
                detail = cause.details()
            elif isinstance(error, etcd3.exceptions.NoServerAvailableError):
                detail = f"every endpoint failed within the last {ENDPOINT_RETRY_SECONDS:g} s"
            else:
                detail = str(error) or type(error).__name__
            raise self._unavailable(f"{operation}: {detail}") from error
        except etcd3.exceptions.RevisionCompactedError:
            raise  # a watch's start revision is gone: EtcdWatch resumes after it
        except grpc.RpcError as error:  # codes python-etcd3 passes through unchanged
            code, details = error.code(), error.details()
            if code == grpc.StatusCode.NOT_FOUND and "lease not found" in (details or ""):
                raise LeaseExpired(f"{operation}: the lease has expired or was revoked") from error
            if code in _UNAVAILABLE_CODES:
                raise self._unavailable(f"{operation}: {details}") from error
            raise StoreError(f"etcd at {self.endpoints_text}: {operation} failed: {code.name}: {details}") from error
        except etcd3.exceptions.Etcd3Exception as error:
            raise StoreError(f"etcd at {self.endpoints_text}: {operation} failed: {type(error).__name__} {error}") \
                from error

    def _call(self, operation: str, function: Callable[[], Result]) -> Result:
        with self._translated_errors(operation):
            return function()

    def _lease_id(self, lease: Lease | None) -> int:
        if lease is None:
            return 0
        if not isinstance(lease, EtcdLease) or lease._store is not self:
            raise TypeError(f"{lease!r} was not granted by this EtcdStore")
        return lease.id

    def get(self, key: str) -> bytes | None:
        check_key(key)
        value, _metadata = self._call("get", lambda: self._client.get(key))
        return value

    def get_prefix(self, prefix: str) -> dict[str, bytes]:
        check_key(prefix, "prefix")
        response = self._call("get prefix", lambda: self._client.get_prefix_response(
            prefix, sort_order="ascend", sort_target="key"))
        return {kv.key.decode(): kv.value for kv in response.kvs}

    def put(self, key: str, value: Value, lease: Lease | None = None) -> None:
        check_key(key)
        value, lease_id = to_bytes(value), self._lease_id(lease)
        self._call("put", lambda: self._client.put(key, value, lease=lease_id))

    def put_many(self, values: Mapping[str, Value], *, expected: Mapping[str, Value | None] | None = None,
                 lease: Lease | None = None) -> bool:
        encoded, compares = check_put_many(values, expected)
        lease_id = self._lease_id(lease)
        transactions = self._client.transactions
        conditions = [transactions.version(key) == 0 if value is None else transactions.value(key) == value
                      for key, value in compares.items()]
        puts = [transactions.put(key, value, lease=lease_id) for key, value in encoded.items()]
        succeeded, _responses = self._call("transaction", lambda: self._client.transaction(
            compare=conditions, success=puts, failure=[]))
        return succeeded

    def delete(self, key: str) -> bool:
        check_key(key)
        return self._call("delete", lambda: self._client.delete(key))

    def delete_prefix(self, prefix: str) -> int:
        check_key(prefix, "prefix")
        return self._call("delete prefix", lambda: self._client.delete_prefix(prefix)).deleted

    def lease(self, ttl_seconds: int) -> Lease:
        check_ttl(ttl_seconds)
        granted = self._call("grant lease", lambda: self._client.lease(ttl_seconds))
        return EtcdLease(self, granted.id, granted.ttl)

    def watch(self, key: str, callback: WatchCallback, prefix: bool = True) -> Watch:
        check_key(key)
        watch = EtcdWatch(self, key, callback, prefix)
        with self._watch_lock:
            self._watches.add(watch)
        return watch

    def _current_revision(self, key: str) -> int:
        return self._call("get revision", lambda: self._client.get_response(key, count_only=True)).header.revision

    def _add_watch(self, key: str, callback: Callable, prefix: bool, start_revision: int) -> int:
        range_end = etcd3.utils.prefix_range_end(key.encode()) if prefix else None
        # One registration at a time: python-etcd3 creates its shared watcher lazily and not thread-safely.
        with self._watch_lock:
            return self._call("watch", lambda: self._client.add_watch_callback(
                key, callback, range_end=range_end, start_revision=start_revision))

    def _cancel_watch(self, watch_id: int) -> None:
        try:
            self._call("cancel watch", lambda: self._client.cancel_watch(watch_id))
        except (StoreError, ValueError):
            pass  # the stream is gone, and the watch with it

    def _forget_watch(self, watch: EtcdWatch) -> None:
        with self._watch_lock:
            self._watches.discard(watch)

    def close(self) -> None:
        if self._closed:
            return
        with self._watch_lock:
            self._closed = True
            watches, self._watches = self._watches, set()
        for watch in watches:
            watch._cancelled.set()
        self._client.close()
