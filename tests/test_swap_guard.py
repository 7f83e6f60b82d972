"""The runtime swap guard against a real engine server and a real megatron trainer (two pipeline stages)."""
from __future__ import annotations

import pytest
import torch.distributed as dist

from engine_fixtures import EngineServer
from megatron_rl.errors import RunError
from megatron_rl.hybrid.swap_guard import check_engine, probe_sequences, trainer_reference
from megatron_rl.hybrid.weight_push import TensorWeightSync
from megatron_rl.rollout import EngineClient
from megatron_rl.train import parallel
from test_trainer import make_trainer, toy_batch

PROMPTS = [[5], [5, 17, 33, 2, 9], [90, 4, 61, 11, 7, 3, 8, 120] * 10]


def test_probes_are_the_first_prompts_long_enough_cut_to_a_bound():
    probes = probe_sequences(PROMPTS, 4)
    assert probes == [PROMPTS[1], PROMPTS[2][:64]]
    assert probe_sequences(PROMPTS, 1) == [PROMPTS[1]]


def _guard_on_rank(hf_dir, url: str) -> tuple[str | None, float | None]:
    """Train one step; the guard must refuse the engine's untrained weights, and accept them once pushed."""
    client = EngineClient(url, timeout=120)
    probes = probe_sequences(PROMPTS, 4)
    with parallel.model_parallel(1, 2):
        trainer = make_trainer(hf_dir, ["train.lr=1e-2", "rollout.temperature=0.7"])  # the guard ignores it
        trainer.train_iteration(toy_batch())
        reference = trainer_reference(trainer, probes)  # collective: every rank gets the last stage's values
        assert len(reference.logprobs) == len(probes)
        refused = passed = None
        if dist.get_rank() == 0:
            client.update_weights_from_disk(str(hf_dir), weight_version="untrained")
            try:
                check_engine(client, probes, reference, "1", threshold=1e-3)
            except RunError as error:
                refused = str(error)
        dist.barrier()
        with TensorWeightSync(url, 512 * 2**20) as sync:
            sync.push(trainer, "1")
        if dist.get_rank() == 0:
            passed = check_engine(client, probes, reference, "1", threshold=1e-3).mean_gap
    return refused, passed


@pytest.fixture(scope="module")
def served(tiny_models, tmp_path_factory):
    with EngineServer(tiny_models["qwen3"], tmp_path_factory.mktemp("engine") / "engine.log") as server:
        yield server


def test_the_guard_stops_stale_weights_and_passes_the_synced_ones(tiny_models, served):
    refused, passed = parallel.launch(_guard_on_rank, 2, tiny_models["qwen3"], served.url)[0]
    assert refused is not None and "swap guard" in refused and "weight version 1" in refused, refused
    assert "hybrid.swap_guard_threshold=0.001" in refused
    assert passed is not None and passed < 1e-4
