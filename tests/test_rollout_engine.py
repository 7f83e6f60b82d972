"""The embedded engine as a real HTTP server (subprocess, tiny model), driven by EngineClient.

Tests run against the default batched mode, except those asserting bitwise batch-invariance, which run
against a deterministic-mode server (--enable-deterministic-inference); tests/test_engine_batching.py
checks batched mode against deterministic mode and transformers."""
from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from engine_fixtures import (  # noqa: F401 (fixtures)
    deterministic_client, deterministic_server, engine_client, engine_models, engine_server, free_port, greedy, hf,
    reference_greedy, reference_logprobs, request, stats, wait_for,
)
from megatron_rl.errors import UserError
from megatron_rl.rollout import EngineClient, EngineError, EngineUnreachable, SamplingParams

PROMPTS = [[3, 17, 5], [9, 1, 44, 12, 7, 100, 2], [60], [11, 22, 33, 44, 55, 66, 77, 88, 99, 110, 120, 5]]


# ------------------------------------------------------------------------------------------ generation


def test_generate_batch_returns_tokens_logprobs_and_finish_reasons(engine_client):
    lengths = [5, 9, 1, 14]
    results = engine_client.generate([request(p, greedy(n)) for p, n in zip(PROMPTS, lengths)])
    for prompt, count, result in zip(PROMPTS, lengths, results):
        assert result.finish_reason == "length"
        assert len(result.output_ids) == result.completion_tokens == count
        assert len(result.output_logprobs) == count
        assert all(lp <= 0.0 for lp in result.output_logprobs)
        assert all(0 <= t < 128 for t in result.output_ids)
        assert result.prompt_tokens == len(prompt)
        assert result.weight_version == "default"
        assert result.text is None  # the tiny model has no tokenizer
    without = engine_client.generate([request(PROMPTS[0], greedy(3), return_logprob=False)])[0]
    assert without.output_logprobs is None and without.output_ids == results[0].output_ids[:3]


def test_stop_token_ids_stop_and_ignore_eos_disables_them(engine_client):
    free_run = engine_client.generate([request(PROMPTS[1], greedy(12))])[0].output_ids
    stop = free_run[4]
    first = free_run.index(stop)
    stopped = engine_client.generate([request(PROMPTS[1], SamplingParams(max_new_tokens=12, temperature=0.0,
                                                                        stop_token_ids=[stop]))])[0]
    assert stopped.finish_reason == "stop" and stopped.finish_matched == stop
    assert stopped.output_ids == free_run[:first + 1]  # the stop token is returned, as SGLang does
    ignored = engine_client.generate([request(PROMPTS[1], greedy(12, stop_token_ids=[stop]))])[0]
    assert ignored.finish_reason == "length" and ignored.output_ids == free_run  # SGLang: ignore_eos skips all stop ids


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_a_transformers_forward(engine_client, hf, temperature):
    params = [SamplingParams(max_new_tokens=10, temperature=temperature, ignore_eos=True, sampling_seed=seed)
              for seed in (1, 2, 3)]
    results = engine_client.generate([request(p, sp) for p, sp in zip(PROMPTS, params)])
    for prompt, result in zip(PROMPTS, results):
        expected = reference_logprobs(hf["a"], prompt, result.output_ids, temperature)
        assert result.output_logprobs == pytest.approx(expected, abs=1e-4)


def test_greedy_output_and_logprobs_match_transformers(engine_client, hf):
    result = engine_client.generate([request(PROMPTS[3], greedy(12))])[0]
    assert result.output_ids == reference_greedy(hf["a"], PROMPTS[3], 12)
    # greedy: SGLang returns log_softmax of the raw logits (temperature treated as 1)
    assert result.output_logprobs == pytest.approx(reference_logprobs(hf["a"], PROMPTS[3], result.output_ids), abs=1e-4)


def test_seeded_sampling_is_reproducible(deterministic_client):
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=50, ignore_eos=True, sampling_seed=7)
    first, second = deterministic_client.generate([request(PROMPTS[0], params), request(PROMPTS[0], params)])
    assert first.output_ids == second.output_ids and first.output_logprobs == second.output_logprobs


