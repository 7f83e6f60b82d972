"""The in-memory weight paths (tensors by handle, broadcast in a process group) into a real engine server,
from a real megatron trainer on local gloo ranks, and the prompt log-probs that check them."""
from __future__ import annotations

import base64
import io
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from engine_fixtures import EngineServer
from megatron_rl.hybrid.weight_push import DistributedWeightSync, TensorWeightSync
from megatron_rl.rollout import EngineClient, EngineError, GenerateRequest, SamplingParams
from megatron_rl.rollout.embedded_engine import EmbeddedEngine, EngineRequest, RequestError
from megatron_rl.rollout.weight_transport import FLATTENED_BUCKET, dump_payload, flatten, shared_buffer
from megatron_rl.train import parallel
from test_trainer import make_trainer, toy_batch

PROBES = [[5, 17, 33, 2, 9], [90, 4, 61, 11, 7, 3, 8, 120]]
SMALL_BUCKET = 16 * 2**10
SESSION_MESSAGE = "update_weights_from_tensor must run between begin_weight_update() and end_weight_update()"


@pytest.fixture(scope="module")
def served(tiny_models, tmp_path_factory):
    """One engine on qwen3's config with random (dummy) weights; every push starts from the untrained checkpoint."""
    with EngineServer(tiny_models["qwen3"], tmp_path_factory.mktemp("engine") / "engine.log",
                      "--load-format", "dummy", "--weight-version", "dummy") as server:
        yield server


def engine_prompt_logprobs(client: EngineClient) -> list[list[float]]:
    """The engine's log-probs of every probe token after the first (prefill only, nothing generated)."""
    results = client.generate([GenerateRequest(input_ids=probe, logprob_start_len=0,
                                               sampling_params=SamplingParams(max_new_tokens=0)) for probe in PROBES])
    for probe, result in zip(PROBES, results):
        assert result.output_ids == [] and result.input_logprobs[0] is None and len(result.input_logprobs) == len(probe)
    return [result.input_logprobs[1:] for result in results]


def _train_and_push(hf_dir: Path, url: str, tp: int, pp: int):
    """On every rank: train one step, then push with each path and read back the engine's probe log-probs."""
    client = EngineClient(url, timeout=120)
    with parallel.model_parallel(tp, pp):
        first = dist.get_rank() == 0
        trainer = make_trainer(hf_dir, ["train.lr=1e-2"])
        trainer.train_iteration(toy_batch())
        trainer_logprobs = {index: values.tolist() for index, values in trainer.compute_logprobs(PROBES).items()}
        cases = [
            ("tensor", TensorWeightSync(url, 512 * 2**20), 1),
            ("tensor-small", TensorWeightSync(url, SMALL_BUCKET), 1),
            ("broadcast", DistributedWeightSync(url, 512 * 2**20), 2),  # the second push reuses the group
            ("broadcast-small-per-tensor", DistributedWeightSync(url, SMALL_BUCKET, load_format=None), 1),
        ]
        outcomes = []
        for label, sync, pushes in cases:
            with sync:
                for push in range(pushes):
                    if first:  # back to the untrained weights, so each push has to change them
                        client.update_weights_from_disk(str(hf_dir), weight_version="untrained")
                        before = engine_prompt_logprobs(client)
                    dist.barrier()
                    version = f"{label}-{push}"
                    pushed = sync.push(trainer, version)
                    if first:
                        outcomes.append((label, pushed, before, engine_prompt_logprobs(client), client.weight_version(),
                                         client.generate([GenerateRequest(input_ids=[1, 2])])[0].weight_version))
                    dist.barrier()
        groups = client.server_info()["internal_states"][0]["weight_update_groups"] if first else None
    return trainer_logprobs, outcomes, groups


def _model_bytes(hf_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(hf_dir / "model.safetensors"), "pt") as handle:
        return sum(handle.get_tensor(name).numel() * 4 for name in handle.keys())


@pytest.mark.parametrize("tp,pp", [(1, 1), (1, 2)], ids=["tp1", "pp2"])
def test_every_path_gives_the_engine_the_trainers_weights(tiny_models, served, tp, pp):
    hf_dir = tiny_models["qwen3"]
    results = parallel.launch(_train_and_push, tp * pp, hf_dir, served.url, tp, pp)
    trainer_logprobs = {index: values for per_rank, _, _ in results for index, values in per_rank.items()}
    _, outcomes, groups = results[0]
    assert [label for label, *_ in outcomes] == ["tensor", "tensor-small", "broadcast", "broadcast", "broadcast-small-per-tensor"]
    for push, (label, pushed, before, after, reported, generated_with) in enumerate(outcomes):
        trainer = [torch.tensor(trainer_logprobs[index]) for index in range(len(PROBES))]
        assert max((torch.tensor(b) - t).abs().max() for b, t in zip(before, trainer)) > 1e-3, label  # trained: differs
        for engine, expected in zip(after, trainer):
            assert torch.allclose(torch.tensor(engine), expected, atol=1e-4), (label, (torch.tensor(engine) - expected).abs().max())
        assert reported == generated_with == f"{label}-{1 if push == 3 else 0}"
        assert pushed.bytes == _model_bytes(hf_dir), label  # every weight once, over all stages
        assert pushed.buckets >= (8 if "small" in label else pp), (label, pushed.buckets)
    assert groups == []  # close() destroyed the engine's side of every broadcast group


