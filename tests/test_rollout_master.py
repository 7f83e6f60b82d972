"""The rollout master over real embedded-engine servers (tiny model, 127.0.0.1): load balancing, aborts,
retries, stale weights, and an engine killed mid-iteration."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, wait

import pytest

from engine_fixtures import greedy, stats, wait_for  # noqa: F401
from megatron_rl.net import free_port
from megatron_rl.rollout.client import EngineClient
from megatron_rl.rollout.engine_process import EmbeddedEngineProcess
from megatron_rl.rollout.master import RolloutFailed, RolloutMaster, StaleWeightsError
from megatron_rl.rollout.protocol import EngineError, GenerateRequest
from tiny_models import write_tiny_hf_model

SLOTS = 3


def start_engine(model, log_path, port=None) -> EmbeddedEngineProcess:
    engine = EmbeddedEngineProcess(model, log_path, port=port, load_format="auto", max_running_requests=SLOTS,
                                   extra_args=("--random-seed", "0"))
    engine.start(timeout=120)
    return engine


def start_two_engines(model, log_dir) -> list[EmbeddedEngineProcess]:
    with ThreadPoolExecutor(2) as pool:  # side by side: each start is mostly waiting for imports
        return list(pool.map(lambda index: start_engine(model, log_dir / f"engine-{index}.log"), range(2)))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny_hf_model(tmp_path_factory.mktemp("master-model") / "qwen3", "qwen3", seed=0)


@pytest.fixture(scope="module")
def two_engines(model, tmp_path_factory):
    engines = start_two_engines(model, tmp_path_factory.mktemp("master-engines"))
    try:
        yield engines
    finally:
        for engine in engines:
            engine.stop()


def prompt(index: int) -> list[int]:
    return [(7 * index + offset) % 120 + 3 for offset in range(5)]


def generate_request(index: int, tokens: int) -> GenerateRequest:
    return GenerateRequest(input_ids=prompt(index), sampling_params=greedy(tokens))


def test_requests_go_to_the_engine_with_the_fewest_queued_tokens(two_engines):
    clients = [EngineClient(engine.url, timeout=60) for engine in two_engines]
    with RolloutMaster(clients) as master:
        assert master.capacity == 2 * SLOTS  # read from each engine's /server_info
        long = master.submit(generate_request(0, 150))
        wait_for(lambda: any(stats(client)["num_running_reqs"] for client in clients), "the long request running")
        # Both engines have free slots: the short ones go where fewer tokens are queued, not to the first engine.
        short = [master.submit(generate_request(i, 6)) for i in (1, 2)]
        results = [future.result(timeout=120) for future in (long, *short)]
    assert [len(r.result.output_ids) for r in results] == [150, 6, 6]
    assert results[1].engine_url == results[2].engine_url != results[0].engine_url
    assert {r.attempts for r in results} == {1}


def test_abort_returns_partial_outputs_and_unsent_requests_resolve_empty(two_engines):
    client = EngineClient(two_engines[0].url, timeout=60)
    with RolloutMaster([client]) as master:
        futures = [master.submit(generate_request(i, 200)) for i in range(SLOTS + 2)]  # 2 wait in the master
        wait_for(lambda: len(progress := stats(client)["running_progress"]) == SLOTS and min(progress.values()) >= 3,
                 "tokens on every slot")
        master.abort(futures)
        done, pending = wait(futures, timeout=30)
        assert not pending
        results = [future.result() for future in futures]
    sent, unsent = results[:SLOTS], results[SLOTS:]
    assert all(r.result.finish_reason == "abort" and 0 < len(r.result.output_ids) < 200 for r in sent)
    assert all(len(r.result.output_logprobs) == len(r.result.output_ids) for r in sent)
    assert all(r.engine_url is None and r.result.output_ids == [] for r in unsent)
    assert stats(client)["num_running_reqs"] == 0


def test_a_rejected_request_fails_at_once_and_others_go_on(two_engines):
    client = EngineClient(two_engines[0].url, timeout=60)
    with RolloutMaster([client]) as master:
        too_long = GenerateRequest(input_ids=[5] * 300, sampling_params=greedy(4))  # context is 256
        bad, good = master.submit(too_long), master.submit(generate_request(1, 4))
        with pytest.raises(EngineError) as raised:
            bad.result(timeout=60)
        assert raised.value.status == 400 and "context length" in str(raised.value)
        assert len(good.result(timeout=60).result.output_ids) == 4


def test_an_answer_from_other_weights_is_a_stale_weights_error(two_engines):
    client = EngineClient(two_engines[1].url, timeout=60)
    client.update_weight_version("v2")
    try:
        with RolloutMaster([client]) as master:
            with pytest.raises(StaleWeightsError, match="weight version"):
                master.submit(generate_request(2, 3), weight_version="v1").result(timeout=60)
            assert master.submit(generate_request(2, 3), weight_version="v2").result(timeout=60).result.output_ids
    finally:
        client.update_weight_version("default")


def test_an_engine_killed_mid_iteration_hands_its_requests_to_the_other(model, tmp_path):
    engines = start_two_engines(model, tmp_path)
    try:
        clients = [EngineClient(engine.url, timeout=60) for engine in engines]
        master = RolloutMaster(clients, probe_interval=60)
        expected = {i: clients[1].generate([generate_request(i, 40)])[0].output_ids for i in range(12)}
        futures = {master.submit(generate_request(i, 40)): i for i in range(12)}
        wait_for(lambda: stats(clients[0])["num_running_reqs"] == SLOTS
                 and min(stats(clients[0])["running_progress"].values()) >= 5, "engine 0 busy with all its slots")
        engines[0].process.kill()  # SIGKILL: its connections break mid-request
        done, pending = wait(futures, timeout=120)
        assert not pending
        results = {futures[future]: future.result().result for future in done}
        completions = {futures[future]: future.result() for future in done}
        state = {engine.url: engine for engine in master.stats()}
        master.close()
    finally:
        for engine in engines:
            engine.stop()
    # Nothing lost or doubled: every request answered once, in full, with the tokens it would have had.
    assert sorted(results) == list(range(12))
    assert all(results[i].output_ids == expected[i] and results[i].finish_reason == "length" for i in results)
    retried = [i for i, c in completions.items() if c.attempts == 2]
    assert len(retried) >= SLOTS  # the requests running on engine 0 when it died ...
    assert all(completions[i].engine_url == clients[1].base_url for i in retried)  # ... finished on engine 1
    assert not state[clients[0].base_url].up and state[clients[0].base_url].lost == 1
    assert state[clients[1].base_url].completed == 12 - sum(c.engine_url == clients[0].base_url for c in completions.values())


def test_with_no_engine_left_recover_brings_one_back_or_the_requests_fail(model, tmp_path):
    port = free_port()
    engine = start_engine(model, tmp_path / "engine.log", port)
    client = EngineClient(engine.url, timeout=60)
    recoveries = []

    def recover(lost: EngineClient, weight_version: str | None) -> None:
        recoveries.append((lost.base_url, weight_version))
        recovered.append(start_engine(model, tmp_path / "engine-again.log", port))

    recovered: list[EmbeddedEngineProcess] = []
    try:
        with RolloutMaster([client], recover=recover) as master:
            engine.stop()
            result = master.submit(generate_request(3, 5), weight_version="default").result(timeout=120)
            assert len(result.result.output_ids) == 5 and result.attempts == 2
        assert recoveries == [(client.base_url, "default")]
        recovered[0].stop()
        with RolloutMaster([client], slots=2) as master:  # no recover: nothing can serve
            with pytest.raises(RolloutFailed, match="every engine is unreachable"):
                master.submit(generate_request(3, 5)).result(timeout=60)
    finally:
        for process in (engine, *recovered):
            process.stop()


def test_an_engine_back_without_the_expected_weights_gets_no_requests_until_it_serves_them(model, tmp_path):
    """What a pushed weight version (cuda_ipc, nccl) meets: the engine restarted after a crash serves other
    weights. It must stay out, not fail the requests as stale; the next sync lets it back in."""
    port = free_port()
    engines = [start_engine(model, tmp_path / "engine-0.log", port), start_engine(model, tmp_path / "engine-1.log")]
    restarted = None
    try:
        clients = [EngineClient(engine.url, timeout=60) for engine in engines]
        for client in clients:
            client.update_weight_version("v1")
        with RolloutMaster(clients, probe_interval=0.2) as master:
            first = [master.submit(generate_request(i, 40), weight_version="v1") for i in range(8)]
            wait_for(lambda: stats(clients[0])["num_running_reqs"] > 0, "engine 0 generating")
            engines[0].process.kill()
            assert all(f.result(timeout=120).result.finish_reason == "length" for f in first)
            restarted = start_engine(model, tmp_path / "engine-0-again.log", port)  # "default" weights
            waited = [master.submit(generate_request(i, 30), weight_version="v1") for i in range(8, 14)]
            assert all(f.result(timeout=120).engine_url == clients[1].base_url for f in waited)
            state = {engine.url: engine for engine in master.stats()}
            assert not state[clients[0].base_url].up
            clients[0].update_weight_version("v1")  # the next sync reached it
            wait_for(lambda: {e.url: e for e in master.stats()}[clients[0].base_url].up, "engine 0 taken back")
            later = [master.submit(generate_request(i, 30), weight_version="v1") for i in range(14, 20)]
            assert {f.result(timeout=120).engine_url for f in later} == {clients[0].base_url, clients[1].base_url}
    finally:
        for process in (*engines, *([restarted] if restarted else [])):
            process.stop()