def test_greedy_continuation_is_identical_to_one_shot_whatever_the_batch(deterministic_client):
    total = 24
    one_shot = deterministic_client.generate([request(p, greedy(total)) for p in PROMPTS])  # 4 different lengths at once
    splits = [1, 5, 11, 23]
    distractors = [request([7] * n, greedy(m)) for n, m in ((2, 30), (19, 3), (8, 17))]
    continued = deterministic_client.generate(
        [request(p + r.output_ids[:k], greedy(total - k)) for p, r, k in zip(PROMPTS, one_shot, splits)] + distractors)
    alone = [deterministic_client.generate([request(p + r.output_ids[:k], greedy(total - k))])[0]
             for p, r, k in zip(PROMPTS, one_shot, splits)]
    for full, k, with_others, by_itself in zip(one_shot, splits, continued, alone):
        assert with_others.output_ids == full.output_ids[k:]
        assert by_itself.output_ids == full.output_ids[k:]
        # bitwise: every token is computed the same way whoever shares the batch
        assert with_others.output_logprobs == full.output_logprobs[k:] == by_itself.output_logprobs


# ------------------------------------------------------------------------------------------ scheduling


def test_continuous_batching_requests_join_and_leave_between_steps(engine_client):
    long_prompt = [5, 4, 3, 2, 1]
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(engine_client.generate, [request(long_prompt, greedy(200), rid="join-A")])
        wait_for(lambda: stats(engine_client)["running_progress"].get("join-A", 0) >= 2, "join-A to be decoding")
        engine_client.pause_generation("in_place")  # freeze A mid-generation: no timing in what follows
        assert "join-A" in stats(engine_client)["running_rids"], "join-A finished before the pause; make it longer"
        later = pool.submit(engine_client.generate, [request(PROMPTS[0], greedy(4), rid="join-B"),
                                                     request(PROMPTS[3], greedy(6), rid="join-C")])
        wait_for(lambda: {"join-B", "join-C"} <= set(stats(engine_client)["waiting_rids"]), "B and C to be queued")
        engine_client.continue_generation()
        results = {r.rid: r for r in first.result(60) + later.result(60)}
    assert [results[r].finish_reason for r in ("join-A", "join-B", "join-C")] == ["length"] * 3
    assert results["join-A"].output_ids == engine_client.generate([request(long_prompt, greedy(200))])[0].output_ids

    batches = [b for b in stats(engine_client)["recent_batches"] if {"join-A", "join-B", "join-C"} & set(b["rids"])]
    with_a = [b["step"] for b in batches if "join-A" in b["rids"]]
    with_b = [b["step"] for b in batches if "join-B" in b["rids"]]
    together = [b["step"] for b in batches if {"join-A", "join-B", "join-C"} <= set(b["rids"])]
    assert with_a[0] < with_b[0], "A ran alone before B arrived"
    assert together and together[0] == with_b[0], "B and C joined the running batch of A at the next step"
    assert with_a[-1] > with_b[-1], "B left while A kept decoding"
    assert len(with_b) == 4  # step 1 prefills B's 3 prompt tokens and samples token 1; 3 decode steps follow


def test_max_running_requests_bounds_the_batch(engine_client):
    results = engine_client.generate([request([i + 1, i + 2], greedy(6), rid=f"bound-{i}") for i in range(7)])
    assert all(r.finish_reason == "length" for r in results)
    sizes = [len([r for r in b["rids"] if r.startswith("bound-")]) for b in stats(engine_client)["recent_batches"]]
    assert max(sizes) == 4  # the server runs with --max-running-requests 4; 7 requests were queued at once


