"""The run-metadata store: one behaviour suite run on MemoryStore and on a real etcd server.

The etcd server (tests/etcd_server.py) listens on free 127.0.0.1 ports with a temporary data dir;
the etcd-only tests stop and restart it to check outages and watch recovery.
"""
from __future__ import annotations

import queue
import shutil
import socket
import threading
import time
import uuid

import pytest
from pydantic import BaseModel

from etcd_server import CuttableProxy, etcd_server  # noqa: F401 (etcd_server is a pytest fixture)
from megatron_rl.config import ControlConfig
from megatron_rl.control import (
    LeaseExpired, MemoryStore, StoreError, StoreUnavailable, WatchEvent, run_prefix, store_from_config,
)
from megatron_rl.control.etcd_store import EtcdStore
from megatron_rl.errors import UserError

EVENT_TIMEOUT = 10.0


class Phase(BaseModel):
    name: str
    iteration: int


class Events:
    """A watch callback that queues events for the test thread."""

    def __init__(self):
        self.queue: queue.Queue[WatchEvent] = queue.Queue()

    def __call__(self, event: WatchEvent) -> None:
        self.queue.put(event)

    def take(self, count: int) -> list[tuple[str, str, bytes | None]]:
        return [self.take_event() for _ in range(count)]

    def take_event(self) -> tuple[str, str, bytes | None]:
        event = self.queue.get(timeout=EVENT_TIMEOUT)
        return event.kind, event.key, event.value

    def pending(self) -> int:
        return self.queue.qsize()


