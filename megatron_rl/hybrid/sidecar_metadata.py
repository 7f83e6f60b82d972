"""A sidecar's presence in the run's metadata store: its leased status record and operator commands.

Keys and formats: `sidecar_protocol.py`. The record is put with a lease of hybrid.sidecar_lease_ttl_s
that a background thread keeps alive, and re-put on every status change, so the trainer sees a dead
sidecar's record vanish within the TTL. Commands put at `commands/sidecar` (every pod) or
`commands/sidecar/<pod_name>` run one at a time on a worker thread and are acknowledged in the record.

The store is a dependency, not a lifeline: while it cannot be reached (at start or later) the engine
keeps serving, the failure is logged, and connecting, publishing and watching are retried until they
succeed. A lease lost in a long outage is replaced and the record put again.
"""
from __future__ import annotations

import collections
import json
import logging
import queue
import threading
from typing import Callable

from pydantic import ValidationError

from megatron_rl.control.store import KeepAlive, Lease, LeaseExpired, MetadataStore, StoreError, Watch, WatchEvent
from megatron_rl.hybrid.sidecar import Sidecar
from megatron_rl.hybrid.sidecar_protocol import (
    CommandResult, SidecarCommand, sidecar_command_keys, sidecar_record_key, utc_now,
)
from megatron_rl.rollout.protocol import describe_validation_error

__all__ = ["SidecarRegistration"]

_log = logging.getLogger(__name__)

REMEMBERED_COMMAND_IDS = 256  # ids already run, so a command put again (or seen on both keys) runs once


class SidecarRegistration:
    """Publishes `sidecar`'s status at `sidecars/<pod_name>` of `run_name` and runs operator commands.

    `connect()` returns the store (called again until it succeeds); with `close_store` the store is
    closed with the registration (a store of its own), else left open (one shared in process).
    """

    def __init__(self, sidecar: Sidecar, connect: Callable[[], MetadataStore], *, run_name: str,
                 lease_ttl_s: int, close_store: bool = True, retry_interval_s: float = 1.0):
        self.sidecar = sidecar
        self.record_key = sidecar_record_key(run_name, sidecar.pod_name)
        self.command_keys = sidecar_command_keys(run_name, sidecar.pod_name)
        self.lease_ttl_s = lease_ttl_s
        self.retry_interval_s = retry_interval_s
        self._connect = connect
        self._close_store = close_store
        self._store: MetadataStore | None = None
        self._lease: Lease | None = None
        self._keep_alive: KeepAlive | None = None
        self._watches: list[Watch] = []
        self._changed = threading.Event()  # the record must be put (again)
        self._stopped = threading.Event()
        self._commands: queue.SimpleQueue[SidecarCommand | None] = queue.SimpleQueue()
        self._seen_ids: collections.deque[str] = collections.deque(maxlen=REMEMBERED_COMMAND_IDS)
        self._seen_lock = threading.Lock()
        self._publisher = threading.Thread(target=self._publish_loop, name="sidecar-publisher", daemon=True)
        self._worker = threading.Thread(target=self._command_loop, name="sidecar-commands", daemon=True)

    def start(self) -> SidecarRegistration:
        self.sidecar.add_listener(lambda status: self._changed.set())
        self._changed.set()
        self._publisher.start()
        self._worker.start()
        return self

    # ------------------------------------------------------------------ publishing

    def _publish_loop(self) -> None:
        failing = False
        while not self._stopped.is_set():
            try:
                self._publish_once()
                if failing:
                    _log.info("sidecar %s: the metadata store is reachable again; record %s is up to date",
                              self.sidecar.pod_name, self.record_key)
                failing = False
                self._changed.wait()
            except Exception as error:  # noqa: BLE001 - nothing here may end publishing for good
                # Warn once per outage, not once per retry; a traceback only for what is not a store outage.
                (_log.debug if failing else _log.warning)(
                    "sidecar %s: cannot publish to the metadata store (the engine keeps serving; retrying every "
                    "%g s): %s", self.sidecar.pod_name, self.retry_interval_s, error,
                    exc_info=not isinstance(error, StoreError))
                failing = True
                self._changed.set()
                self._stopped.wait(self.retry_interval_s)

    def _publish_once(self) -> None:
        if self._store is None:
            self._store = self._connect()
        if not self._watches:
            self._watch_commands()
        if self._keep_alive is not None and self._keep_alive.lost.is_set():
            self._drop_lease()
        if self._lease is None:
            self._lease = self._store.lease(self.lease_ttl_s)
            self._keep_alive = self._lease.keep_alive(on_lost=lambda lease: self._changed.set())
        if self._changed.is_set() and not self._stopped.is_set():
            self._changed.clear()  # before reading the status: a change during the put is put next
            try:
                self._store.put_json(self.record_key, self.sidecar.status(), lease=self._lease)
            except LeaseExpired:
                self._drop_lease()
                self._changed.set()

    def _drop_lease(self) -> None:
        if self._keep_alive is not None:
            self._keep_alive.stop()
        self._keep_alive = None
        self._lease = None

    def _watch_commands(self) -> None:
        watches = []
        try:
            for key in self.command_keys:
                watches.append(self._store.watch(key, self._on_command, prefix=False))
        except StoreError:
            for watch in watches:
                watch.cancel()
            raise
        self._watches = watches

    # ------------------------------------------------------------------ commands

    def _on_command(self, event: WatchEvent) -> None:
        """Runs on the store's watch thread: parse and queue, never block."""
        if event.kind != "put" or event.value is None:
            return
        try:
            command = SidecarCommand.model_validate_json(event.value)
        except ValidationError as error:
            self._reject(event, describe_validation_error(error))
            return
        with self._seen_lock:
            if command.id in self._seen_ids:
                return
            self._seen_ids.append(command.id)
        self._commands.put(command)

    def _reject(self, event: WatchEvent, problem: str) -> None:
        """An invalid command is acknowledged as failed when it has an id and op to report, else logged."""
        _log.warning("sidecar %s: ignoring the invalid command at %s: %s", self.sidecar.pod_name, event.key, problem)
        try:
            document = json.loads(event.value)
            result = CommandResult(id=document["id"], op=document["op"], ok=False,
                                   message=f"invalid command at {event.key}: {problem}", finished_at=utc_now())
        except (ValueError, KeyError, TypeError, ValidationError):
            return
        self.sidecar.record_command(result)

    def _command_loop(self) -> None:
        while (command := self._commands.get()) is not None:
            self.sidecar.execute(command)

    # ------------------------------------------------------------------ shutdown

    def close(self) -> None:
        """Stop publishing and delete the record at once (revoking its lease). Idempotent."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._changed.set()
        self._commands.put(None)
        for thread in (self._publisher, self._worker):
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join()
        for watch in self._watches:
            watch.cancel()
        lease, keep_alive = self._lease, self._keep_alive
        if keep_alive is not None:
            keep_alive.stop()
        if lease is not None:
            try:
                lease.revoke()
            except StoreError as error:
                _log.warning("sidecar %s: could not revoke its lease (the record vanishes after %d s): %s",
                             self.sidecar.pod_name, self.lease_ttl_s, error)
        if self._store is not None and self._close_store:
            self._store.close()