def test_pause_abort_returns_partial_outputs_and_holds_new_requests(engine_client):
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(engine_client.generate, [request([1, 2, 3, 4], greedy(240), rid="pause-A")])
        wait_for(lambda: stats(engine_client)["running_progress"].get("pause-A", 0) >= 3, "pause-A to be decoding")
        engine_client.pause_generation("abort")
        aborted = running.result(30)[0]
        assert aborted.finish_reason == "abort"
        assert 3 <= len(aborted.output_ids) < 240
        assert len(aborted.output_logprobs) == len(aborted.output_ids) == aborted.completion_tokens
        full = None
        held = pool.submit(engine_client.generate, [request([1, 2, 3, 4], greedy(240), rid="pause-held")])
        wait_for(lambda: "pause-held" in stats(engine_client)["waiting_rids"], "the new request to be held")
        assert not engine_client.health_generate()  # paused: SGLang's health_generate times out (503)
        engine_client.continue_generation()
        full = held.result(60)[0]
    assert full.finish_reason == "length"
    assert full.output_ids[:len(aborted.output_ids)] == aborted.output_ids  # partial output is a true prefix
    assert full.output_logprobs[:len(aborted.output_ids)] == aborted.output_logprobs


def test_pause_retract_resumes_with_identical_greedy_tokens(deterministic_client):
    prompt = [8, 6, 7, 5, 3, 0, 9]
    expected = deterministic_client.generate([request(prompt, greedy(150))])[0]
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(deterministic_client.generate, [request(prompt, greedy(150), rid="retract-A")])
        wait_for(lambda: stats(deterministic_client)["running_progress"].get("retract-A", 0) >= 2, "retract-A to be decoding")
        deterministic_client.pause_generation("retract")
        info = stats(deterministic_client)
        deterministic_client.continue_generation()
        result = running.result(60)[0]
    if "retract-A" in info["waiting_rids"]:  # it was retracted (not already finished)
        assert info["running_rids"] == []
    assert result.output_ids == expected.output_ids and result.output_logprobs == expected.output_logprobs


def test_abort_request_by_rid(engine_client):
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(engine_client.generate, [request([4, 4, 4], greedy(240), rid="abort-me"),
                                                       request([5, 5], greedy(3), rid="keep-me")])
        wait_for(lambda: stats(engine_client)["running_progress"].get("abort-me", 0) >= 1, "abort-me to be decoding")
        engine_client.abort_request("abort-me")
        aborted, kept = running.result(30)
    assert aborted.finish_reason == "abort" and aborted.finish_message == "Aborted" and len(aborted.output_ids) < 240
    assert kept.finish_reason == "length" and len(kept.output_ids) == 3


# ------------------------------------------------------------------------------------------ weights and memory


def test_update_weights_from_disk(engine_client, engine_models, hf):
    prompt = PROMPTS[1]
    before = engine_client.generate([request(prompt, greedy(10))])[0]
    try:
        result = engine_client.update_weights_from_disk(str(engine_models["b"]), weight_version="step-1")
        assert result.success
        assert engine_client.weight_version() == "step-1"
        after = engine_client.generate([request(prompt, greedy(10))])[0]
        assert after.weight_version == "step-1"
        assert after.output_ids == reference_greedy(hf["b"], prompt, 10) != before.output_ids
        assert after.output_logprobs == pytest.approx(reference_logprobs(hf["b"], prompt, after.output_ids), abs=1e-4)

        for bad_path, expected_text in ((engine_models["a"].parent / "missing", "does not exist"),
                                        (engine_models["other_family"], "do not match")):
            with pytest.raises(EngineError) as caught:
                engine_client.update_weights_from_disk(str(bad_path), weight_version="bad")
            assert caught.value.body["success"] is False and expected_text in caught.value.body["message"]
            assert "/update_weights_from_disk" in str(caught.value) and expected_text in str(caught.value)
            assert engine_client.weight_version() == "step-1"
            again = engine_client.generate([request(prompt, greedy(10))])[0]
            assert again.output_ids == after.output_ids and again.output_logprobs == after.output_logprobs
    finally:
        engine_client.update_weights_from_disk(str(engine_models["a"]), weight_version="default")
    restored = engine_client.generate([request(prompt, greedy(10))])[0]
    assert restored.output_ids == before.output_ids and restored.output_logprobs == before.output_logprobs