def retry_while_unavailable(operation, timeout: float = 15.0):
    """Run `operation` until etcd answers again after a restart."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return operation()
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture(params=["memory", "etcd"])
def open_client(request):
    """Opens clients of one store through `store_from_config`: for etcd each is a new connection to the
    test server; in memory they are the one shared instance (as in-process components share it)."""
    opened = []
    if request.param == "memory":
        shared = store_from_config(ControlConfig(store="memory"))
        assert isinstance(shared, MemoryStore)
        opened.append(shared)

        def open_store():
            return shared
    else:
        server = request.getfixturevalue("etcd_server")

        def open_store():
            client = store_from_config(ControlConfig(store="etcd", etcd_endpoints=[server.endpoint]))
            assert isinstance(client, EtcdStore)
            opened.append(client)
            return client
    yield open_store
    for client in opened:
        client.close()


@pytest.fixture
def store(open_client):
    return open_client()


@pytest.fixture
def prefix():
    """A key prefix of this test alone (the etcd server is shared by the session)."""
    return f"/test/{uuid.uuid4().hex}/"


def test_put_get_delete_and_prefix_listing(store, prefix):
    for name in ("b", "a/2", "c", "a/1"):
        store.put(prefix + name, f"value {name}")
    store.put(prefix + "bytes", b"\x00\xff")
    store.put(prefix[:-1] + "-sibling", "outside the prefix")

    assert store.get(prefix + "c") == b"value c"
    assert store.get(prefix + "bytes") == b"\x00\xff"
    assert store.get(prefix + "missing") is None
    listing = store.get_prefix(prefix)
    assert list(listing) == [prefix + name for name in ("a/1", "a/2", "b", "bytes", "c")]
    assert listing[prefix + "a/2"] == b"value a/2"
    assert store.get_prefix(prefix + "a/") == {prefix + "a/1": b"value a/1", prefix + "a/2": b"value a/2"}

    store.put(prefix + "c", "changed")
    assert store.get(prefix + "c") == b"changed"
    assert store.delete(prefix + "c") is True
    assert store.delete(prefix + "c") is False
    assert store.get(prefix + "c") is None
    assert store.delete_prefix(prefix + "a/") == 2
    assert list(store.get_prefix(prefix)) == [prefix + "b", prefix + "bytes"]
    assert store.get(prefix[:-1] + "-sibling") == b"outside the prefix"
    store.delete(prefix[:-1] + "-sibling")


def test_json_records(store, prefix):
    store.put_json(prefix + "phase", Phase(name="rollout", iteration=3))
    assert Phase.model_validate(store.get_json(prefix + "phase")) == Phase(name="rollout", iteration=3)
    store.put_json(prefix + "status", {"pid": 41, "healthy": True})
    assert store.get_json(prefix + "status") == {"pid": 41, "healthy": True}
    assert store.get_json(prefix + "missing") is None
    store.put(prefix + "garbage", "not json {")
    with pytest.raises(StoreError, match="garbage.*not JSON"):
        store.get_json(prefix + "garbage")


def test_put_many_is_all_or_nothing(store, prefix):
    store.put(prefix + "phase", "rollout")
    applied = store.put_many({prefix + "phase": "train", prefix + "iteration": "4"},
                             expected={prefix + "phase": "eval"})
    assert applied is False
    assert store.get(prefix + "phase") == b"rollout"
    assert store.get(prefix + "iteration") is None

    applied = store.put_many({prefix + "phase": "train", prefix + "iteration": "4"},
                             expected={prefix + "phase": "rollout", prefix + "iteration": None})
    assert applied is True
    assert store.get_prefix(prefix) == {prefix + "iteration": b"4", prefix + "phase": b"train"}


def test_compare_and_swap_lets_exactly_one_of_racing_writers_win(open_client, prefix):
    clients = [open_client(), open_client()]
    writers_per_client = 3
    writers = len(clients) * writers_per_client
    barrier = threading.Barrier(writers)
    outcomes: dict[tuple[int, str], bool] = {}

    def race(writer: int, round_name: str, key: str, expected: str | None) -> None:
        client = clients[writer % len(clients)]
        barrier.wait(timeout=20)
        outcomes[(writer, round_name)] = client.put_if(key, f"{round_name} by {writer}", expected)

    def run_round(round_name: str, key: str, expected: str | None) -> int:
        threads = [threading.Thread(target=race, args=(writer, round_name, key, expected)) for writer in range(writers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        winners = [writer for writer in range(writers) if outcomes[(writer, round_name)]]
        assert len(winners) == 1, f"{round_name}: winners {winners}"
        assert clients[0].get(key) == f"{round_name} by {winners[0]}".encode()
        return winners[0]

    # Create-if-absent: several writers register the same run leader; one gets it.
    run_round("create", prefix + "leader", None)
    # Phase transitions, each from the value the previous round left.
    key = prefix + "phase"
    clients[1].put(key, "start")
    expected = "start"
    for round_index in range(3):
        winner = run_round(f"phase{round_index}", key, expected)
        expected = f"phase{round_index} by {winner}"
    assert clients[0].put_if(key, "stale", "start") is False
    assert clients[0].put_if(key, "again", None) is False
    assert clients[0].get(key) == expected.encode()


def test_lease_keep_alive_then_expiry(store, prefix):
    events = Events()
    watch = store.watch(prefix, events)
    lease = store.lease(1)
    assert lease.ttl >= 1
    store.put(prefix + "heartbeat", "alive", lease=lease)
    store.put(prefix + "durable", "stays")

    with lease.keep_alive(interval=0.25) as keep_alive:
        time.sleep(max(2.0, 2 * lease.ttl))  # twice the TTL: only the keep-alive kept the key
        assert store.get(prefix + "heartbeat") == b"alive"
        assert not keep_alive.lost.is_set()
    # Nobody touches the store now: the expiry alone must delete the key and tell the watcher.
    assert events.take(3) == [("put", prefix + "heartbeat", b"alive"), ("put", prefix + "durable", b"stays"),
                              ("delete", prefix + "heartbeat", None)]
    assert store.get(prefix + "heartbeat") is None
    assert store.get(prefix + "durable") == b"stays"
    watch.cancel()

    with pytest.raises(LeaseExpired):
        lease.refresh()
    with pytest.raises(LeaseExpired):
        store.put(prefix + "late", "x", lease=lease)
    assert store.get(prefix + "late") is None
    lost = []
    keep_alive = lease.keep_alive(interval=0.05, on_lost=lost.append)
    assert keep_alive.lost.wait(EVENT_TIMEOUT)
    keep_alive.stop()
    assert lost == [lease]


def test_revoke_removes_the_lease_keys(store, prefix):
    with store.lease(30) as lease:
        store.put(prefix + "shard/0", "a", lease=lease)
        store.put_many({prefix + "shard/1": "b", prefix + "shard/2": "c"}, lease=lease)
        assert len(store.get_prefix(prefix)) == 3
    assert store.get_prefix(prefix) == {}
    lease.revoke()  # idempotent
    with pytest.raises(LeaseExpired):
        lease.refresh()


def test_watch_delivers_changes_in_order(store, prefix):
    everything, exact = Events(), Events()
    prefix_watch = store.watch(prefix, everything)
    exact_watch = store.watch(prefix + "a", exact, prefix=False)
    store.put(prefix + "a", "1")
    store.put(prefix + "ab", "2")  # shares the exact key's prefix but is another key
    store.put(prefix + "a", "3")
    store.delete(prefix + "a")
    store.put_many({prefix + "c": "4", prefix + "d": "5"})
    store.delete_prefix(prefix)

    received = [everything.queue.get(timeout=EVENT_TIMEOUT) for _ in range(9)]
    assert [(event.kind, event.key, event.value) for event in received] == [
        ("put", prefix + "a", b"1"), ("put", prefix + "ab", b"2"), ("put", prefix + "a", b"3"),
        ("delete", prefix + "a", None), ("put", prefix + "c", b"4"), ("put", prefix + "d", b"5"),
        ("delete", prefix + "ab", None), ("delete", prefix + "c", None), ("delete", prefix + "d", None),
    ]
    revisions = [event.revision for event in received]
    assert revisions[:5] == sorted(set(revisions[:5]))  # one revision per single-key change
    assert revisions[4] == revisions[5] < revisions[6] == revisions[7] == revisions[8]  # transactions share one
    assert exact.take(3) == [("put", prefix + "a", b"1"), ("put", prefix + "a", b"3"), ("delete", prefix + "a", None)]

    exact_watch.cancel()
    exact_watch.cancel()  # idempotent
    store.put(prefix + "a", "after cancel")
    assert everything.take_event() == ("put", prefix + "a", b"after cancel")
    assert exact.pending() == 0  # the prefix watch saw the change, so the cancelled one would have too
    prefix_watch.cancel()


def test_failing_callback_does_not_stop_the_watch(store, prefix):
    events = Events()

    def callback(event: WatchEvent) -> None:
        if event.value == b"boom":
            raise RuntimeError("callback bug")
        events(event)

    with store.watch(prefix, callback):
        store.put(prefix + "x", "boom")
        store.put(prefix + "x", "fine")
        assert events.take_event() == ("put", prefix + "x", b"fine")


def test_closed_store_refuses_calls(open_client):
    store = open_client()
    store.close()
    store.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        store.get("/anything")


# ------------------------------------------------------------------------------------------- etcd only


def test_etcd_down_raises_store_unavailable_and_keeps_data(etcd_server, prefix):  # noqa: F811
    timeout = 2.0
    store = EtcdStore([etcd_server.endpoint], timeout=timeout)
    try:
        store.put_many({prefix + "phase": "train", prefix + "iteration": "7"})
        etcd_server.stop()
        for attempt in (lambda: store.get(prefix + "phase"),
                        lambda: store.put_many({prefix + "phase": "rollout", prefix + "new": "x"}),
                        lambda: store.put_if(prefix + "phase", "rollout", "train"),
                        lambda: store.lease(5),
                        lambda: EtcdStore([etcd_server.endpoint], timeout=timeout)):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as raised:
                attempt()
            assert time.monotonic() - started < timeout + 3.0  # bounded by the call timeout: no hang
            message = str(raised.value)
            assert etcd_server.endpoint in message and "control.etcd_endpoints" in message
        assert isinstance(raised.value, UserError)  # the CLI prints it as one line
    finally:
        etcd_server.start()
    try:
        assert retry_while_unavailable(lambda: store.get_prefix(prefix)) == {
            prefix + "iteration": b"7", prefix + "phase": b"train"}  # no part of the failed writes landed
        assert store.put_if(prefix + "phase", "rollout", "train") is True
    finally:
        store.close()


def test_etcd_watch_survives_a_restart_without_losing_events(etcd_server, prefix):  # noqa: F811
    watcher_store = EtcdStore([etcd_server.endpoint])
    events = Events()
    try:
        watcher_store.watch(prefix, events)
        watcher_store.put(prefix + "before", "1")
        assert events.take_event() == ("put", prefix + "before", b"1")
        etcd_server.stop()
        etcd_server.start()
        # Another client writes as soon as etcd is back, possibly before the watch is registered again.
        with EtcdStore([etcd_server.endpoint]) as writer:
            writer.put(prefix + "after", "2")
            writer.delete(prefix + "before")
        assert events.take(2) == [("put", prefix + "after", b"2"), ("delete", prefix + "before", None)]
        watcher_store.put(prefix + "sentinel", "3")
        assert events.take_event() == ("put", prefix + "sentinel", b"3")  # and nothing was delivered twice
    finally:
        watcher_store.close()
        if not etcd_server.running:
            etcd_server.start()


def test_etcd_watch_resumes_after_its_history_was_compacted(etcd_server, prefix, caplog):  # noqa: F811
    proxy = CuttableProxy(etcd_server.client_port)
    watcher_store, writer = EtcdStore([proxy.endpoint]), EtcdStore([etcd_server.endpoint])
    events = Events()
    try:
        watcher_store.watch(prefix, events)
        writer.put(prefix + "a", "1")
        assert events.take_event() == ("put", prefix + "a", b"1")
        proxy.cut()  # the watcher is partitioned while etcd moves on and forgets the history it missed
        writer.put(prefix + "b", "2")
        writer.put(prefix + "c", "3")
        compacted_revision = etcd_server.compact()
        proxy.restore()
        # The oldest change etcd still has is c; b is gone for good, and the watch says so and goes on.
        assert events.take_event() == ("put", prefix + "c", b"3")
        writer.put(prefix + "d", "4")
        assert events.take_event() == ("put", prefix + "d", b"4")
        assert f"etcd compacted its history past revision {compacted_revision}" in caplog.text
    finally:
        watcher_store.close()
        writer.close()
        proxy.close()


def test_etcd_watch_follows_an_etcd_that_lost_its_data(etcd_server, prefix):  # noqa: F811
    store = EtcdStore([etcd_server.endpoint])
    events = Events()
    try:
        store.watch(prefix, events)
        for index in range(30):  # the watch's next revision is now above 30
            store.put(prefix + "old", str(index))
        assert events.take(30)[-1] == ("put", prefix + "old", b"29")
        etcd_server.stop()
        shutil.rmtree(etcd_server.data_dir)  # like an etcd pod restarted without its volume
        etcd_server.start()
        # A fresh etcd counts revisions from 1 again: a watch waiting for revision 31 would stay deaf
        # through these 10 changes. It registers again at some point and must see the changes after that.
        for index in range(10):
            retry_while_unavailable(lambda: store.put(prefix + "new", str(index)))
            try:
                event = events.queue.get(timeout=0.5)
                break
            except queue.Empty:
                continue
        else:
            pytest.fail("the watch received nothing after etcd came back empty")
        assert (event.kind, event.key) == ("put", prefix + "new")
    finally:
        store.close()
        if not etcd_server.running:
            etcd_server.start()


def test_etcd_that_stops_answering_times_out(etcd_server, prefix):  # noqa: F811
    timeout = 1.0
    store = EtcdStore([etcd_server.endpoint], timeout=timeout)
    store.put(prefix + "phase", "train")
    etcd_server.freeze()  # connected, then silent: a hung etcd
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="control.etcd_endpoints"):
            store.get(prefix + "phase")
        assert time.monotonic() - started < timeout + 3.0
    finally:
        etcd_server.thaw()
    try:
        assert retry_while_unavailable(lambda: store.get(prefix + "phase")) == b"train"
    finally:
        store.close()


def test_etcd_endpoint_that_never_answers_times_out():
    # A port where something that is not etcd listens: TCP connects, then no gRPC handshake ever comes.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        endpoint = f"127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match=f"cannot reach etcd at http://{endpoint}.*control.etcd_endpoints"):
            EtcdStore([endpoint], timeout=1.0)
        assert time.monotonic() - started < 1.0 + 3.0


@pytest.mark.parametrize("endpoints", [[], ["https://10.0.0.1:2379"], ["etcd:notaport"], ["http://etcd:2379/v3"],
                                       ["ftp://etcd:2379"]])
def test_bad_etcd_endpoints_are_user_errors(endpoints):
    with pytest.raises(UserError, match="control.etcd_endpoints"):
        store_from_config(ControlConfig(store="etcd", etcd_endpoints=endpoints))


def test_run_prefix():
    assert run_prefix("exp-1") == "/megatron-rl/runs/exp-1/"
    for bad in ("", "a/b", " padded"):
        with pytest.raises(UserError, match="control.run_name"):
            run_prefix(bad)
