"""Each CPU-shim patch is needed: with it switched off, the real megatron-core path fails."""
import os
import subprocess
import sys

import pytest

PROBE = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_trainer import make_trainer, toy_batch
from megatron_rl.train import parallel
with parallel.model_parallel(1, 1):
    make_trainer(Path({model!r}), []).train_iteration(toy_batch())
print("trained")
"""


@pytest.mark.parametrize(
    "patch,symptom",
    [
        ("current_device", "Torch not compiled with CUDA enabled"),
        ("device_mode", "Torch not compiled with CUDA enabled"),
        ("tensor_type", "torch.cuda.FloatTensor"),
        (None, "trained"),
    ],
)
def test_shim_patch_is_needed(tiny_models, patch, symptom):
    environment = dict(os.environ, MEGATRON_RL_SHIM_SKIP=patch or "")
    code = PROBE.format(tests=os.path.dirname(__file__), model=str(tiny_models["llama"]))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=300)
    if patch is None:
        assert result.returncode == 0 and symptom in result.stdout, result.stderr[-2000:]
    else:
        assert result.returncode != 0 and symptom in result.stderr, result.stderr[-2000:]