def test_release_and_resume_memory_keep_the_weights(engine_client):
    before = engine_client.generate([request(PROMPTS[2], greedy(12))])[0]
    engine_client.release_memory_occupation()  # all tags
    try:
        with pytest.raises(EngineError) as caught:
            engine_client.generate([request(PROMPTS[2], greedy(12))])
        assert caught.value.status == 503 and "released" in str(caught.value) and "/generate" in str(caught.value)
        assert not engine_client.health_generate()
        assert engine_client.health()  # liveness is unaffected
    finally:
        engine_client.resume_memory_occupation()
    after = engine_client.generate([request(PROMPTS[2], greedy(12))])[0]
    assert after.output_ids == before.output_ids and after.output_logprobs == before.output_logprobs
    assert engine_client.health_generate()

    engine_client.release_memory_occupation(["kv_cache"])
    with pytest.raises(EngineError, match="'weights' is not released"):
        engine_client.resume_memory_occupation(["weights"])  # SGLang raises too: the caller must track tags
    engine_client.resume_memory_occupation(["kv_cache"])


def test_release_needs_an_idle_engine(engine_client):
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(engine_client.generate, [request([1, 1], greedy(240), rid="busy")])
        wait_for(lambda: "busy" in stats(engine_client)["running_rids"], "busy to run")
        engine_client.pause_generation("in_place")
        try:
            with pytest.raises(EngineError, match="idle"):
                engine_client.release_memory_occupation(["weights"])
        finally:
            engine_client.abort_request(abort_all=True)
            engine_client.continue_generation()
        assert running.result(30)[0].finish_reason == "abort"


def test_weight_update_waits_for_running_requests_unless_paused(engine_client, engine_models):
    prompt = [2, 7, 1, 8]
    try:
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(engine_client.generate, [request(prompt, greedy(200), rid="drain-A")])
            wait_for(lambda: stats(engine_client)["running_progress"].get("drain-A", 0) >= 1, "drain-A to be decoding")
            update = pool.submit(engine_client.update_weights_from_disk, str(engine_models["b"]), "v-drain")
            first = running.result(60)[0]
            assert update.result(60).success
        # SGLang's writer lock: the update waited for the running request, which kept one weight version
        assert first.finish_reason == "length" and [s.version for s in first.weight_versions] == ["default"]

        # paused in place, the update runs at once; flush_cache must be false while requests hold KV
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(engine_client.generate, [request(prompt, greedy(200), rid="inplace-A")])
            wait_for(lambda: stats(engine_client)["running_progress"].get("inplace-A", 0) >= 1, "inplace-A to decode")
            engine_client.pause_generation("in_place")
            with pytest.raises(EngineError, match="cache was not flushed"):
                engine_client.update_weights_from_disk(str(engine_models["a"]), "v-a")
            engine_client.update_weights_from_disk(str(engine_models["b"]), "v-b", flush_cache=False)
            engine_client.continue_generation()
            mixed = running.result(60)[0]
        spans = [(s.version, s.start, s.end) for s in mixed.weight_versions]
        # the failed-flush update ("v-a") did load, but nothing was generated while paused
        assert [v for v, _, _ in spans] == ["v-drain", "v-b"]
        assert spans[0][1] == 0 and spans[0][2] == spans[1][1] >= 1 and spans[1][2] == 200
        assert mixed.weight_version == "v-b"
    finally:
        engine_client.update_weights_from_disk(str(engine_models["a"]), weight_version="default")


def test_dummy_load_format_then_weight_sync(engine_models, hf):
    from megatron_rl.rollout.embedded_engine import EmbeddedEngine, EngineRequest

    engine = EmbeddedEngine(engine_models["a"], load_format="dummy", random_seed=0, weight_version="init").start()
    try:
        prompt = PROMPTS[3]
        dummy = engine.generate(EngineRequest(prompt, greedy(8), rid="d1"), timeout=30)
        assert dummy.output_ids != reference_greedy(hf["a"], prompt, 8)  # random weights, not the checkpoint's
        result = engine.update_weights_from_disk(str(engine_models["a"]), weight_version="synced").result(30)
        assert result.success, result.message
        synced = engine.generate(EngineRequest(prompt, greedy(8), rid="d2"), timeout=30)
        assert synced.output_ids == reference_greedy(hf["a"], prompt, 8)
        assert synced.meta_info.weight_version == "synced"
    finally:
        engine.shutdown()


