import pytest

from megatron_rl.config import Config, load_config
from megatron_rl.errors import UserError


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_and_dotted_overrides_are_typed(tmp_path):
    path = write(tmp_path, "algo:\n  tau: 0.5\nparallel:\n  tp: 2\n")
    config = load_config(path, ["algo.tau=0.05", "train.reset_optimizer_each_iteration=false", "model.hf_path=/models/x"])
    assert config.algo.tau == 0.05
    assert config.parallel.tp == 2
    assert config.train.reset_optimizer_each_iteration is False
    assert config.model.hf_path == "/models/x"
    assert config.algo.loss == Config().algo.loss  # untouched keys keep defaults


def test_unknown_key_in_file_names_key_and_allowed_keys(tmp_path):
    path = write(tmp_path, "algo:\n  tauu: 0.5\n")
    with pytest.raises(UserError) as error:
        load_config(path)
    message = str(error.value)
    assert "algo.tauu" in message and "tau" in message and "length_normalization" in message


def test_unknown_override_key_and_section(tmp_path):
    with pytest.raises(UserError, match=r"unknown config key 'algo.tauu'.*allowed keys under algo: .*tau"):
        load_config(None, ["algo.tauu=1"])
    with pytest.raises(UserError, match=r"unknown config key 'algoo.tau'.*allowed keys under the top level: model, parallel"):
        load_config(None, ["algoo.tau=1"])
    with pytest.raises(UserError, match="is a value, not a section"):
        load_config(None, ["algo.tau.x=1"])


def test_ill_typed_values_name_key_and_allowed_values():
    with pytest.raises(UserError, match=r"'algo.loss'.*'k15', 'grpo', 'ppo_clip' or 'rest'.*got 'reinforce'"):
        load_config(None, ["algo.loss=reinforce"])
    with pytest.raises(UserError, match=r"'parallel.tp'.*greater than or equal to 1"):
        load_config(None, ["parallel.tp=0"])
    with pytest.raises(UserError, match=r"'train.micro_batch_size'.*integer"):
        load_config(None, ["train.micro_batch_size=many"])
    # Accepted, it would silently run without it.
    with pytest.raises(UserError, match=r"'parallel.cp'.*context parallelism is not wired into the trainer yet.*"
                                        r"use parallel.cp=1"):
        load_config(None, ["parallel.cp=2"])
    with pytest.raises(UserError, match=r"'hybrid'.*peer_sidecar_urls name engines on other pods.*cuda_ipc.*use "
                                        r"hybrid.weight_sync=disk or nccl"):
        load_config(None, ["hybrid.peer_sidecar_urls=[http://pod-1:31000]", "hybrid.weight_sync=cuda_ipc"])
    assert load_config(None, ["hybrid.peer_sidecar_urls=[http://pod-1:31000]"]).hybrid.weight_sync == "disk"


def test_malformed_override_and_yaml(tmp_path):
    with pytest.raises(UserError, match="section.key=value"):
        load_config(None, ["algo.tau"])
    with pytest.raises(UserError, match=r"run.yaml:2: invalid YAML"):
        load_config(write(tmp_path, "algo:\n  tau: 1: 2\nparallel: {}\n"))
    with pytest.raises(UserError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")