def test_tensor_updates_need_a_session(served):
    client = EngineClient(served.url, timeout=60)
    norm = torch.full((64,), 0.5)

    def payload(name: str, tensor: torch.Tensor) -> list[str]:
        buffer, metadata = flatten([(name, tensor)], lambda nbytes: shared_buffer(nbytes, torch.device("cpu")))
        return [dump_payload({"flattened_tensor": buffer, "metadata": metadata})]

    version = client.weight_version()
    with pytest.raises(EngineError, match="must run between") as outside:
        client.update_weights_from_tensor(payload("model.norm.weight", norm), load_format=FLATTENED_BUCKET,
                                          weight_version="outside")
    assert outside.value.status == 400 and outside.value.body == {"success": False, "message": SESSION_MESSAGE}
    with pytest.raises(EngineError, match="no weight-update session is open"):
        client.end_weight_update()
    client.begin_weight_update()
    try:
        with pytest.raises(EngineError, match="already open"):
            client.begin_weight_update()
        with pytest.raises(EngineError, match="'model.nrm.weight' is not a weight of the served model"):
            client.update_weights_from_tensor(payload("model.nrm.weight", norm), load_format=FLATTENED_BUCKET)
        with pytest.raises(EngineError, match=r"has shape \(32,\), the served model expects \(64,\)"):
            client.update_weights_from_tensor(payload("model.norm.weight", norm[:32]), load_format=FLATTENED_BUCKET)
        assert client.weight_version() == version  # refused calls change nothing
        # load_format null: a list of (name, tensor), the tensor shared by handle as it is
        result = client.update_weights_from_tensor([dump_payload([("model.norm.weight", norm)])], weight_version="half")
        assert result.success and "Weight version updated to half" in result.message
    finally:
        client.end_weight_update()
    assert client.weight_version() == "half"
    with pytest.raises(EngineError, match="update_weights_from_distributed must run between"):
        client.update_weights_from_distributed(["model.norm.weight"], ["float32"], [[64]])


class _Metadata:  # a class of the sender's own: SGLang's unpickler refuses it, so must ours
    def __init__(self, name):
        self.name = name


class _Exploit:
    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


@pytest.mark.parametrize("make,refused_global", [
    # a plain pickle: the tensor's bytes inline (torch.storage._load_from_bytes is read safely), then the class
    (lambda path: {"flattened_tensor": torch.zeros(4, dtype=torch.uint8), "metadata": [_Metadata("model.norm.weight")]},
     f"{__name__}._Metadata"),
    (lambda path: [("model.norm.weight", _Exploit(path))], f"{os.system.__module__}.system"),
], ids=["own-class", "os.system"])
def test_payloads_with_other_globals_are_refused(served, tmp_path, make, refused_global):
    client = EngineClient(served.url, timeout=60)
    marker = tmp_path / "exploited"
    raw = io.BytesIO()
    pickle.Pickler(raw).dump(make(marker))
    client.begin_weight_update()
    try:
        with pytest.raises(EngineError, match=f"needs the Python global {refused_global}, which is not allowed") as refused:
            client.update_weights_from_tensor([base64.b64encode(raw.getvalue()).decode()], load_format=FLATTENED_BUCKET)
    finally:
        client.end_weight_update()
    assert refused.value.status == 400 and "serialized_named_tensors[0]" in str(refused.value)
    assert not marker.exists()


def _push_other_model(other_dir: Path, url: str, sync_kind: str) -> str:
    with parallel.model_parallel(1, 1):
        trainer = make_trainer(other_dir, [])
        sync = TensorWeightSync(url, 512 * 2**20) if sync_kind == "tensor" else DistributedWeightSync(url, 512 * 2**20)
        with sync:
            with pytest.raises(EngineError) as refused:
                sync.push(trainer, "other")
            return str(refused.value)