# ------------------------------------------------------------------------------------------ errors


def test_unreachable_engine_gives_a_clear_error():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(EngineUnreachable) as caught:
        EngineClient(url, timeout=5).get_model_info()
    message = str(caught.value)
    assert message.startswith(f"cannot reach engine at {url}:") and "is it running?" in message
    assert "/model_info" in message


def test_server_400_raises_engine_error_naming_the_endpoint(engine_client, engine_server):
    with pytest.raises(EngineError) as caught:
        engine_client.generate([request(list(range(1, 100)) * 3, greedy(4))])  # 297 tokens > 256 context
    error = caught.value
    assert error.status == 400 and error.endpoint == "/generate"
    assert f"{engine_server.url}/generate" in str(error) and "context length" in str(error)


def _post(url: str, body: bytes | None, method: str = "POST") -> tuple[int, dict | str]:
    http_request = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(http_request, timeout=30) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode()


@pytest.mark.parametrize("path, body, field", [
    ("/generate", b"{not json", "not valid JSON"),
    ("/generate", b"[1, 2]", "body"),
    ("/generate", b"{}", "input_ids"),
    ("/generate", b'{"input_ids": [1, "2"]}', "input_ids[1]"),
    ("/generate", b'{"input_ids": [1], "sampling_params": {"temperature": -1}}', "sampling_params.temperature"),
    ("/generate", b'{"input_ids": [1], "sampling_params": {"top_k": 0}}', "sampling_params.top_k"),
    ("/generate", b'{"input_ids": [1], "sampling_params": {"max_tokens": 3}}', "sampling_params.max_tokens"),
    ("/generate", b'{"input_ids": [1], "sampling_params": {"repetition_penalty": 1.1}}', "not supported"),
    ("/generate", b'{"input_ids": [[1], [2]], "rid": ["x"]}', "rid"),
    ("/generate", b'{"input_ids": [1], "stream": true}', "stream"),
    ("/generate", b'{"input_ids": [1], "return_logprob": "yes"}', "return_logprob"),
    ("/pause_generation", b'{"mode": "later"}', "mode"),
    ("/update_weights_from_disk", b'{"weight_version": "x"}', "model_path"),
    ("/release_memory_occupation", b'{"tags": "weights"}', "tags"),
    ("/abort_request", b'{"abort_all": "yes"}', "abort_all"),
])
def test_invalid_bodies_return_400_naming_the_field(engine_server, path, body, field):
    status, answer = _post(engine_server.url + path, body)
    assert status == 400, answer
    assert field in answer["error"]["message"]


def test_cli_registers_engine_serve():
    from megatron_rl.rollout import commands

    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["engine", "serve", "--model", "/m", "--port", "31000", "--load-format", "dummy",
                              "--max-running-requests", "3", "--weight-version", "v0"])
    assert args.handler is commands.run_serve
    assert (args.model, args.port, args.host, args.load_format, args.max_running_requests, args.weight_version) == \
        ("/m", 31000, "127.0.0.1", "dummy", 3, "v0")
    assert (args.enable_deterministic_inference, args.chunked_prefill_size, args.max_total_tokens) == (False, None, None)
    args.max_running_requests = 0
    with pytest.raises(UserError, match="--max-running-requests"):
        commands.run_serve(args)
    # SGLang's flag names for the batching settings
    args = parser.parse_args(["engine", "serve", "--model", "/m", "--enable-deterministic-inference",
                              "--chunked-prefill-size", "16", "--max-total-tokens", "4096"])
    assert (args.enable_deterministic_inference, args.chunked_prefill_size, args.max_total_tokens) == (True, 16, 4096)
