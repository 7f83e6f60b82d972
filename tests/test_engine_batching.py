"""Batched mode of the embedded engine against deterministic mode and transformers (real servers, tiny model).

The batched server prefills at most 8 tokens per forward, so prompts longer than that are prefilled in
chunks across steps while other requests decode.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from engine_fixtures import (  # noqa: F401 (fixtures)
    deterministic_client, deterministic_server, engine_models, greedy, hf, reference_logprobs, request,
    serve_engine, stats, wait_for,
)
from megatron_rl.errors import UserError
from megatron_rl.rollout import EngineClient, SamplingParams

CHUNK = 8
MIXED_PROMPTS = [[60], [3, 17, 5], [9, 1, 44, 12, 7, 100, 2], list(range(5, 125, 10)), list(range(100, 0, -4))]


@pytest.fixture(scope="module")
def batched_server(engine_models, tmp_path_factory):
    yield from serve_engine(engine_models, tmp_path_factory, "--chunked-prefill-size", str(CHUNK))


@pytest.fixture(scope="module")
def client(batched_server) -> EngineClient:
    return EngineClient(batched_server.url, timeout=60)


def assert_same_greedy(result, expected):
    """Same tokens; log-probs equal up to float rounding (batched arithmetic differs in the last bits)."""
    assert result.finish_reason == expected.finish_reason
    assert result.output_ids == expected.output_ids
    assert result.output_logprobs == pytest.approx(expected.output_logprobs, abs=1e-4)


@torch.no_grad()
def test_greedy_matches_deterministic_mode_and_transformers_generate(client, deterministic_client, hf):
    count = 16
    batched = client.generate([request(p, greedy(count)) for p in MIXED_PROMPTS])  # 1 to 25 prompt tokens at once
    deterministic = deterministic_client.generate([request(p, greedy(count)) for p in MIXED_PROMPTS])
    for prompt, ours, reference in zip(MIXED_PROMPTS, batched, deterministic):
        assert_same_greedy(ours, reference)
        generated = hf["a"].generate(torch.tensor([prompt]), max_new_tokens=count, do_sample=False,
                                     output_logits=True, return_dict_in_generate=True)
        assert ours.output_ids == generated.sequences[0, len(prompt):].tolist()
        expected = [float(torch.log_softmax(step[0].float(), -1)[token])
                    for step, token in zip(generated.logits, ours.output_ids)]
        assert ours.output_logprobs == pytest.approx(expected, abs=1e-4)


def test_sampled_logprobs_match_deterministic_mode(client, deterministic_client, hf):
    params = [SamplingParams(max_new_tokens=12, temperature=t, top_p=p, ignore_eos=True, sampling_seed=seed)
              for t, p, seed in ((1.0, 1.0, 1), (0.7, 0.9, 2), (1.3, 1.0, 3), (1.0, 0.8, 4), (0.5, 1.0, 5))]
    batched = client.generate([request(p, sp) for p, sp in zip(MIXED_PROMPTS, params)])
    again = client.generate([request(p, sp) for p, sp in zip(MIXED_PROMPTS, params)])
    deterministic = deterministic_client.generate([request(p, sp) for p, sp in zip(MIXED_PROMPTS, params)])
    for prompt, sp, ours, repeat, reference in zip(MIXED_PROMPTS, params, batched, again, deterministic):
        # per-request seeded generators: the same draws whatever the batch and the mode
        assert ours.output_ids == repeat.output_ids == reference.output_ids
        assert ours.output_logprobs == pytest.approx(reference.output_logprobs, abs=1e-4)
        expected = reference_logprobs(hf["a"], prompt, ours.output_ids, sp.temperature)
        assert ours.output_logprobs == pytest.approx(expected, abs=1e-4)


def test_requests_admitted_mid_decode_match_alone(client):
    long_prompt, short_prompt, chunked_prompt = [5, 4, 3, 2, 1], [3, 17, 5], list(range(10, 30))
    alone = {name: client.generate([request(prompt, greedy(count))])[0]
             for name, prompt, count in (("A", long_prompt, 120), ("B", short_prompt, 6), ("C", chunked_prompt, 5))}
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(client.generate, [request(long_prompt, greedy(120), rid="mid-A")])
        wait_for(lambda: stats(client)["running_progress"].get("mid-A", 0) >= 3, "mid-A to be decoding")
        client.pause_generation("in_place")  # B and C arrive while A is mid-decode
        assert "mid-A" in stats(client)["running_rids"], "mid-A finished before the pause; make it longer"
        later = pool.submit(client.generate, [request(short_prompt, greedy(6), rid="mid-B"),
                                              request(chunked_prompt, greedy(5), rid="mid-C")])
        wait_for(lambda: {"mid-B", "mid-C"} <= set(stats(client)["waiting_rids"]), "B and C to be queued")
        client.continue_generation()
        results = {r.rid[-1]: r for r in first.result(60) + later.result(60)}
    for name in "ABC":
        assert_same_greedy(results[name], alone[name])

    batches = [b for b in stats(client)["recent_batches"] if {"mid-A", "mid-B", "mid-C"} & set(b["rids"])]
    with_a = [b["step"] for b in batches if "mid-A" in b["rids"]]
    with_b = [b["step"] for b in batches if "mid-B" in b["rids"]]
    with_c = [b["step"] for b in batches if "mid-C" in b["rids"]]
    assert with_b[0] == with_c[0] and with_b[0] in with_a, "B and C joined A's batch at the next step"
    # B and C are prefilled packed (3 + 20 tokens, 8 per forward): B's prompt ends in the first chunk, C's
    # in the third; each then decodes one token per step. A decodes in every one of those steps.
    assert len(with_b) == 6 and len(with_c) == 3 + 4
    assert set(with_c) <= set(with_a)


def test_retract_resumes_and_completes(client):
    prompts = {"ret-A": [8, 6, 7, 5, 3, 0, 9], "ret-B": list(range(40, 60))}
    counts = {"ret-A": 150, "ret-B": 100}
    expected = {rid: client.generate([request(prompts[rid], greedy(counts[rid]))])[0] for rid in prompts}
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(client.generate, [request(prompts[rid], greedy(counts[rid]), rid=rid) for rid in prompts])
        wait_for(lambda: min(stats(client)["running_progress"].get(rid, 0) for rid in prompts) >= 2, "both to decode")
        client.pause_generation("retract")
        info = stats(client)
        client.continue_generation()
        results = {r.rid: r for r in running.result(60)}
    assert info["running_rids"] == [] and set(info["waiting_rids"]) == set(prompts)
    assert info["kv_cache_tokens"] == 0  # retraction dropped the batch cache; the KV is prefilled again
    for rid in prompts:
        assert_same_greedy(results[rid], expected[rid])


def test_abort_one_row_leaves_the_others_correct(client):
    prompts = {"row-A": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], "row-B": [4, 4, 4], "row-C": [77, 3]}
    counts = {"row-A": 240, "row-B": 200, "row-C": 180}
    expected = {rid: client.generate([request(prompts[rid], greedy(counts[rid]))])[0] for rid in ("row-B", "row-C")}
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(client.generate, [request(prompts[rid], greedy(counts[rid]), rid=rid) for rid in prompts])
        seen: list[dict] = []

        def all_decoding() -> bool:
            seen.append(stats(client))
            return min(seen[-1]["running_progress"].get(rid, 0) for rid in prompts) >= 2

        try:
            wait_for(all_decoding, "all to decode")
        except AssertionError:
            keys = ("running_progress", "waiting_rids", "paused", "max_running_requests", "kv_cache_tokens")
            raise AssertionError(f"the three rows were never seen decoding together; the engine's stats, first: "
                                 f"{[{k: s[k] for k in keys} for s in seen[:3]]}, last: "
                                 f"{[{k: s[k] for k in keys} for s in seen[-2:]]}") from None
        client.pause_generation("in_place")
        before = stats(client)
        client.abort_request("row-A")
        after = stats(client)
        client.continue_generation()
        results = {r.rid: r for r in running.result(60)}
    assert results["row-A"].finish_reason == "abort" and len(results["row-A"].output_ids) < 240
    for rid in ("row-B", "row-C"):
        assert_same_greedy(results[rid], expected[rid])
    # A's row, the longest, left the batch cache at once: one row fewer, and the columns only A used are cut
    assert after["running_rids"] == ["row-B", "row-C"]
    assert 0 < after["kv_cache_tokens"] < before["kv_cache_tokens"] * 2 / 3
    wait_for(lambda: stats(client)["kv_cache_tokens"] == 0, "the idle engine to hold no KV")


def test_released_kv_cache_holds_nothing_and_generation_resumes(client):
    before = client.generate([request(MIXED_PROMPTS[3], greedy(10))])[0]
    client.release_memory_occupation(["kv_cache"])
    try:
        assert stats(client)["kv_cache_tokens"] == 0 and stats(client)["released_tags"] == ["kv_cache"]
    finally:
        client.resume_memory_occupation(["kv_cache"])
    after = client.generate([request(MIXED_PROMPTS[3], greedy(10))])[0]
    assert after.output_ids == before.output_ids and after.output_logprobs == before.output_logprobs


def test_server_info_names_the_mode(client, deterministic_client):
    batched, deterministic = client.server_info(), deterministic_client.server_info()
    assert batched["enable_deterministic_inference"] is False and batched["chunked_prefill_size"] == CHUNK
    assert deterministic["enable_deterministic_inference"] is True and deterministic["chunked_prefill_size"] == 64
    assert batched["max_total_tokens"] > 10_000  # a quarter of RAM over a tiny model's KV bytes per token
    assert stats(client)["enable_deterministic_inference"] is False


@pytest.mark.parametrize("deterministic", [False, True])
def test_max_total_tokens_bounds_admission(engine_models, deterministic):
    from megatron_rl.rollout.embedded_engine import EmbeddedEngine, EngineRequest, RequestError

    engine = EmbeddedEngine(engine_models["a"], max_running_requests=8, max_total_tokens=70, random_seed=0,
                            enable_deterministic_inference=deterministic).start()

    def largest_batch(prefix: str) -> int:
        """The most requests of this rid prefix in one step."""
        return max(len([r for r in b["rids"] if r.startswith(prefix)]) for b in engine.stats()["recent_batches"])

    def largest_batch_with(rid: str) -> int:
        return max(len(b["rids"]) for b in engine.stats()["recent_batches"] if rid in b["rids"])

    try:
        with pytest.raises(RequestError, match="max-total-tokens"):
            engine.submit(EngineRequest([1, 2], greedy(69)))
        # 8 requests of 10 tokens at most (2 + 8): 7 fit in 70 slots in both modes
        futures = engine.submit_many([EngineRequest([i + 1, i + 2], greedy(8), rid=f"short-{i}") for i in range(8)])
        # then one of 35 ahead of 6 of 10: while it runs, batched mode fits 2 rows (2 × 35, rows × the
        # longest), deterministic mode 4 (35 + 3 × 10, the sum)
        futures += engine.submit_many([EngineRequest([9, 9], greedy(33), rid="mixed-long")] +
                                      [EngineRequest([i + 1, 3], greedy(8), rid=f"mixed-{i}") for i in range(6)])
        assert all(f.result(60).meta_info.finish_reason.type == "length" for f in futures)
        assert largest_batch("short-") == 7
        assert largest_batch_with("mixed-long") == (4 if deterministic else 2)
    finally:
        engine.shutdown()


def test_invalid_batching_settings_are_user_errors(tmp_path):
    from megatron_rl.rollout.embedded_engine import EmbeddedEngine

    for kwargs, flag in (({"chunked_prefill_size": 0}, "--chunked-prefill-size"),
                         ({"max_total_tokens": 0}, "--max-total-tokens")):
        with pytest.raises(UserError, match=flag):
            EmbeddedEngine(tmp_path, **kwargs)


def test_prefill_chunks_bound_the_tokens_per_forward(engine_models):
    """A long prompt is prefilled over ceil(len / chunk) steps, one bounded forward each."""
    from megatron_rl.rollout.embedded_engine import EmbeddedEngine, EngineRequest

    prompt = list(range(1, 61))
    for chunk, steps in ((CHUNK, math.ceil(60 / CHUNK)), (-1, 1)):
        engine = EmbeddedEngine(engine_models["a"], chunked_prefill_size=chunk, random_seed=0).start()
        try:
            result = engine.generate(EngineRequest(prompt, greedy(3), rid="p"), timeout=60)
            assert len(engine.stats()["recent_batches"]) == steps + 2  # then 2 decode steps
        finally:
            engine.shutdown()
        assert len(result.output_ids) == 3