@pytest.mark.parametrize("sync_kind", ["tensor", "broadcast"])
def test_weights_of_another_model_are_refused_and_the_session_closed(tiny_models, served, sync_kind):
    client = EngineClient(served.url, timeout=60)
    version = client.weight_version()
    message = parallel.launch(_push_other_model, 1, tiny_models["llama"], served.url, sync_kind)[0]
    assert "is not a weight of the served model" in message or "the served model expects" in message, message
    assert client.weight_version() == version
    state = client.server_info()["internal_states"][0]
    assert state["weight_update_session"] is False and state["weight_update_groups"] == []


# ------------------------------------------------------------------------------------------ prompt log-probs


@pytest.mark.parametrize("deterministic", [False, True], ids=["batched", "deterministic"])
def test_prompt_logprobs_only_for_the_requests_that_ask(tiny_models, deterministic):
    from transformers import AutoModelForCausalLM

    hf_dir = tiny_models["qwen3"]
    reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    engine = EmbeddedEngine(hf_dir, enable_deterministic_inference=deterministic, chunked_prefill_size=4,
                            random_seed=0).start()
    try:
        # temperature 0.5: prompt log-probs stay raw (SGLang), output log-probs are scaled
        params = SamplingParams(max_new_tokens=3, temperature=0.5)
        requests = [EngineRequest(input_ids=PROBES[0], sampling_params=params, return_logprob=True, logprob_start_len=0),
                    EngineRequest(input_ids=PROBES[1], sampling_params=params, return_logprob=True, logprob_start_len=3),
                    EngineRequest(input_ids=[7, 8, 9], sampling_params=params, return_logprob=True),
                    EngineRequest(input_ids=PROBES[1], sampling_params=params, return_logprob=False, logprob_start_len=0)]
        responses = [future.result(60) for future in engine.submit_many(requests)]
        for request, response in zip(requests[:2], responses):
            prompt, start = request.input_ids, request.logprob_start_len
            entries = response.meta_info.input_token_logprobs
            assert [token for _, token, _ in entries] == prompt[start:] and entries[0][0] is None
            with torch.no_grad():
                logits = reference(torch.tensor([prompt + response.output_ids])).logits[0]
            raw = torch.log_softmax(logits, dim=-1)
            expected = [float(raw[position - 1, prompt[position]]) for position in range(start + 1, len(prompt))]
            assert torch.allclose(torch.tensor([lp for lp, _, _ in entries[1:]]), torch.tensor(expected), atol=1e-5)
            scaled = torch.log_softmax(logits / 0.5, dim=-1)
            outputs = [float(scaled[len(prompt) - 1 + i, token]) for i, token in enumerate(response.output_ids)]
            engine_outputs = [lp for lp, _, _ in response.meta_info.output_token_logprobs]
            assert torch.allclose(torch.tensor(engine_outputs), torch.tensor(outputs), atol=1e-5)
        assert responses[2].meta_info.input_token_logprobs is None  # logprob_start_len -1: output only
        assert responses[3].meta_info.input_token_logprobs is None  # no return_logprob: ignored, as in SGLang
        with pytest.raises(RequestError, match="logprob_start_len: 6 is higher than the number of input tokens"):
            engine.submit(EngineRequest(input_ids=PROBES[0], sampling_params=params, return_logprob=True,
                                        logprob_start_len=6))
        at_end = engine.generate(EngineRequest(input_ids=PROBES[0], sampling_params=params, return_logprob=True,
                                               logprob_start_len=5), timeout=60)
        assert at_end.meta_info.input_token_logprobs == []
    finally:
        engine.shutdown()


def _push_after_the_engine_lost_its_group(hf_dir: Path, url: str) -> tuple[str, str]:
    client = EngineClient(url, timeout=60)
    with parallel.model_parallel(1, 1):
        trainer = make_trainer(hf_dir, [])
        with DistributedWeightSync(url, 512 * 2**20, timeout=30) as sync:
            sync.push(trainer, "joined")
            (lost,) = client.server_info()["internal_states"][0]["weight_update_groups"]
            client.destroy_weights_update_group(lost)  # as after an engine restart
            with pytest.raises(EngineError) as refused:
                sync.push(trainer, "lost")
            pushed = sync.push(trainer, "rejoined")  # a fresh group
            (fresh,) = client.server_info()["internal_states"][0]["weight_update_groups"]
            assert fresh != lost and pushed.weight_version == client.weight_version() == "rejoined"
    return str(refused.value), lost


def test_broadcast_push_joins_a_fresh_group_when_the_engine_lost_its_own(tiny_models, served):
    message, lost = parallel.launch(_push_after_the_engine_lost_its_group, 1, tiny_models["qwen3"], served.url)[0]
    assert f"Group {lost} not in []" in message, message
    assert EngineClient(served.url).server_info()["internal_states"][0]["weight_update_groups"] == []
