"""The phase orchestrator on both stores: the cycle, compare-and-swap against other drivers, outages."""
from __future__ import annotations

import time
import uuid

import pytest

from etcd_server import etcd_server  # noqa: F401 (a pytest fixture)
from megatron_rl.control import MemoryStore, StoreUnavailable, run_prefix
from megatron_rl.control.etcd_store import EtcdStore
from megatron_rl.errors import RunError
from megatron_rl.hybrid.phases import PhaseOrchestrator, PhaseRecord, PhaseTransition

CYCLE = ["rollout", "release", "onload", "train", "offload", "sync"]


@pytest.fixture(params=["memory", "etcd"])
def store(request):
    if request.param == "memory":
        store = MemoryStore()
    else:
        store = EtcdStore([request.getfixturevalue("etcd_server").endpoint], timeout=2.0)
    yield store
    store.close()


@pytest.fixture
def run_name():
    return f"run-{uuid.uuid4().hex[:8]}"


def record(store, run_name) -> PhaseRecord:
    return PhaseRecord.model_validate_json(store.get(run_prefix(run_name) + "phase"))


def run_iterations(orchestrator: PhaseOrchestrator, iterations: int) -> list[dict[str, float]]:
    orchestrator.start()
    orchestrator.enter("sync", 0, "0")
    orchestrator.take_seconds()  # the first sync is the run's start-up, not an iteration's
    seconds = []
    for iteration in range(1, iterations + 1):
        for phase in CYCLE:
            orchestrator.enter(phase, iteration, str(iteration - 1) if phase != "sync" else str(iteration))
        seconds.append(orchestrator.take_seconds())
    orchestrator.enter("done", iterations, str(iterations))
    return seconds


def test_the_cycle_is_published_with_every_transition_and_its_duration(store, run_name):
    orchestrator = PhaseOrchestrator(store, run_name)
    seconds = run_iterations(orchestrator, 2)
    final = record(store, run_name)
    assert (final.phase, final.iteration, final.weight_version) == ("done", 2, "2")
    transitions = store.get_prefix(run_prefix(run_name) + "transitions/")
    names = [key.rsplit("/", 2)[-2:] for key in transitions]
    assert names[:2] == [["00000000", "01-starting"], ["00000000", "02-sync"]]
    assert [name for folder, name in names if folder == "00000001"] == [
        "01-rollout", "02-release", "03-onload", "04-train", "05-offload", "06-sync"]
    parsed = [PhaseTransition.model_validate_json(value) for value in transitions.values()]
    assert all(t.seconds >= 0 for t in parsed) and parsed[-1].next_phase == "done"
    # Each iteration's seconds are those of its own phases, its sync counted up to the moment they are taken.
    assert set(seconds[0]) == set(seconds[1]) == set(CYCLE)


def test_seconds_taken_inside_a_phase_are_counted_once(store, run_name):
    orchestrator = PhaseOrchestrator(store, run_name)
    orchestrator.start()
    orchestrator.enter("sync", 0, "0")
    time.sleep(0.2)
    first = orchestrator.take_seconds()["sync"]
    time.sleep(0.3)
    orchestrator.enter("eval", 0, "0")  # the rest of that sync goes to the next take
    time.sleep(0.2)
    orchestrator.enter("rollout", 1, "0")  # evaluation time is not an iteration's
    second = orchestrator.take_seconds()
    assert 0.2 <= first < 0.3 and 0.3 <= second["sync"] < 0.45 and "eval" not in second


def test_a_transition_outside_the_cycle_is_refused(store, run_name):
    orchestrator = PhaseOrchestrator(store, run_name)
    orchestrator.start()
    orchestrator.enter("sync", 0, "0")
    with pytest.raises(RunError, match="phase train cannot follow sync"):
        orchestrator.enter("train", 1, "0")
    assert record(store, run_name).phase == "sync"  # nothing was written
    orchestrator.enter("failed", 1, "0")  # failed may follow anything
    assert record(store, run_name).phase == "failed"


def test_a_second_driver_cannot_take_a_running_run(store, run_name):
    first = PhaseOrchestrator(store, run_name, driver_lease_ttl_s=1)
    first.start()
    first.enter("sync", 0, "0")
    with pytest.raises(RunError, match=r"driven by .*\(phase sync of iteration 0\), which is alive"):
        PhaseOrchestrator(store, run_name, driver_lease_ttl_s=1).start()
    # Someone else overwrites the phase: the first driver notices at its next transition.
    store.put(run_prefix(run_name) + "phase", record(store, run_name).model_copy(update={"phase": "train"}).model_dump_json())
    with pytest.raises(RunError, match="changed under this driver .*found train"):
        first.enter("rollout", 1, "0")
    # A run that ended can be driven again under the same name.
    store.put(run_prefix(run_name) + "phase", record(store, run_name).model_copy(update={"phase": "done"}).model_dump_json())
    PhaseOrchestrator(store, run_name).start()
    assert record(store, run_name).phase == "starting"


def test_a_run_whose_driver_died_is_taken_over_once_its_lease_expires(store, run_name):
    crashed = PhaseOrchestrator(store, run_name, driver_lease_ttl_s=1)
    crashed.start()
    crashed.enter("sync", 0, "0")
    crashed._keep_alive.stop()  # the process dies: nobody refreshes its lease any more
    successor = PhaseOrchestrator(store, run_name, driver_lease_ttl_s=1)
    successor.driver = "restarted:1"
    successor.start()  # waits for the dead driver's record to expire
    assert record(store, run_name).driver == "restarted:1"
    assert store.get(run_prefix(run_name) + "driver") == b"restarted:1"
    successor.close()
    assert store.get(run_prefix(run_name) + "driver") is None

def test_etcd_down_is_a_clear_error_and_the_last_phase_survives(etcd_server, run_name):  # noqa: F811
    store = EtcdStore([etcd_server.endpoint], timeout=2.0)
    orchestrator = PhaseOrchestrator(store, run_name, unavailable_retry_s=1.0)
    orchestrator.start()
    orchestrator.enter("sync", 0, "0")
    etcd_server.stop()
    try:
        with pytest.raises(StoreUnavailable, match=f"is etcd running at {etcd_server.endpoint}"):
            orchestrator.enter("rollout", 1, "0")
    finally:
        etcd_server.start()
    # Nothing half-written: the record is the last one that was published, and the driver goes on
    # (its transitions ride out the moments until the client reconnects).
    reader = EtcdStore([etcd_server.endpoint], timeout=5.0)
    assert record(reader, run_name).phase == "sync"
    orchestrator.unavailable_retry_s = 15.0
    orchestrator.enter("rollout", 1, "0")
    assert record(reader, run_name).phase == "rollout"
    reader.close()
    store.close()
