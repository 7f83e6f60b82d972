"""User errors through the real `megatron-rl` entry point: one line, exit 2, no traceback."""
import json
import subprocess
import sys

import pytest

from tiny_models import write_tiny_hf_model


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_rl.cli", *args], capture_output=True, text=True, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and expected in lines[0], result.stderr


@pytest.fixture(scope="module")
def broken_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    bad_json = write_tiny_hf_model(root / "bad_json", "llama")
    (bad_json / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],\n  "hidden_size": }')
    truncated = write_tiny_hf_model(root / "truncated", "llama")
    weights = next(truncated.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:200])
    unsupported = write_tiny_hf_model(root / "unsupported", "llama")
    config = json.loads((unsupported / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (unsupported / "config.json").write_text(json.dumps(config))
    no_weights = root / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((unsupported / "config.json").read_text())
    return root


@pytest.mark.parametrize(
    "case,expected",
    [
        ("missing", "does not exist"),
        ("bad_json", "config.json:2: invalid JSON"),
        ("truncated", "is not a readable safetensors file"),
        ("unsupported", "unsupported architecture 'GPT2LMHeadModel'; supported: LlamaForCausalLM"),
        ("no_weights", "*.safetensors weights missing"),
    ],
)
def test_bad_hf_directories(broken_models, tmp_path, case, expected):
    assert_one_line_error(run_cli("convert", "hf-to-mcore", "--hf", str(broken_models / case), "--out", str(tmp_path / "out")), expected)


def test_layout_that_does_not_fit_the_model(tiny_models, tmp_path):
    # 4 heads / 2 KV heads cannot be split over TP=4... the KV heads cannot.
    assert_one_line_error(
        run_cli("convert", "verify", "--hf", str(tiny_models["llama"]), "--tp", "4"), "must be divisible by TP=4"
    )


def test_existing_output_is_never_overwritten(tiny_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert_one_line_error(run_cli("convert", "hf-to-mcore", "--hf", str(tiny_models["llama"]), "--out", str(out)), "is not empty")
    assert (out / "keep.txt").read_text() == "precious"


def test_mcore_to_hf_of_a_directory_that_is_no_checkpoint(tmp_path):
    assert_one_line_error(run_cli("convert", "mcore-to-hf", "--mcore", str(tmp_path), "--out", str(tmp_path / "hf")), "no manifest.json")


def test_config_with_unknown_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("rollout:\n  samples_per_promt: 4\n")
    assert_one_line_error(run_cli("config", "show", "--config", str(path)), "unknown key 'rollout.samples_per_promt'")
    result = run_cli("config", "show", "--config", str(path.with_name("none.yaml")))
    assert_one_line_error(result, "does not exist")


def test_config_show_prints_the_resolved_tree():
    result = run_cli("config", "show", "algo.tau=0.05")
    assert result.returncode == 0, result.stderr
    assert "tau: 0.05" in result.stdout and "samples_per_prompt: 8" in result.stdout


def test_verify_cli_reports_the_difference(tiny_models):
    result = run_cli("convert", "verify", "--hf", str(tiny_models["qwen3"]))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OK: max |Δlogits| = ")
    failing = run_cli("convert", "verify", "--hf", str(tiny_models["qwen3"]), "--tolerance", "0")
    assert failing.returncode == 1 and failing.stdout.startswith("FAIL")
