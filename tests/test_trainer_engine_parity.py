"""After the trainer's weights are pushed into the engine, both give the same log-probs."""
from pathlib import Path

import torch

from engine_fixtures import EngineServer
from megatron_rl.rollout.client import EngineClient
from megatron_rl.rollout.protocol import GenerateRequest, SamplingParams
from megatron_rl.train import parallel
from megatron_rl.train.convert_commands import write_hf_model
from test_trainer import make_trainer, toy_batch

PROMPTS = [[5, 17, 33, 2], [90, 4, 61, 11, 7, 3]]


def _train_and_export(hf_dir: Path, export_dir: Path) -> None:
    with parallel.model_parallel(1, 2):
        trainer = make_trainer(hf_dir, ["train.lr=1e-2"])
        trainer.train_iteration(toy_batch())
        write_hf_model(trainer.model, trainer.arch, export_dir, hf_dir, bucket_bytes=2**16)


def _trainer_logprobs(export_dir: Path, sequences: list[list[int]]) -> dict[int, torch.Tensor]:
    with parallel.model_parallel(1, 1):
        return make_trainer(export_dir, []).compute_logprobs(sequences)  # make_trainer loads export_dir


def test_engine_logprobs_match_trainer_after_weight_update(tiny_models, tmp_path):
    hf_dir = tiny_models["qwen3"]
    export_dir = tmp_path / "weights"
    parallel.launch(_train_and_export, 2, hf_dir, export_dir)  # trained at PP=2, streamed in small buckets

    with EngineServer(hf_dir, tmp_path / "engine.log", "--load-format", "dummy") as server:
        client = EngineClient(server.url, timeout=120)
        client.update_weights_from_disk(str(export_dir), weight_version="1")
        assert client.weight_version() == "1"
        results = client.generate(
            [GenerateRequest(input_ids=prompt, sampling_params=SamplingParams(max_new_tokens=12, temperature=1.0, sampling_seed=3)) for prompt in PROMPTS]
        )

    sequences = [prompt + result.output_ids for prompt, result in zip(PROMPTS, results)]
    trainer_logprobs = parallel.launch(_trainer_logprobs, 1, export_dir, sequences)[0]
    for index, (prompt, result) in enumerate(zip(PROMPTS, results)):
        assert result.weight_version == "1"
        engine = torch.tensor(result.output_logprobs)
        trainer = trainer_logprobs[index][len(prompt) - 1 :]
        assert engine.shape == trainer.shape
        assert torch.allclose(engine, trainer, atol=1e-4), (engine - trainer).abs().max()
